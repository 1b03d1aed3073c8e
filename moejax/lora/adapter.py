"""Low-rank adapters on a frozen projection: LoRA (Hu et al., 2021, arXiv 2106.09685).

    y = x W + s * (x A) B,   A: [d_in, r],  B: [r, d_out],  s = alpha / r

Parameter contract (`moejax.lora.targets`; what training, checkpoints, merging and the peft
import rely on): the
adapter of projection `<param>` of module `<module>` is the child module `lora_<param>` of
that module, holding `a[E, d_in, r]` and `b[E, r, d_out]` (E = 1 for plain LoRA; d_in and
d_out are the projection's flattened input and output sizes, e.g. `attn.wq[d, H, D]` has
d_in = d and d_out = H * D in (head, dim) order). Every adapter leaf therefore has a path
component starting with `lora_` (`is_adapter_path`), and the base parameters keep exactly
the names and shapes of the model without adapters.

What differs between methods (the gates, A, the mixing) is asked of the method's class
(`moejax.lora.methods.METHODS`). Routed adapters sow their weighted aux losses and scalar
routing metrics into `adapter_aux` / `adapter_metrics` (`moejax.nn.collections`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig
from moejax.lora.method import report_routing
from moejax.lora.methods import method_of
from moejax.lora.routing import cv_squared_loss
from moejax.lora.weights import AXES_A, AXES_B, frozen_weight, lora_scale, uniform_fan_in, zero_b
from moejax.nn.adapter_hook import AdapterContext


class LoRAAdapter(nn.Module):
    """`delta(x[..., d_in]) -> [..., d_out]`: the low-rank update of one projection,
    `s * B (expand(g, r) * A x)` with E experts of rank r on the rank axis.

    Variables (all under this module, `lora_<param>`): `a[E, d_in, r]` (`[1, d_in, r]` with
    `shared_a`), `b[E, r, d_out]` (zeros; both in `lora_frozen` with `frozen_experts`), and
    what the method adds (a `router`, a bias in
    `lora_bias`, SoRA's `gate[r]`).
    """

    cfg: LoRAConfig
    d_out: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, context: AdapterContext | None = None) -> jax.Array:
        cfg, d_in, lead = self.cfg, x.shape[-1], x.shape[:-1]
        method = method_of(cfg)
        e, r = cfg.num_experts, cfg.rank
        pdt, dt = jnp.dtype(self.param_dtype), jnp.dtype(self.dtype)
        shape_a, shape_b = (1 if cfg.shared_a else e, d_in, r), (e, r, self.d_out)
        if cfg.frozen_experts:  # loaded experts: a and b in `lora_frozen`, the gates train
            a = frozen_weight(self, "a", uniform_fan_in, shape_a, pdt, AXES_A)
            b = frozen_weight(self, "b", nn.initializers.zeros, shape_b, pdt, AXES_B)
        else:
            a = method.make_a(self, cfg, shape_a, pdt)
            b = zero_b(self, shape_b, pdt)
        x2 = x.reshape(-1, d_in).astype(dt)
        a, b = a.astype(dt), b.astype(dt)
        # h = A x for every expert: [T, E_a, r] (one matmul over the concatenated ranks).
        h = (x2 @ a.transpose(1, 0, 2).reshape(d_in, -1)).reshape(x2.shape[0], -1, r)
        # Padding tokens (segment id 0) take no part in the routers' losses and statistics.
        mask = None if context is None else context.token_mask
        mask = None if mask is None or mask.size != x2.shape[0] else mask.reshape(-1)
        gates, routing = method.gates(self, cfg, x2, h, mask, context)
        if routing is not None:
            aux = dict(routing.aux_losses)
            if cfg.cv_coef:
                aux["cv_squared"] = cfg.cv_coef * cv_squared_loss(gates)
            report_routing(self, routing, aux)
        h = method.gate_ranks(self, h, pdt, dt)
        y = lora_scale(cfg) * method.mix(cfg, x2, h, gates, routing, a, b)
        return y.reshape(lead + (self.d_out,))
