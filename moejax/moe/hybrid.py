"""The `hybrid` dispatch plan: capacity buffers for most assignments, a tile loop for the rest.

XLA:CPU runs a matmul inside a loop on one thread, and a batched matmul outside a loop on
every core. Measured on a 2-core CPU (jax 0.10.2, float32, 49,152 rows x 512 -> 256, 64
experts): one dense matmul 144 ms, a batched matmul over `[64, 768, 512]` 146 ms, the same
rows as 192 tile matmuls in a `fori_loop` 299 ms, with two independent matmuls per
iteration 321 ms. A grouped matmul that loops over tiles (`moejax.moe.grouped_matmul`)
therefore runs the routed experts at half the dense speed on CPU, whatever its tile.

This plan runs most assignments outside any loop. Every expert takes its first
C = ceil(hybrid_capacity_factor * T * k / E) assignments (rounded up to a multiple of 8)
into GShard capacity buffers `[E, C, d]` (Lepikhin et al., 2020), one batched matmul per
projection. The assignments past C, which GShard drops, go through a loop over row tiles
that runs the whole expert function on each tile. The loop gathers its rows from the tokens,
multiplies by the combine weights, and scatter-adds into the output, so its cost follows the
overflow only: no `[T*k, d]` buffer exists. The tiles come from the MegaBlocks grouped-matmul
plan (Gale et al., 2022) over the expert-sorted assignments, with each expert's first C rows
skipped. No assignment is dropped.

The index moves are custom VJPs whose transposes are gathers too (XLA:CPU runs scatter-adds
several times slower). The loop's backward runs each tile's expert function again under
`jax.vjp` (its residuals are never stored, so the loop costs one extra forward of the
overflow rows), with the function's closed-over arrays made explicit by
`jax.closure_convert`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moejax.moe.experts import ExpertFn
from moejax.moe.grouped_matmul import TilePlan, make_tile_plan, tile_window
from moejax.moe.permute import sort_by_expert, unpermute


def head_capacity(rows: int, num_experts: int, factor: float) -> int:
    """Buffer rows per expert: ceil(factor * rows / E), rounded up to a multiple of 8."""
    c = math.ceil(factor * rows / num_experts)
    return -(-c // 8) * 8


class Layout(NamedTuple):
    """Where every (token, choice) assignment a = t * k + j goes.

    slot[T, k]: its buffer slot e * C + rank, or E * C when it is past C (or unused);
    slot_assign[E * C]: the assignment in each slot, T * k when the slot is empty;
    order[T * k], inverse[T * k]: the expert sort of the assignments (`sort_by_expert`);
    plan: row tiles over the sorted assignments past each expert's first C.
    """

    slot: jax.Array
    slot_assign: jax.Array
    order: jax.Array
    inverse: jax.Array
    plan: TilePlan


def make_layout(
    expert_ids: jax.Array, used: jax.Array, num_experts: int, cap: int, tile: int
) -> Layout:
    t, k = expert_ids.shape
    m = t * k
    order, inverse, sizes = sort_by_expert(expert_ids, num_experts, used)
    expert = jnp.where(used.reshape(-1), expert_ids.reshape(-1), num_experts)
    starts = jnp.cumsum(sizes) - sizes
    rank = inverse - jnp.concatenate([starts, jnp.zeros((1,), jnp.int32)])[expert]
    in_head = (expert < num_experts) & (rank < cap)
    slot = jnp.where(in_head, expert * cap + rank, num_experts * cap).reshape(t, k)
    c = jnp.arange(cap, dtype=jnp.int32)
    row = jnp.minimum(starts[:, None] + c[None], m - 1)
    slot_assign = jnp.where(c[None] < sizes[:, None], order[row], m).reshape(-1)
    plan = make_tile_plan(sizes, m, min(tile, m), skip=cap)
    return Layout(slot, slot_assign.astype(jnp.int32), order, inverse, plan)


def _take(a: jax.Array, index: jax.Array) -> jax.Array:
    """Rows of `a` at `index`; zero rows where the index is out of range."""
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


# ------------------------------------------------------------------- buffers, with gather VJPs
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_slots(x: jax.Array, slot_assign: jax.Array, slot: jax.Array, k: int) -> jax.Array:
    """x[T, d] -> the buffer rows [E * C, d] (zeros in empty slots)."""
    return _take(x, slot_assign // k)


def _gather_slots_fwd(x, slot_assign, slot, k):
    return gather_slots(x, slot_assign, slot, k), (slot_assign, slot)


def _gather_slots_bwd(k, res, g):
    slot_assign, slot = res
    t = slot.shape[0]
    return _take(g, slot.reshape(-1)).reshape(t, k, -1).sum(axis=1), None, None


gather_slots.defvjp(_gather_slots_fwd, _gather_slots_bwd)


@jax.custom_vjp
def combine_slots(
    y_slots: jax.Array, weights: jax.Array, slot: jax.Array, slot_assign: jax.Array
) -> jax.Array:
    """y[t] = sum_j weights[t, j] * y_slots[slot[t, j]] (assignments past C add nothing)."""
    return jnp.einsum("tkd,tk->td", _take(y_slots, slot), weights.astype(y_slots.dtype))


def _combine_slots_fwd(y_slots, weights, slot, slot_assign):
    return combine_slots(y_slots, weights, slot, slot_assign), (y_slots, weights, slot, slot_assign)


def _combine_slots_bwd(res, g):
    y_slots, weights, slot, slot_assign = res
    k = slot.shape[1]
    w_slot = _take(weights.reshape(-1), slot_assign).astype(g.dtype)
    d_slots = _take(g, slot_assign // k) * w_slot[:, None]
    d_weights = jnp.einsum(
        "tkd,td->tk", _take(y_slots, slot).astype(jnp.float32), g.astype(jnp.float32)
    )
    return d_slots.astype(y_slots.dtype), d_weights.astype(weights.dtype), None, None


combine_slots.defvjp(_combine_slots_fwd, _combine_slots_bwd)


# ------------------------------------------------------------------------ the overflow loop
def _tile_mm(lhs: jax.Array, w: jax.Array) -> jax.Array:
    """The matmul of one tile: the expert's weights come sliced to `[1, K, N]`."""
    return jnp.dot(lhs, w[0])


