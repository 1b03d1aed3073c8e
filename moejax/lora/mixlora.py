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

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig
from moejax.lora.method import LoRAMethod, report_routing, require
from moejax.lora.routing import router_config
from moejax.lora.targets import is_target
from moejax.lora.weights import ExpertLoRAWeights, lora_scale
from moejax.moe.dispatch import dispatch
from moejax.moe.experts import ExpertFn
from moejax.moe.routers import LinearRouter
from moejax.nn.projection import project


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
    lead, d, f = x.shape[:-1], x.shape[-1], w_gate.shape[-1]
    e, s = cfg.num_experts, lora_scale(cfg)
    moe_cfg = router_config(cfg, e)
    x = x.astype(dtype)
    x2 = x.reshape(-1, d)
    routing = LinearRouter(
        moe_cfg,
        param_dtype=module.param_dtype,
        expert_axis="lora_experts",
        read_delta=False,
        name="lora_router",
    )(x2)
    report_routing(module, routing, routing.aux_losses)
    weights = {}
    for name, d_in, d_out in (("gate", d, f), ("up", d, f), ("down", f, d)):
        a, b = ExpertLoRAWeights(
            e, cfg.rank, d_in, d_out, module.param_dtype, name=f"lora_w_{name}"
        )()
        weights[f"a_{name}"], weights[f"b_{name}"] = a.astype(dtype), b.astype(dtype)
    # The base FFN exactly as moejax.nn.mlp.DenseMLP computes it (same shapes, same ops), so
    # zero-initialised adapters give its output bit for bit.
    g0, u0 = project(x, w_gate), project(x, w_up)
    y0 = project(nn.silu(g0) * u0, w_down)

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


class MixLoRA(LoRAMethod):
    """`mixlora`: targeted MLPs become MixLoRA's MoE (module docstring); the attention
    projections it targets get plain LoRA."""

    def check(self, cfg):
        require(
            not cfg.expert_counts,
            f"lora.layer_experts={cfg.layer_experts!r} needs lora.method='moe' (MoLA routes "
            f"each layer's experts); method={cfg.method!r}.",
        )
        require(
            cfg.router == "softmax_topk" and cfg.renormalize and cfg.dispatcher != "none",
            f"lora.method='mixlora' routes with lora.router='softmax_topk', renormalize=True "
            f"(the FFN is the weighted mean of its experts) and a MoE dispatcher "
            f"(lora.dispatcher='auto'); got router={cfg.router!r}, renormalize="
            f"{cfg.renormalize}, dispatcher={cfg.dispatcher!r}.",
        )

    def adapter_config(self, cfg: LoRAConfig) -> LoRAConfig:
        return dataclasses.replace(cfg, method="lora", num_experts=1, top_k=1)

    def replace_mlp(self, module, cfg, x, weights, context, dtype):
        if not is_target(cfg, module.name, "w_gate"):
            return None
        return mixlora_mlp(module, cfg, x, *weights, dtype)
