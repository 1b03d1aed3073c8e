"""`ModelConfig`: the `config.model` section (the Transformer's shape and numerics)."""

from __future__ import annotations

import dataclasses

from moejax.config_section import section_from_mapping

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("gqa", "mla")
ATTENTION_IMPLS = ("auto", "xla", "flash")  # moejax.models.attention_kernels
QK_NORMS = ("none", "head", "full")  # gqa: RMSNorm of queries and keys before RoPE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Transformer hyper-parameters.

    Layer layout: the first `first_k_dense` layers have a dense FFN; the remaining
    `num_layers - first_k_dense` layers come in periods of `moe_every` layers whose last layer
    is MoE and whose others are dense (`moe_every=1`: every remaining layer is MoE;
    `moe_every=0`: no MoE layer at all, a dense model).

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
    def num_moe_layers(self) -> int:
        if self.moe_every == 0:
            return 0
        return (self.num_layers - self.first_k_dense) // self.moe_every

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based) has an MoE FFN."""
        if self.moe_every == 0 or i < self.first_k_dense:
            return False
        return (i - self.first_k_dense) % self.moe_every == self.moe_every - 1