def _tile_rows(plan: TilePlan, i, m: int, tile: int, row_token, row_weight):
    lo, mask = tile_window(plan, i, m, tile)
    tok = jax.lax.dynamic_slice_in_dim(row_token, lo, tile)
    w = jax.lax.dynamic_slice_in_dim(row_weight, lo, tile)
    return lo, mask, tok, jnp.where(mask, w, jnp.zeros((), w.dtype))


def _expert_slice(weights, g):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, 0, keepdims=True), weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _overflow(fn, tile, weights, consts, x, row_weight, row_token, plan):
    m = row_token.shape[0]
    rows = jax.ShapeDtypeStruct((tile,) + x.shape[1:], x.dtype)
    d_out = jax.eval_shape(fn, _expert_slice(weights, 0), rows, *consts).shape[-1]

    def body(i, y):
        _, _, tok, w = _tile_rows(plan, i, m, tile, row_token, row_weight)
        ys = fn(_expert_slice(weights, plan.group[i]), x[tok], *consts)
        return y.at[tok].add(w[:, None].astype(jnp.float32) * ys.astype(jnp.float32))

    return jax.lax.fori_loop(0, plan.count, body, jnp.zeros((x.shape[0], d_out), jnp.float32))


def _overflow_fwd(fn, tile, weights, consts, x, row_weight, row_token, plan):
    y = _overflow(fn, tile, weights, consts, x, row_weight, row_token, plan)
    return y, (weights, consts, x, row_weight, row_token, plan)


