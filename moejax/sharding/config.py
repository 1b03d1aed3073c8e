"""`MeshConfig`: the `config.mesh` section (mesh shape and logical-axis rules)."""

from __future__ import annotations

import dataclasses

from moejax.config_section import section_from_mapping

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis name -> mesh axis (or axes, or None = replicated). Model code names only the
# logical axes; these rules decide the layout. `layers` is the scan axis of stacked blocks,
# `period_layers` that of the dense blocks inside each MoE period (model.moe_every > 1);
# `batch`, `length`, `act_embed` name the residual stream [B, L, d] (activations).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("latent", None),  # MLA's compressed query / key-value latents (moejax/models/mla.py)
    ("expert", "expert"),
    ("layers", None),
    ("period_layers", None),
    ("norm", None),
    # Low-rank adapters (moejax.lora) are small: replicated.
    ("lora_experts", None),
    ("lora_in", None),
    ("lora_rank", None),
    ("lora_out", None),
    ("length", None),  # activations: sequence positions
    ("act_embed", None),  # activations: the residual stream's d_model
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh over (data, fsdp, expert, tensor); one size may be -1 ("the rest").

    `topology` names the TPU slice the sizes were chosen for (`moejax.sharding.topology`
    names: "v5p:4x4x8", "v6e-256"; "" = none): the collective report compiles for it when
    no `--topology` is given, and `num_slices` such slices joined by DCN.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: tuple = DEFAULT_RULES
    topology: str = ""
    num_slices: int = 1

    @classmethod
    def from_mapping(cls, mapping) -> "MeshConfig":
        return section_from_mapping(cls, mapping, "mesh")

    @property
    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


def batch_mesh_axes(rules) -> tuple[str, ...]:
    """Mesh axes of the `batch` rule: where the data-parallel split of a batch goes."""
    for name, axes in rules:
        if name == "batch":
            return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return ()
