"""`ModelConfig`: the `config.model` section (the Transformer's shape and numerics), and its
per-layer layout: `LayerKind` (one layer's FFN), `parse_layer_kind` (a `layer_kinds` entry),
`layer_moe_config` (an MoE layer's own moe section) and `periodic_layout` (whether a list of
MoE layers is a dense prefix then periods ending in MoE)."""

from __future__ import annotations

import dataclasses

from moejax.config_section import section_from_mapping

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("gqa", "mla")
ATTENTION_IMPLS = ("auto", "xla", "flash")  # moejax.models.attention_kernels
LAYER_KINDS = ("dense", "moe")  # the FFN kinds of `layer_kinds` entries
QK_NORMS = ("none", "head", "full")  # gqa: RMSNorm of queries and keys before RoPE


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One layer's FFN: dense (`moe=False`), or MoE with `num_experts` experts of which each
    token uses `top_k` (0 = the moe section's `num_experts` / `top_k`)."""

    moe: bool
    num_experts: int = 0
    top_k: int = 0

    def __str__(self) -> str:
        text = "moe" if self.moe else "dense"
        if self.num_experts:
            text += f":e={self.num_experts}"
        if self.top_k:
            text += f":k={self.top_k}"
        return text


def parse_layer_kind(entry: str) -> LayerKind:
    """`dense`, `moe`, `moe:e=8`, `moe:k=2`, `moe:e=8:k=2` -> LayerKind; ValueError saying
    what is wrong with `entry` otherwise."""
    kind, *options = [part.strip() for part in entry.strip().split(":")]
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown kind {kind!r} (one of {LAYER_KINDS})")
    if kind == "dense" and options:
        raise ValueError("a dense layer takes no options (e=/k= are for moe layers)")
    values = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in ("e", "k") or name in values or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"option {option!r} must be e=<experts> or k=<top-k>, each once, a positive int"
            )
        values[name] = int(value)
    return LayerKind(kind == "moe", values.get("e", 0), values.get("k", 0))


def layer_moe_config(kind: LayerKind, moe):
    """The moe section (`moejax.moe.config.MoEConfig`) of an MoE layer of this kind: its own
    expert count and top-k where `layer_kinds` gives them."""
    return dataclasses.replace(
        moe, num_experts=kind.num_experts or moe.num_experts, top_k=kind.top_k or moe.top_k
    )


