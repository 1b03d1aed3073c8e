"""Rotary position embeddings (Su et al., 2021, "RoFormer"), rotate-half layout (Llama,
GPT-NeoX): channel pairs (i, i + D/2) rotate by the angle `pos * theta^(-2i/D)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_embedding(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """RoPE of `x[B, L, H, D]` at `positions[B, L]`, computed in float32."""
    d = x_BxLxHxD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxLxHxD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxD.dtype)
