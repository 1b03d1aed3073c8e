"""The physical expert layout of an MoE layer: which stored row holds which expert.

Hecate's heterogeneous sharding (Qing et al., 2025, "Hecate: Unlocking Efficient Sparse Model
Training via Fully Sharded Sparse Data Parallelism", arXiv 2502.02581): the experts a device
owns (stores, with their optimizer state) are not a fixed block but are chosen, every few
hundred iterations, from the observed loads, so that hot experts share a device with cold
ones and the owners start each step near balance before any replica is placed.

Here the routed experts' weights `[E, ...]` are stored in *physical row* order: row r holds
expert `row_expert[r]`, and under the `expert` mesh axis of P devices device p owns rows
`[p E/P, (p + 1) E/P)` as before. The routers keep choosing *logical* experts (their weights,
biases, losses and metrics are indexed by expert id, never by row); the layer translates the
chosen ids to rows (`row_of[expert_ids]`) just before dispatch, so every dispatcher, the
sharded ones included, runs unchanged on rows, and the layer computes exactly the same
function whatever the layout. The identity layout (`row_expert = arange(E)`, the layout at
initialisation) is the plain one.

The layout is the non-trainable `expert_layout` collection (`moejax.nn.collections`), per MoE
layer (stacked over scanned layers like the parameters):

- `row_expert` int32[E]: the expert stored in each row (a permutation of 0..E-1);
- `window_load` float32[E]: each expert's load summed over the steps since the last
  re-layout (the `load` routing metric, a fraction of the step's assignments), sown as the
  `layout_load` side output and added after each step (`moejax.train.state_rules`).

Every `moe.fssdp_reshard_every` steps the trainer re-lays out the state outside the jitted
step from `window_load` (`moejax.train.expert_relayout`). It exists for the `fssdp` dispatcher
with `moe.fssdp_reshard_every > 0` (`uses_layout`); other models have no such collection.
Variables without it (imported from Hugging Face, edited by `moejax.compress`, or saved
before the layout existed) are in id order: the layer runs them as the identity, and the
trainer's restore starts them from `identity_layout`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.routing import Routing
from moejax.nn.collections import EXPERT_LAYOUT, LAYOUT_LOAD, sow_value

ROW_EXPERT = "row_expert"
WINDOW_LOAD = "window_load"


def uses_layout(cfg: MoEConfig) -> bool:
    """Whether MoE layers of this config keep an `expert_layout` (re-sharded fssdp)."""
    return cfg.dispatcher == "fssdp" and cfg.fssdp_reshard_every > 0


def row_of(row_expert: jax.Array) -> jax.Array:
    """The inverse permutation of `row_expert[E]`: `row_of[e]` is the row storing expert e."""
    rows = jnp.arange(row_expert.shape[0], dtype=jnp.int32)
    return jnp.zeros_like(rows).at[row_expert].set(rows)


def identity_layout(abstract: Any) -> Any:
    """The identity layout of the shapes (and shardings) of an `expert_layout` tree:
    `row_expert = arange(E)` (broadcast over stacked layers), `window_load = 0`."""

    def one(path, a):
        sharding = getattr(a, "sharding", None)
        if path[-1].key == ROW_EXPERT:
            value = jnp.broadcast_to(jnp.arange(a.shape[-1], dtype=a.dtype), a.shape)
        else:
            value = jnp.zeros(a.shape, a.dtype)
        return value if sharding is None else jax.device_put(value, sharding)

    return jax.tree_util.tree_map_with_path(one, abstract)


def physical_routing(module, cfg: MoEConfig, routing: Routing) -> Routing:
    """`routing` with its expert ids translated to rows of the layer's layout (declared in
    `module`'s scope at init, the identity), and the step's load sown for the window.
    Returns `routing` unchanged when the config keeps no layout, or when the variables
    applied have none (weights imported or edited in id order: the identity)."""
    if not uses_layout(cfg):
        return routing
    if not module.is_initializing() and not module.has_variable(EXPERT_LAYOUT, ROW_EXPERT):
        return routing
    e = cfg.num_experts
    row_expert = module.variable(
        EXPERT_LAYOUT, ROW_EXPERT, lambda: jnp.arange(e, dtype=jnp.int32)
    ).value
    module.variable(EXPERT_LAYOUT, WINDOW_LOAD, lambda: jnp.zeros((e,), jnp.float32))
    sow_value(module, LAYOUT_LOAD, WINDOW_LOAD, routing.metrics["load"].astype(jnp.float32))
    return routing.replace(expert_ids=row_of(row_expert)[routing.expert_ids])