def _overflow_bwd(fn, tile, res, gy):
    weights, consts, x, row_weight, row_token, plan = res
    m = row_token.shape[0]

    def body(i, carry):
        d_weights, d_consts, dx, d_row_weight = carry
        lo, mask, tok, w = _tile_rows(plan, i, m, tile, row_token, row_weight)
        g = plan.group[i]
        ys, vjp = jax.vjp(
            lambda wt, xs, cs: fn(wt, xs, *cs), _expert_slice(weights, g), x[tok], consts
        )
        gs = gy[tok]
        dw_rows = jnp.sum(gs * ys.astype(jnp.float32), axis=-1)
        old = jax.lax.dynamic_slice_in_dim(d_row_weight, lo, tile)
        d_row_weight = jax.lax.dynamic_update_slice_in_dim(
            d_row_weight, jnp.where(mask, dw_rows, old), lo, axis=0
        )
        dwt, dxs, dcs = vjp((w[:, None].astype(jnp.float32) * gs).astype(ys.dtype))
        d_weights = jax.tree.map(
            lambda acc, d: jax.lax.dynamic_update_index_in_dim(
                acc, jax.lax.dynamic_index_in_dim(acc, g, 0) + d.astype(acc.dtype), g, 0
            ),
            d_weights,
            dwt,
        )
        d_consts = jax.tree.map(lambda acc, d: acc + d.astype(acc.dtype), d_consts, dcs)
        return d_weights, d_consts, dx.at[tok].add(dxs.astype(jnp.float32)), d_row_weight

    f32 = lambda a: jnp.zeros(a.shape, jnp.float32)  # noqa: E731
    init = (
        jax.tree.map(f32, weights),
        jax.tree.map(f32, consts),
        jnp.zeros(x.shape, jnp.float32),
        jnp.zeros(row_weight.shape, jnp.float32),
    )
    d_weights, d_consts, dx, d_row_weight = jax.lax.fori_loop(0, plan.count, body, init)
    cast = lambda d, a: d.astype(a.dtype)  # noqa: E731
    return (
        jax.tree.map(cast, d_weights, weights),
        jax.tree.map(cast, d_consts, consts),
        dx.astype(x.dtype),
        d_row_weight.astype(row_weight.dtype),
        None,
        None,
    )


_overflow.defvjp(_overflow_fwd, _overflow_bwd)


def overflow(
    fn: Callable, weights, x: jax.Array, row_weight: jax.Array, row_token: jax.Array, plan, tile
) -> jax.Array:
    """sum over the plan's rows r of row_weight[r] * fn(W[group of r], x[row_token[r]]),
    added into a float32 `[T, d_out]`; `fn(weights, x_rows, mm)` is an `ExpertFn.fn`."""
    per_tile = lambda wt, xs: fn(wt, xs, _tile_mm)  # noqa: E731
    rows = jnp.zeros((tile,) + x.shape[1:], x.dtype)  # an example tile, for tracing
    converted, consts = jax.closure_convert(per_tile, _expert_slice(weights, 0), rows)
    return _overflow(converted, tile, weights, tuple(consts), x, row_weight, row_token, plan)


# ---------------------------------------------------------------------------------- the plan
def hybrid_plan(
    x: jax.Array,
    expert_ids: jax.Array,
    combine_weights: jax.Array,
    expert_fn: ExpertFn,
    *,
    num_experts: int,
    cap: int,
    tile: int,
) -> jax.Array:
    """y[T, d] = sum_j combine_weights[t, j] * Expert_{expert_ids[t, j]}(x_t), dropless."""
    t, k = expert_ids.shape
    m = t * k
    tile = min(tile, m)
    lay = make_layout(expert_ids, combine_weights > 0, num_experts, cap, tile)
    x_slots = gather_slots(x, lay.slot_assign, lay.slot, k).reshape(num_experts, cap, -1)
    y_slots = expert_fn(x_slots, lambda lhs, w: jnp.einsum("eck,ekn->ecn", lhs, w))
    y = combine_slots(
        y_slots.reshape(num_experts * cap, -1), combine_weights, lay.slot, lay.slot_assign
    )
    # The sorted assignments' tokens and weights; `unpermute` gathers both ways.
    row_weight = unpermute(combine_weights.reshape(-1), lay.inverse, lay.order)
    row_token = lay.order // k
    y_over = overflow(expert_fn.fn, expert_fn.weights, x, row_weight, row_token, lay.plan, tile)
    return y + y_over.astype(y.dtype)
