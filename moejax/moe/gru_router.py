"""RMoE's layerwise recurrent router: "Layerwise Recurrent Router for Mixture-of-Experts"
(Qiu et al., 2024, arXiv 2408.06793, eq. 4-6), following the reference code (qiuzh20/RMoE,
`llama_moe_rnn/`).

At MoE layer i, with hidden states x_i[T, d] and the routing state h_{i-1}[T, h]:

    u_i = x_i W1_i                        per-layer projection d_model -> h
    h_i = GRUCell(u_i, h_{i-1})           one cell, input and hidden size h
    logits_i = h_i W2_i                   per-layer projection h -> E

then the selection rule `config.moe.selection` from `moejax.moe.selection` (softmax top-k
with renormalisation in RMoE; top-p, DeepSeek-V3's sigmoid_bias with its per-expert bias, or
any other rule). This scorer is `config.moe.scorer="gru"`. The first MoE layer starts from
h_0 = 0 (PyTorch's GRUCell without a hidden state).
As in the reference code the cell is created once at the model level and shared by every MoE
layer (`gru_shared=True`; the Transformer passes it in as `shared`); `gru_shared=False`
gives each layer its own. Gradients flow through the recurrence, so layer i's router is
trained by the losses of every later layer (the paper's Table 5 finds detaching worse);
`gru_detach=True` stops them, as that ablation.

The cell is PyTorch's GRU (and the reference code's `CustomGRUCell`), with biases on both
the input and the hidden products:

    r = sigmoid(u W_ir + b_ir + h W_hr + b_hr)
    z = sigmoid(u W_iz + b_iz + h W_hz + b_hz)
    n = tanh(u W_in + b_in + r * (h W_hn + b_hn))
    h' = (1 - z) * n + z * h

Weights start at N(0, init_std^2) like the reference code; biases at zero. Everything in
the router runs in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.router_delta import apply_logits, read_router_delta
from moejax.moe.routing import Routing
from moejax.moe.selection import SELECTIONS, report_bias_load, selection_bias
from moejax.nn.params import dtype_of, logical_param

CellParams = dict[str, jax.Array]


class GRUCell(nn.Module):
    """Holds the GRU parameters and returns them, so one cell created at the model level can
    be handed to every scanned layer: `w_i[h, 3h]`, `w_h[h, 3h]`, `b_i[3h]`, `b_h[3h]`, the
    three column blocks being the r, z and n gates."""

    hidden: int
    init_std: float = 0.02
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self) -> CellParams:
        h, pdt = self.hidden, dtype_of(self.param_dtype)
        params = {
            name: logical_param(self, name, (h, 3 * h), (None, None), self.init_std, pdt)
            for name in ("w_i", "w_h")
        }
        for name in ("b_i", "b_h"):
            params[name] = self.param(
                name, nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (3 * h,), pdt
            )
        return params


def gru_cell(params: CellParams, u: jax.Array, h: jax.Array) -> jax.Array:
    """One GRU update (PyTorch convention, equations in the module docstring), float32."""
    f32 = {k: v.astype(jnp.float32) for k, v in params.items()}
    gi = u @ f32["w_i"] + f32["b_i"]
    gh = h @ f32["w_h"] + f32["b_h"]
    ir, iz, i_n = jnp.split(gi, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(ir + hr)
    z = jax.nn.sigmoid(iz + hz)
    n = jnp.tanh(i_n + r * hn)
    return (1.0 - z) * n + z * h


class GRURouter(nn.Module):
    """RMoE router (see the module docstring). `state` is h_{i-1}[T, gru_dim] (None = zeros);
    the returned Routing carries h_i. Without a `shared` cell (a layer used on its own, or
    `gru_shared=False`) the router owns one."""

    cfg: MoEConfig
    init_std: float = 0.02
    param_dtype: str = "float32"

    @nn.compact
    def __call__(
        self,
        x_TxD: jax.Array,
        state=None,
        mask_T: jax.Array | None = None,
        shared: Any = None,
        seq_len: int | None = None,
    ) -> Routing:
        cfg, h, pdt = self.cfg, self.cfg.gru_dim, dtype_of(self.param_dtype)
        w1 = logical_param(self, "proj", (x_TxD.shape[-1], h), ("embed", None), self.init_std, pdt)
        u = x_TxD.astype(jnp.float32) @ w1.astype(jnp.float32)
        cell = (
            shared
            if shared is not None
            else GRUCell(h, self.init_std, self.param_dtype, name="gru")()
        )
        if state is None:
            state = jnp.zeros((x_TxD.shape[0], h), jnp.float32)
        if cfg.gru_detach:
            state = jax.lax.stop_gradient(state)
        new_state = gru_cell(cell, u, state.astype(jnp.float32))
        w2 = logical_param(
            self, "kernel", (h, cfg.num_experts), (None, "expert"), self.init_std, pdt
        )
        logits = new_state @ w2.astype(jnp.float32)
        bias = selection_bias(self, cfg)
        rule = SELECTIONS[cfg.selection]
        delta = read_router_delta(self, cfg.num_experts)
        if delta is None:
            routing = rule(logits, mask_T, cfg, bias, seq_len)
        else:
            routing = rule(apply_logits(logits, delta), mask_T, cfg, bias, seq_len, delta.ranks)
        report_bias_load(self, bias, routing.metrics["load"])
        return routing.replace(state=new_state)
