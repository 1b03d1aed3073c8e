"""SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer").

    y = (silu(x W_gate) * (x W_up)) W_down,   W_gate, W_up: [d, f],  W_down: [f, d]

Also the DeepSeekMoE shared experts: n_shared experts of width f_e are one MLP of width
n_shared * f_e. Adapters (`adapters`, `moejax.nn.adapter_hook`) may add a low-rank delta to
each projection or replace the whole MLP (MixLoRA).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from moejax.nn.adapter_hook import AdapterContext, AdapterHook, add_delta, projection_delta
from moejax.nn.params import dtype_of, logical_param
from moejax.nn.projection import project


class DenseMLP(nn.Module):
    width: int
    init_std: float = 0.02
    out_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapters: AdapterHook | None = None

    @nn.compact
    def __call__(self, x: jax.Array, adapter_context: AdapterContext | None = None) -> jax.Array:
        d = x.shape[-1]
        pdt, dt = dtype_of(self.param_dtype), dtype_of(self.dtype)
        std, out_std, f = self.init_std, self.out_std, self.width
        w_gate = logical_param(self, "w_gate", (d, f), ("embed", "mlp"), std, pdt)
        w_up = logical_param(self, "w_up", (d, f), ("embed", "mlp"), std, pdt)
        w_down = logical_param(self, "w_down", (f, d), ("mlp", "embed"), out_std, pdt)
        x = x.astype(dt)
        weights = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
        if self.adapters is not None:
            replaced = self.adapters.replace_mlp(self, x, weights, adapter_context, dt)
            if replaced is not None:
                return replaced

        def delta(param, inputs, out):
            return projection_delta(
                self,
                self.adapters,
                param,
                inputs,
                out,
                adapter_context,
                self.dtype,
                self.param_dtype,
            )

        gate = add_delta(project(x, weights[0]), delta("w_gate", x, (f,)))
        up = add_delta(project(x, weights[1]), delta("w_up", x, (f,)))
        h = nn.silu(gate) * up
        return add_delta(project(h, weights[2]), delta("w_down", h, (d,)))
