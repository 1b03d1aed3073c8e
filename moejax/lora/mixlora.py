"""MixLoRA: the dense FFN becomes a sparse MoE whose experts are the frozen FFN, each with its
own LoRA on gate/up/down (Li et al., 2024, "MixLoRA: Enhancing Large Language Models
Fine-Tuning with LoRA-based Mixture of Experts", arXiv 2404.15159; reference code
TUDB-Labs/MixLoRA).

    y = sum_{e in top-k} w_e FFN_e(x),  FFN_e(x) = (silu(g_e) * u_e) (W_down + s A^d_e B^d_e)
    g_e = x W_gate + s x A^g_e B^g_e,  u_e = x W_up + s x A^u_e B^u_e

The base products x W_gate and x W_up are computed once per token and shared by its experts
(as in the reference); the router is a moejax `LinearRouter` (softmax top-k, renormalised,
Switch balance loss) and the experts run through the moejax dispatchers. Because the top-k
weights sum to 1, y = FFN(x) + sum_e w_e (FFN_e(x) - FFN(x)), which is how it is computed:
with B = 0 every difference is 0 up to rounding (XLA may fuse the two silu evaluations of
a difference differently, ~1 ulp of the base output), so an untrained MixLoRA layer is the
base FFN to float precision rather than bit for bit.

Parameters (children of the MLP, contract of `moejax.lora.adapter`): `lora_router`
(kernel [d, E]), `lora_w_gate`, `lora_w_up`, `lora_w_down`, each `a[E, d_in, r]`,
`b[E, r, d_out]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora import collect
from moejax.lora.config import LoRAConfig
from moejax.lora.routing import router_config


class ExpertLoRAWeights(nn.Module):
    """`a[E, d_in, r]` (uniform +-1/sqrt(d_in)) and `b[E, r, d_out]` (zeros) of one
    projection's E experts."""

    num_experts: int
    rank: int
    d_in: int
    d_out: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self):
        from moejax.lora.adapter import _uniform_fan_in

        e, r, pdt = self.num_experts, self.rank, jnp.dtype(self.param_dtype)
        a = self.param(
            "a",
            nn.with_logical_partitioning(_uniform_fan_in, ("lora_experts", "lora_in", "lora_rank")),
            (e, self.d_in, r),
            pdt,
        )
        b = self.param(
            "b",
            nn.with_logical_partitioning(
                nn.initializers.zeros, ("lora_experts", "lora_rank", "lora_out")
            ),
            (e, r, self.d_out),
            pdt,
        )
        return a, b


def mixlora_mlp(
    module: nn.Module,
    cfg: LoRAConfig,
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    dtype,
) -> jax.Array:
    """The MixLoRA FFN of `x[..., d]` (module docstring); call in the MLP's compact method
    with its (frozen) weights already cast to the compute `dtype`."""
    from moejax.lora.adapter import lora_scale
    from moejax.moe.dispatch import dispatch
    from moejax.moe.experts import ExpertFn
    from moejax.moe.routers import LinearRouter

    lead, d, f = x.shape[:-1], x.shape[-1], w_gate.shape[-1]
    e, s = cfg.num_experts, lora_scale(cfg)
    moe_cfg = router_config(cfg, e)
    x = x.astype(dtype)
    x2 = x.reshape(-1, d)
    routing = LinearRouter(
        moe_cfg, param_dtype=module.param_dtype, expert_axis="lora_experts", name="lora_router"
    )(x2)
    collect.report(module.scope.path + ("lora_router",), routing.aux_losses, routing.metrics)
    weights = {}
    for name, d_in, d_out in (("gate", d, f), ("up", d, f), ("down", f, d)):
        a, b = ExpertLoRAWeights(
            e, cfg.rank, d_in, d_out, module.param_dtype, name=f"lora_w_{name}"
        )()
        weights[f"a_{name}"], weights[f"b_{name}"] = a.astype(dtype), b.astype(dtype)
    # The base FFN exactly as moejax.models.layers.DenseMLP computes it (same shapes, same
    # ops), so zero-initialised adapters give its output bit for bit.
    g0, u0 = x @ w_gate, x @ w_up
    y0 = (nn.silu(g0) * u0) @ w_down

    def fn(w, rows, mm):
        xi, g, u = rows[..., :d], rows[..., d : d + f], rows[..., d + f :]
        h0 = nn.silu(g) * u
        h = nn.silu(g + s * mm(mm(xi, w["a_gate"]), w["b_gate"])) * (
            u + s * mm(mm(xi, w["a_up"]), w["b_up"])
        )
        return (h - h0) @ w_down + s * mm(mm(h, w["a_down"]), w["b_down"])

    rows = jnp.concatenate([x2, g0.reshape(-1, f), u0.reshape(-1, f)], axis=-1)
    delta, _ = dispatch(rows, routing, ExpertFn(fn, weights), moe_cfg)
    return y0 + delta.astype(dtype).reshape(lead + (d,))
