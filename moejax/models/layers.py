"""Small Transformer building blocks: RMSNorm, rotary embeddings, SwiGLU MLP, projections.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`)
that `moejax.sharding` maps to mesh axes; no module here names a mesh axis.
Parameters are stored in `param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.adapter import add_delta, is_target, lora_delta
from moejax.lora.config import LoRAConfig
from moejax.lora.mixlora import mixlora_mlp


def dtype_of(name: str):
    return jnp.dtype(name)


def logical_param(
    module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], std: float, param_dtype
) -> jax.Array:
    """A normal(std)-initialised parameter with logical axis names (`axes`, one per dim)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))
    return module.param(name, init, tuple(shape), param_dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019): x / rms(x) * scale, in float32."""

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


def rotary_embedding(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """RoPE (Su et al., 2021, "RoFormer") in the rotate-half layout used by Llama/GPT-NeoX.

    Channel pairs (i, i + D/2) rotate by angle `pos * theta^(-2i/D)`; computed in float32.
    """
    d = x_BxLxHxD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxLxHxD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxD.dtype)


class DenseMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer").

    y = (silu(x W_gate) * (x W_up)) W_down with W_gate, W_up: [d, f] and W_down: [f, d].
    Also the DeepSeekMoE shared experts: n_shared experts of width f_e are one MLP of width
    n_shared * f_e.
    """

    width: int
    init_std: float = 0.02
    out_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoRAConfig | None = None  # adapters on the targeted projections (moejax.lora)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        pdt, dt = dtype_of(self.param_dtype), dtype_of(self.dtype)
        std, out_std, f = self.init_std, self.out_std, self.width
        w_gate = logical_param(self, "w_gate", (d, f), ("embed", "mlp"), std, pdt)
        w_up = logical_param(self, "w_up", (d, f), ("embed", "mlp"), std, pdt)
        w_down = logical_param(self, "w_down", (f, d), ("mlp", "embed"), out_std, pdt)
        x = x.astype(dt)
        if (
            self.lora is not None
            and self.lora.method == "mixlora"
            and is_target(self.lora, self.name, "w_gate")
        ):  # the FFN becomes MixLoRA's MoE
            return mixlora_mlp(
                self, self.lora, x, w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt), dt
            )
        adapt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = add_delta(
            x @ w_gate.astype(dt), lora_delta(self, self.lora, "w_gate", x, (f,), **adapt)
        )
        up = add_delta(x @ w_up.astype(dt), lora_delta(self, self.lora, "w_up", x, (f,), **adapt))
        h = nn.silu(gate) * up
        return add_delta(
            h @ w_down.astype(dt), lora_delta(self, self.lora, "w_down", h, (d,), **adapt)
        )
