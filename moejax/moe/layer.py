"""`MoELayer` = router + dispatcher + routed experts (+ DeepSeekMoE shared experts).

y = sum_{j<k} g_{t,j} E_{e_{t,j}}(x_t) + SharedMLP(x_t)   (DeepSeekMoE, Dai et al., 2024, eq. 9)

With `shared_gate` (Qwen2-MoE, Qwen Team, 2024) the shared term is
`sigmoid(x_t . w_gate) * SharedMLP(x_t)`, and `d_shared` sets its width.

Input `x[B, L, d]` is flattened to T = B*L tokens for routing and dispatch. Returns an
`MoEOutput`: the layer output, the router state for the next MoE layer, the weighted aux
losses, the metrics, and per-token routing decisions for analysis: `top1_expert`,
`experts_per_token` and `router_entropy` `[B, L]`, `expert_ids` and `combine_weights`
`[B, L, k]` (what `moejax.analysis.trace` records; a step that does not return them never
computes them: jit drops unused outputs). These, the router and its metrics name logical
experts; only the dispatch sees the rows they are stored in (`moejax.moe.expert_layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import dispatch
from moejax.moe.expert_layout import physical_routing, stored_rows
from moejax.moe.experts import RoutedExperts
from moejax.moe.routers import ROUTERS
from moejax.nn.adapter_hook import AdapterContext, AdapterHook
from moejax.nn.mlp import DenseMLP
from moejax.nn.params import dtype_of, logical_param


def shared_width(cfg: MoEConfig) -> int:
    """Width of the shared-expert MLP (0 when there is none)."""
    if not cfg.n_shared:
        return 0
    return cfg.d_shared or cfg.n_shared * cfg.d_expert


@flax.struct.dataclass
class MoEOutput:
    """What one MoE layer returns.

    y: [B, L, d]; router_state: the state for the next MoE layer's router (None for stateless
    routers); aux_losses: name -> scalar, already weighted; metrics: name -> array (logged);
    per_token: `top1_expert` and `experts_per_token` int32[B, L], `router_entropy`
    float32[B, L], `expert_ids` int32[B, L, k] and `combine_weights` float32[B, L, k] (in
    the router's rank order; weight 0 = slot unused).
    """

    y: jax.Array
    router_state: Any
    aux_losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    per_token: dict[str, jax.Array]


class MoELayer(nn.Module):
    cfg: MoEConfig
    # The model section (`moejax.models.config.ModelConfig`): its init_std, num_layers, dtype
    # and param_dtype, read by attribute so that moe/ does not import models/.
    model: Any
    # adapters on the shared experts ("shared.*") and the routed ones ("experts.*")
    adapters: AdapterHook | None = None

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        router_state: Any = None,
        mask_BxL: jax.Array | None = None,
        shared_router: Any = None,
        adapter_context: AdapterContext | None = None,
    ) -> MoEOutput:
        cfg, m = self.cfg, self.model
        b, length, d = x_BxLxD.shape
        x = x_BxLxD.reshape(b * length, d)
        mask = None if mask_BxL is None else mask_BxL.reshape(b * length)
        out_std = m.init_std / (2 * m.num_layers) ** 0.5
        routing = ROUTERS[cfg.scorer](
            cfg, init_std=m.init_std, param_dtype=m.param_dtype, name="router"
        )(x, router_state, mask, shared_router, length)
        expert_fn = RoutedExperts(
            cfg.num_experts,
            d,
            cfg.d_expert,
            m.init_std,
            out_std,
            m.dtype,
            m.param_dtype,
            self.adapters,
            cfg.fuse_gate_up,
            stored_rows(cfg),
            name="experts",
        )()
        # Experts are stored in the layer's physical row order (moejax.moe.expert_layout),
        # dispatched over its rows.
        rows_routing, rows = physical_routing(self, cfg, routing)
        rows_cfg = cfg if rows == cfg.num_experts else dataclasses.replace(cfg, num_experts=rows)
        y, dispatch_metrics = dispatch(x, rows_routing, expert_fn, rows_cfg)
        if cfg.n_shared:
            shared = DenseMLP(
                shared_width(cfg),
                m.init_std,
                out_std,
                m.dtype,
                m.param_dtype,
                self.adapters,
                name="shared",
            )(x, adapter_context)
            if cfg.shared_gate:  # Qwen2-MoE: sigmoid(x . w_gate) scales the shared output
                w = logical_param(
                    self, "shared_gate", (d,), ("embed",), m.init_std, dtype_of(m.param_dtype)
                )
                dt = dtype_of(m.dtype)
                shared = jax.nn.sigmoid(x.astype(dt) @ w.astype(dt))[:, None] * shared
            y = y + shared
        k = routing.expert_ids.shape[-1]
        entropy = routing.token_entropy
        per_token = {
            "top1_expert": routing.expert_ids[:, 0].reshape(b, length),
            "experts_per_token": jnp.sum(
                routing.combine_weights > 0, axis=-1, dtype=jnp.int32
            ).reshape(b, length),
            "expert_ids": routing.expert_ids.reshape(b, length, k),
            "combine_weights": routing.combine_weights.astype(jnp.float32).reshape(b, length, k),
            "router_entropy": (
                jnp.full((b, length), jnp.nan, jnp.float32)
                if entropy is None
                else entropy.astype(jnp.float32).reshape(b, length)
            ),
        }
        return MoEOutput(
            y=y.reshape(b, length, d),
            router_state=routing.state,
            aux_losses=routing.aux_losses,
            metrics={**routing.metrics, **dispatch_metrics},
            per_token=per_token,
        )
