"""The physical expert layout of an MoE layer: which stored row holds which expert.

Hecate's heterogeneous sharding (Qing et al., 2025, "Hecate: Unlocking Efficient Sparse Model
Training via Fully Sharded Sparse Data Parallelism", arXiv 2502.02581): the experts a device
owns (stores, with their optimizer state) are not a fixed block but are chosen, every few
hundred iterations, from the observed loads, so that hot experts share a device with cold
ones and the owners start each step near balance before any replica is placed.

Here the routed experts' weights `[R, ...]` are stored in *physical row* order: row r holds
expert `row_expert[r]` (-1: an empty row), and under the `expert` mesh axis of P devices
device p owns rows `[p R/P, (p + 1) R/P)`. R is the number of experts E plus
`moe.fssdp_spare_rows` (`stored_rows`): with no spare rows every device owns E/P experts;
with spare rows it owns 0..R/P, the memory bound, as a re-layout assigns them. The routers
keep choosing *logical* experts (their weights, biases, losses and metrics are indexed by
expert id, never by row); the layer translates the chosen ids to rows (`row_of[expert_ids]`)
just before dispatch, and dispatches over R rows (an empty row gets no tokens), so every
dispatcher, the sharded ones included, runs unchanged on rows, and the layer computes exactly
the same function whatever the layout.

The layout at initialisation (`initial_row_expert`) spreads the experts over the rows: expert
e in row `floor(e R / E)`, so that for any P dividing R the devices start with E/P experts
each (the identity when R = E). The routed weights are drawn as `[E, ...]` and scattered into
those rows (`spread_init`), so a model with spare rows starts from the same logical weights
as one without, and empty rows stay zero (as do their gradients and Adam moments).

The layout is the non-trainable `expert_layout` collection (`moejax.nn.collections`), per MoE
layer (stacked over scanned layers like the parameters):

- `row_expert` int32[R]: the expert stored in each row (every expert exactly once; -1 for
  the R - E empty rows);
- `window_load` float32[E]: each expert's load summed over the steps since the last
  re-layout (the `load` routing metric, a fraction of the step's assignments), sown as the
  `layout_load` side output and added after each step (`moejax.train.state_rules`).

Every `moe.fssdp_reshard_every` steps the trainer re-lays out the state outside the jitted
step from `window_load` (`moejax.train.expert_relayout`). It exists for the `fssdp` dispatcher
with `moe.fssdp_reshard_every > 0` (`uses_layout`); other models have no such collection.
Variables without it (imported from Hugging Face, edited by `moejax.compress`, read back by
`moejax.load_run`, or saved before the layout existed) are E rows in id order: the layer
runs them as the identity, and the trainer's restore starts them from `initial_layout`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax.moe.config import MoEConfig
from moejax.moe.routing import Routing
from moejax.nn.collections import EXPERT_LAYOUT, LAYOUT_LOAD, sow_value

ROW_EXPERT = "row_expert"
WINDOW_LOAD = "window_load"
EMPTY = -1  # `row_expert` of a row that holds no expert
EXPERTS = "experts"  # the routed experts' module name inside an MoE layer (`MoELayer`)


def uses_layout(cfg: MoEConfig) -> bool:
    """Whether MoE layers of this config keep an `expert_layout` (re-sharded fssdp)."""
    return cfg.dispatcher == "fssdp" and cfg.fssdp_reshard_every > 0


def stored_rows(cfg: MoEConfig) -> int:
    """R, the expert rows an MoE layer of this (per-layer) config stores."""
    return cfg.num_experts + (cfg.fssdp_spare_rows if uses_layout(cfg) else 0)


def initial_rows(num_experts: int, num_rows: int) -> np.ndarray:
    """int32[E]: the row of each expert in the initial layout, `floor(e R / E)`."""
    return (np.arange(num_experts, dtype=np.int64) * num_rows // num_experts).astype(np.int32)


def initial_row_expert(num_experts: int, num_rows: int) -> np.ndarray:
    """int32[R]: the initial `row_expert` (module docstring), -1 in the empty rows."""
    out = np.full((num_rows,), EMPTY, np.int32)
    out[initial_rows(num_experts, num_rows)] = np.arange(num_experts, dtype=np.int32)
    return out


def spread_init(init, num_experts: int):
    """The initializer `init` drawn for E experts (`[E, ...]`) and scattered into the
    initial rows of the requested `[R, ...]` shape; empty rows zero."""

    def spread(key, shape, dtype=jnp.float32):
        drawn = init(key, (num_experts,) + tuple(shape[1:]), dtype)
        if shape[0] == num_experts:
            return drawn
        rows = jnp.asarray(initial_rows(num_experts, shape[0]))
        return jnp.zeros(shape, drawn.dtype).at[rows].set(drawn)

    return spread


def row_of(row_expert: jax.Array, num_experts: int) -> jax.Array:
    """int32[E], the inverse of `row_expert[R]`: `row_of[e]` is the row storing expert e."""
    rows = jnp.arange(row_expert.shape[0], dtype=jnp.int32)
    experts = jnp.where(row_expert >= 0, row_expert, num_experts)  # empty rows: dropped
    return jnp.zeros((num_experts,), jnp.int32).at[experts].set(rows, mode="drop")


def initial_layout(abstract: Any) -> Any:
    """The initial layout of the shapes (and shardings) of an `expert_layout` tree (one
    `{row_expert[..., R], window_load[..., E]}` per layer stack): `initial_row_expert`
    broadcast over stacked layers, `window_load = 0`. With R = E, the identity."""
    flat = traverse_util.flatten_dict(abstract)
    out = {}
    for key, a in flat.items():
        if key[-1] == ROW_EXPERT:
            e = flat[key[:-1] + (WINDOW_LOAD,)].shape[-1]
            value = jnp.broadcast_to(jnp.asarray(initial_row_expert(e, a.shape[-1])), a.shape)
        else:
            value = jnp.zeros(a.shape, a.dtype)
        sharding = getattr(a, "sharding", None)
        out[key] = value if sharding is None else jax.device_put(value, sharding)
    return traverse_util.unflatten_dict(out)


def logical_layout(abstract: Any) -> Any:
    """The shapes of an `expert_layout` tree in id order: each `row_expert[..., R]` as
    `[..., E]` (the shape of its `window_load`), placed like it."""
    flat = traverse_util.flatten_dict(abstract)
    out = {}
    for key, a in flat.items():
        if key[-1] == ROW_EXPERT:
            shape = flat[key[:-1] + (WINDOW_LOAD,)].shape
            a = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=getattr(a, "sharding", None))
        out[key] = a
    return traverse_util.unflatten_dict(out)


def physical_routing(module, cfg: MoEConfig, routing: Routing) -> tuple[Routing, int]:
    """`(routing, rows)`: `routing` with its expert ids translated to rows of the layer's
    layout (declared in `module`'s scope at init, `initial_row_expert`), and the number of
    rows to dispatch over; the step's load is sown for the window. Returns `routing`
    unchanged and E rows when the config keeps no layout, or when the variables applied
    have none (weights imported or read back in id order: the identity)."""
    e = cfg.num_experts
    if not uses_layout(cfg):
        return routing, e
    if not module.is_initializing() and not module.has_variable(EXPERT_LAYOUT, ROW_EXPERT):
        return routing, e
    r = stored_rows(cfg)
    row_expert = module.variable(
        EXPERT_LAYOUT, ROW_EXPERT, lambda: jnp.asarray(initial_row_expert(e, r))
    ).value
    module.variable(EXPERT_LAYOUT, WINDOW_LOAD, lambda: jnp.zeros((e,), jnp.float32))
    sow_value(module, LAYOUT_LOAD, WINDOW_LOAD, routing.metrics["load"].astype(jnp.float32))
    ids = row_of(row_expert, e)[routing.expert_ids]
    return routing.replace(expert_ids=ids), row_expert.shape[0]
