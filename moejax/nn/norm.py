"""RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"):
y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.nn.params import dtype_of


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), dtype_of(self.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(dtype_of(self.dtype))