def periodic_layout(moe_layers: list[bool]) -> tuple[int, int] | None:
    """(first_k_dense, moe_every) whose layout has MoE exactly at `moe_layers` ((0, 0): no
    MoE layer), or None when no such pair exists."""
    n = len(moe_layers)
    if not any(moe_layers):
        return 0, 0
    for k in range(n + 1):
        for every in range(1, n - k + 1):
            if (n - k) % every:
                continue
            if all(moe_layers[i] == (i >= k and (i - k) % every == every - 1) for i in range(n)):
                return k, every
    return None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Transformer hyper-parameters.

    Layer layout: the first `first_k_dense` layers have a dense FFN; the remaining
    `num_layers - first_k_dense` layers come in periods of `moe_every` layers whose last layer
    is MoE and whose others are dense (`moe_every=1`: every remaining layer is MoE;
    `moe_every=0`: no MoE layer at all, a dense model). `layer_kinds` instead gives every
    layer its FFN, one comma-separated entry per layer: `dense`, `moe`, or `moe` with its own
    expert count and top-k (`moe:e=8:k=2`; unset ones are the moe section's), e.g.
    `"dense,moe,moe:e=16:k=4,dense"`; `first_k_dense` and `moe_every` then stay at their
    defaults (0 and 1). `layer_layout` is the resolved per-layer list either way, and
    `layer_runs` its runs of identical consecutive layers, each one scan in the model.

    Attention (`attention`): `gqa` is grouped-query attention (`num_kv_heads` key/value heads,
    optional q/k/v biases as in Qwen2 with `attention_bias`); `mla` is DeepSeek-V2/V3
    multi-head latent attention (`moejax.models.mla`): queries through a rank-`q_lora_rank`
    bottleneck (0 = a direct projection), keys and values from one rank-`kv_lora_rank`
    latent, per-head query/key dims `qk_nope_head_dim + qk_rope_head_dim` (the rotary part of
    the key is one head shared by all heads), value dim `v_head_dim`; `num_kv_heads` and
    `head_dim` are unused there.

    `qk_norm` (gqa) RMS-normalises queries and keys after their projections, before RoPE:
    `head` over each head's `head_dim` with one scale `[head_dim]` shared by the heads
    (Qwen3, Qwen3-MoE), `full` over the whole projection, scales `[num_heads * head_dim]`
    and `[num_kv_heads * head_dim]` (OLMoE); eps is `norm_eps`.

    `attention_impl` picks how training and prefill attention is computed
    (`moejax.models.attention_kernels`): `xla` materialises the [B, H, L, L] scores;
    `flash` runs blockwise (FlashAttention) kernels whose memory is linear in the length: the
    Pallas splash kernel on TPU, cuDNN on NVIDIA GPUs, a plain-JAX `lax.scan` on CPU; `auto`
    is `flash` on TPU and GPU and `xla` on CPU. Decoding with a cache always uses `xla`.
    """

    vocab_size: int = 259
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4  # grouped-query attention when < num_heads
    head_dim: int = 0  # 0 -> d_model // num_heads
    d_ff: int = 1024  # width of the dense SwiGLU FFN layers
    first_k_dense: int = 0
    moe_every: int = 1
    layer_kinds: str = ""  # one FFN kind per layer ("dense,moe,moe:e=8:k=2"); "" = the above
    attention: str = "gqa"  # one of ATTENTIONS
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS
    attention_bias: bool = False  # gqa: biases on the q/k/v projections (Qwen2)
    qk_norm: str = "none"  # gqa: one of QK_NORMS (Qwen3-MoE: head; OLMoE: full)
    q_lora_rank: int = 0  # mla: query compression rank; 0 = no compression (DeepSeek-V2-Lite)
    kv_lora_rank: int = 0  # mla: rank of the compressed key/value latent (what is cached)
    qk_nope_head_dim: int = 0  # mla: per-head query/key dims without rotary embedding
    qk_rope_head_dim: int = 0  # mla: query/key dims with rotary embedding (key: one shared head)
    v_head_dim: int = 0  # mla: per-head value dim
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; "bfloat16" with float32 params for mixed precision
    param_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True  # nn.scan over layers (compile time flat in depth) or a loop

    @classmethod
    def from_mapping(cls, mapping) -> "ModelConfig":
        return section_from_mapping(cls, mapping, "model")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def layer_layout(self) -> tuple[LayerKind, ...]:
        """Every layer's FFN: parsed `layer_kinds`, or derived from first_k_dense / moe_every
        (ValueError on a malformed `layer_kinds`; `moejax.config.validation` reports it)."""
        if self.layer_kinds.strip():
            return tuple(parse_layer_kind(e) for e in self.layer_kinds.split(","))
        k, every = self.first_k_dense, self.moe_every
        return tuple(
            LayerKind(every > 0 and i >= k and (i - k) % every == every - 1)
            for i in range(self.num_layers)
        )

    @property
    def periodic(self) -> tuple[int, int] | None:
        """(first_k_dense, moe_every) when the layout is `first_k_dense` dense layers then
        periods of `moe_every` layers ending in MoE, all MoE layers alike (the stacks
        `dense_layers`, `moe_layers`, `moe_periods` of `moejax.models.transformer`); None for
        any other `layer_kinds` (stacked as runs)."""
        if not self.layer_kinds.strip():
            return self.first_k_dense, self.moe_every
        layout = self.layer_layout
        if any(kind.num_experts or kind.top_k for kind in layout):
            return None
        return periodic_layout([kind.moe for kind in layout])

    @property
    def layer_runs(self) -> tuple[tuple[LayerKind, int, int], ...]:
        """(kind, first layer, number of layers) of each run of identical consecutive layers."""
        runs: list[tuple[LayerKind, int, int]] = []
        for i, kind in enumerate(self.layer_layout):
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((kind, i, 1))
        return tuple(runs)

    @property
    def num_moe_layers(self) -> int:
        if not self.layer_kinds.strip():
            if self.moe_every == 0:
                return 0
            return (self.num_layers - self.first_k_dense) // self.moe_every
        return sum(kind.moe for kind in self.layer_layout)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based) has an MoE FFN."""
        return self.layer_layout[i].moe
