"""Causal multi-head attention with grouped-query heads (GQA), RoPE and packed segments.

GQA (Ainslie et al., 2023): `num_kv_heads` key/value heads shared by groups of
`num_heads / num_kv_heads` query heads. With sequence packing, a token attends only to
earlier tokens of its own segment (`segment_ids` equal); positions restart per segment.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.config import ModelConfig
from moejax.models.layers import dtype_of, logical_param, rotary_embedding


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """Boolean [B, 1, L, L]: causal and within the same packed segment."""
    length = segment_ids_BxL.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (causal[None] & same)[:, None]


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
                 positions_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        wq = logical_param(self, "wq", (d, h, hd), ("embed", "heads", "kv"), cfg.init_std, pdt)
        wk = logical_param(self, "wk", (d, kvh, hd), ("embed", "heads", "kv"), cfg.init_std, pdt)
        wv = logical_param(self, "wv", (d, kvh, hd), ("embed", "heads", "kv"), cfg.init_std, pdt)
        wo = logical_param(self, "wo", (h, hd, d), ("heads", "kv", "embed"), out_std, pdt)
        x = x_BxLxD.astype(dt)
        q = jnp.einsum("bld,dhk->blhk", x, wq.astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, wk.astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, wv.astype(dt))
        q = rotary_embedding(q, positions_BxL, cfg.rope_theta)
        k = rotary_embedding(k, positions_BxL, cfg.rope_theta)
        mask = attention_mask(segment_ids_BxL)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # GQA: kv heads are repeated
        return jnp.einsum("blhk,hkd->bld", out, wo.astype(dt))
