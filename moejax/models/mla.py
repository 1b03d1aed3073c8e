"""Multi-head latent attention (MLA), DeepSeek-V2 (DeepSeek-AI, 2024, section 2.1) and V3.

Keys and values come from one low-rank latent per token, which is all a decoder caches:

    c_kv = RMSNorm(x W_kv_a[:, :r_kv])                     [B, L, r_kv]    (cached)
    k_rope = RoPE(x W_kv_a[:, r_kv:])                       [B, L, d_rope]  (cached; one head)
    [k_nope | v]_h = c_kv W_kv_b[:, h]                      per head: d_nope + d_v
    q_h = [q_nope | RoPE(q_rope)]_h,  q = RMSNorm(x W_q_a) W_q_b   (or x W_q, q_lora_rank = 0)
    o = sum_h softmax(q_h k_h^T / sqrt(d_nope + d_rope)) v_h W_o[h]
    k_h = [k_nope_h | k_rope]  (the decoupled rotary key is shared by all heads)

RoPE is the rotate-half layout of `moejax.nn.rotary.rotary_embedding`. DeepSeek's
checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... (`rope_interleave` in
transformers), which is rotate-half on the de-interleaved channels; `moejax.hf` permutes
the rotary columns of W_q / W_kv_a on import (and back on export), so the model needs no
flag. The two latent norms use eps 1e-6 as DeepSeek's code does (not `model.norm_eps`).
With `decode=True` the cache holds `c_kv` and `k_rope` only: (r_kv + d_rope) numbers per
token and layer instead of 2 * H * d_head.

Without a cache, `model.attention_impl` other than XLA (`resolve_impl`) runs
`moejax.models.attention_kernels.causal_attention` on per-head keys [k_nope_h | k_rope]
(the shared rotary key broadcast to every head) and values of width d_v; the XLA path is
the einsum below, which materialises the [B, H, L, L] scores.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.attention import cached
from moejax.models.attention_kernels import attention_mask, causal_attention, resolve_impl
from moejax.models.config import ModelConfig
from moejax.nn.norm import RMSNorm
from moejax.nn.params import dtype_of, logical_param
from moejax.nn.projection import project
from moejax.nn.rotary import rotary_embedding

LATENT_NORM_EPS = 1e-6
# The logical axis of the compressed latents (q_lora_rank, kv_lora_rank + the rotary key):
# not a head dimension, so not `kv`, which the per-head factor of the same weight names (a
# parameter cannot name one logical axis twice; replicated by DEFAULT_RULES).
LATENT = "latent"


class MLAttention(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    adapters: object = None  # adapters are not applied to MLA's projections (validation says so)

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        adapter_context: object = None,
    ) -> jax.Array:
        cfg = self.cfg
        d, h = cfg.d_model, cfg.num_heads
        nope, rope, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
        pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
        norm = dict(eps=LATENT_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = x_BxLxD.astype(dt)

        if rq:
            wq_a = logical_param(self, "wq_a", (d, rq), ("embed", LATENT), std, pdt)
            wq_b = logical_param(
                self, "wq_b", (rq, h, nope + rope), (LATENT, "heads", "kv"), std, pdt
            )
            q_latent = RMSNorm(**norm, name="q_norm")(project(x, wq_a.astype(dt)))
            q = project(q_latent, wq_b.astype(dt))
        else:
            wq = logical_param(self, "wq", (d, h, nope + rope), ("embed", "heads", "kv"), std, pdt)
            q = project(x, wq.astype(dt))
        q = jnp.concatenate(
            [q[..., :nope], rotary_embedding(q[..., nope:], positions_BxL, cfg.rope_theta)], -1
        )

        wkv_a = logical_param(self, "wkv_a", (d, rkv + rope), ("embed", LATENT), std, pdt)
        kv = project(x, wkv_a.astype(dt))
        latent = RMSNorm(**norm, name="kv_norm")(kv[..., :rkv])
        k_rope = rotary_embedding(kv[..., None, rkv:], positions_BxL, cfg.rope_theta)[:, :, 0]

        mask = None
        if self.decode:  # the compressed cache: latents and rotary keys, not per-head k/v
            prefix = getattr(adapter_context, "cache_prefix", "")
            full, mask = cached(self, {"latent": latent, "k_rope": k_rope}, prefix)
            latent, k_rope = full["latent"], full["k_rope"]
        kernel = resolve_impl(cfg.attention_impl) if mask is None else "xla"
        if mask is None and kernel == "xla":
            mask = attention_mask(segment_ids_BxL)

        wkv_b = logical_param(self, "wkv_b", (rkv, h, nope + dv), (LATENT, "heads", "kv"), std, pdt)
        kv_h = project(latent, wkv_b.astype(dt))
        k_nope, v = kv_h[..., :nope], kv_h[..., nope:]
        if kernel != "xla":  # blockwise: per-head keys, the rotary part shared by all heads
            k_rope_h = jnp.broadcast_to(k_rope[:, :, None], k_rope.shape[:2] + (h, rope))
            k = jnp.concatenate([k_nope, k_rope_h.astype(k_nope.dtype)], -1)
            out = causal_attention(q, k, v, segment_ids_BxL, kernel)
        else:
            scale = (nope + rope) ** -0.5
            scores = jnp.einsum("blhk,bshk->bhls", q[..., :nope], k_nope) + jnp.einsum(
                "blhk,bsk->bhls", q[..., nope:], k_rope
            )
            scores = jnp.where(mask, scores.astype(jnp.float32) * scale, -jnp.inf)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bhls,bshk->blhk", probs, v)
        wo = logical_param(self, "wo", (h, dv, d), ("heads", "kv", "embed"), out_std, pdt)
        return project(out, wo.astype(dt), contract=2)
