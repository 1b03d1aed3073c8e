"""Named sharding strategies: presets of `config.mesh` sizes (and the MoE dispatcher).

A strategy is only a choice of config values, so every one of them can also be written
as flags, e.g. FSDP with 2-way tensor parallelism on any number of devices:

    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=2

  data      pure data parallelism: parameters replicated, gradients all-reduced.
  fsdp      ZeRO-3 / FSDP: parameters and optimizer state split over `fsdp` along their
            `embed` dimension, gathered for use, gradients reduce-scattered.
  fsdp_tp   FSDP plus Megatron tensor parallelism (heads, mlp, vocab split over `tensor`).
  ep        expert parallelism (GShard): experts split over `expert`, tokens exchanged with
            all-to-all by the `expert_parallel` dispatcher.
  fssdp     Hecate's fully sharded sparse data parallelism (arXiv 2502.02581): one owner
            per expert over `expert`, hot experts replicated per step by the `fssdp`
            dispatcher.

A field also given explicitly (`--config.moe.dispatcher=ragged --strategy=ep` in the
collective report) keeps the explicit value: `apply_strategy(..., keep=...)`.

The `expert_parallel` and `fssdp` dispatchers live in `moejax.moe.dispatch`; a strategy
whose dispatcher is not registered there is listed by `available()` only once it is.
"""

from __future__ import annotations

from collections.abc import Collection

from moejax.config_section import ConfigError
from moejax.moe.dispatch import DISPATCHERS

_ONE = dict(data=1, fsdp=1, expert=1, tensor=1)

STRATEGIES: dict[str, dict[str, dict]] = {
    "data": {"mesh": {**_ONE, "data": -1}},
    "fsdp": {"mesh": {**_ONE, "fsdp": -1}},
    "fsdp_tp": {"mesh": {**_ONE, "fsdp": -1, "tensor": 2}},
    "ep": {"mesh": {**_ONE, "expert": -1}, "moe": {"dispatcher": "expert_parallel"}},
    "fssdp": {"mesh": {**_ONE, "expert": -1}, "moe": {"dispatcher": "fssdp"}},
}


def available() -> list[str]:
    """The strategies whose dispatcher (if they name one) is registered."""
    return [
        name
        for name, preset in STRATEGIES.items()
        if preset.get("moe", {}).get("dispatcher", "auto") in DISPATCHERS
    ]


def apply_strategy(config, name: str, keep: Collection[str] = (), **mesh_sizes: int):
    """Sets `config`'s mesh (and dispatcher) to the preset `name`, in place; `mesh_sizes`
    override single axes (e.g. `tensor=4`), and the dotted fields in `keep` (e.g.
    `"moe.dispatcher"`, set explicitly on the command line) keep their value. Returns
    `config`."""
    if name not in STRATEGIES:
        raise ConfigError(
            f"sharding strategy {name!r} is unknown; choose one of {sorted(STRATEGIES)}."
        )
    preset = {**STRATEGIES[name], "mesh": {**STRATEGIES[name]["mesh"], **mesh_sizes}}
    for section, values in preset.items():
        config[section].update({k: v for k, v in values.items() if f"{section}.{k}" not in keep})
    return config


def kept_fields(name: str, keep: Collection[str]) -> list[str]:
    """The fields of preset `name` that `keep` overrides (for saying so)."""
    preset = STRATEGIES.get(name, {})
    return [f"{s}.{k}" for s, values in preset.items() for k in values if f"{s}.{k}" in keep]
