"""`LoRAConfig`: the `config.lora` section (low-rank adapters and mixtures of LoRA experts)."""

from __future__ import annotations

import dataclasses

from moejax.config_section import section_from_mapping

LORA_ROUTERS = ("softmax_topk", "top_p", "sigmoid_bias", "dynmole")
# none: no MoE dispatcher, the expert mixture is one matmul over the concatenated ranks.
LORA_DISPATCHERS = ("none", "dense_reference", "capacity_einsum", "ragged", "hybrid", "auto")
LORA_SCALINGS = ("rank", "active", "total")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the frozen projections of the model (`method="none"`: no adapter).

    `targets` names the wrapped projections as `<module>.<param>` patterns (fnmatch), comma
    separated, e.g. "attn.wq,attn.wv" or "attn.*,mlp.*": attention `attn.wq|wk|wv|wo`, dense
    MLP `mlp.w_gate|w_up|w_down`, MoE shared experts `shared.*`. Every targeted projection
    gets `num_experts` rank-`rank` experts `a[E, d_in, r]` (`a[1, d_in, r]` with `shared_a`,
    HydraLoRA), `b[E, r, d_out]` in a child module `lora_<param>`:

        y = W x + s * sum_e g_e(x) B_e A_e x = W x + s * B (expand(g(x), r) * A x)

    with the experts concatenated along the rank axis (R = E r; rank-wise experts are r = 1).
    The scale s is alpha / r (`scaling="rank"`), alpha / (top_k r) ("active", SMoRA) or
    alpha / (E r) ("total", FlyLoRA); `rslora` takes the square root of that denominator
    (Kalajdzievski, 2023). The gates g come from `method` ("none": no adapter, or a key of
    `moejax.lora.methods.METHODS`); `moe` routes
    with a linear router and `router`: a moejax selection rule (`moejax.moe.selection`) or
    DynMoLE's Tsallis-entropy rule, and computes the mixture along the rank axis, one matmul
    over the concatenated ranks (`dispatcher="none"`, no MoE dispatcher; "rank" is its old
    spelling, `moejax.config.renames`), or by one of moejax's MoE dispatchers on the E
    experts.

    The frozen base comes from `base_checkpoint` (a moejax run directory: the params of its
    latest checkpoint) or `base_hf` (a Hugging Face directory, `moejax.hf.from_pretrained`);
    with neither, from the run's own initialisation, saved once in `{workdir}/base`. Adapter
    runs checkpoint the adapters and their optimizer state only, with a fingerprint of the
    base that is checked on resume (`moejax.train.adapter_checkpoint`).
    """

    method: str = "none"
    targets: str = "attn.wq,attn.wv"
    rank: int = 8  # rank r of each expert (SMoRA's rank_partition, FlyLoRA: 1)
    alpha: float = 16.0
    rslora: bool = False
    num_experts: int = 1
    top_k: int = 1
    base_checkpoint: str = ""
    base_hf: str = ""
    scaling: str = "rank"  # one of LORA_SCALINGS: the denominator of s = alpha / ...
    shared_a: bool = False  # HydraLoRA: one A shared by the E heads B_e
    router: str = "softmax_topk"  # moe: one of LORA_ROUTERS
    renormalize: bool = True  # softmax_topk/sigmoid_bias: top-k weights sum to 1
    routed_scale: float = 1.0  # sigmoid_bias: weights times this (SMoRA: top_k, sum = k)
    dispatcher: str = "none"  # one of LORA_DISPATCHERS ("none": mixed along the rank axis)
    balance_coef: float = 0.0  # Switch balance loss weight of the adapter routers
    z_loss_coef: float = 0.0  # ST-MoE z-loss weight of the adapter routers
    entropy_coef: float = 0.0  # mean router entropy weight (DynMoLE: Tsallis, 0.01)
    cv_coef: float = 0.0  # LoRAMoE: weight of cv(importance)^2
    top_p: float = 0.75  # top_p / dynmole: smallest expert set with probability >= top_p
    min_experts: int = 1  # dynmole: at least this many experts per token (DynMoLE: 2)
    entropy_threshold: float = 0.9  # dynmole: all experts above this normalised entropy
    tsallis_q: float = 1.1  # dynmole: Tsallis entropy index q
    bias_update_rate: float = 0.0  # sigmoid_bias/flylora: sign-rule step of `lora_bias`
    layer_experts: str = ""  # MoLA: E per equal slice of the stack, e.g. "2,4,6,8"
    flylora_density: float = 0.0  # flylora: non-zeros per row of A / d_in; 0 = top_k / E
    xlora_temperature: float = 1.0  # xlora: softmax temperature of the classifier
    xlora_top_k: int = 0  # xlora: keep the k largest scalings per token; 0 = all
    sora_lambda: float = 1e-3  # sora: soft-threshold per unit learning rate (proximal step)
    # Experts' a and b in the non-trainable `lora_frozen` collection: loaded adapters as
    # frozen experts, only the gating trains (moejax.hf.from_pretrained(adapters=...)).
    frozen_experts: bool = False

    @classmethod
    def from_mapping(cls, mapping) -> "LoRAConfig":
        return section_from_mapping(cls, mapping, "lora")

    @property
    def expert_counts(self) -> tuple[int, ...]:
        """MoLA's E per slice of the stack (`layer_experts`); () when uniform."""
        return tuple(int(v) for v in self.layer_experts.split(",") if v.strip())

    def for_layer(self, layer: int, num_layers: int) -> "LoRAConfig":
        """The config of layer `layer` of `num_layers`: MoLA's `layer_experts` split the
        stack into equal consecutive slices (the first ones one layer longer if uneven)."""
        counts = self.expert_counts
        if not counts:
            return self
        e = counts[min(layer * len(counts) // num_layers, len(counts) - 1)]
        return dataclasses.replace(self, num_experts=e, layer_experts="")
