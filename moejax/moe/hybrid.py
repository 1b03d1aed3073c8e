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

One custom VJP covers the buffers and the loop. Its index moves transpose to gathers (XLA:CPU
runs scatter-adds several times slower); the loop's backward runs each tile's expert
function again under `jax.vjp` (no per-tile residuals are stored: one extra forward of the
overflow rows) and accumulates onto the buffers' weight gradients. Arrays the expert
function closes over (MixLoRA's frozen W_down) become explicit inputs via
`jax.closure_convert`, so they get their gradient too.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.moe.experts import ExpertFn
from moejax.moe.grouped_matmul import TilePlan, make_tile_plan, tile_window
from moejax.moe.permute import sort_by_expert


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


# ---------------------------------------------------------------------------- the plan
def batched_mm(lhs: jax.Array, w: jax.Array) -> jax.Array:
    """The capacity buffers' matmul: `[E, C, K] x [E, K, N]`."""
    return jnp.einsum("eck,ekn->ecn", lhs, w)


def _tile_mm(lhs: jax.Array, w: jax.Array) -> jax.Array:
    """The matmul of one tile: the expert's weights come sliced to `[1, K, N]`."""
    return jnp.dot(lhs, w[0])


def weights_experts(weights) -> int:
    """E: every expert weight leaf is stacked `[E, ...]`."""
    return jax.tree.leaves(weights)[0].shape[0]


def _expert_slice(weights, g):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, 0, keepdims=True), weights)


def _tile_rows(lay: Layout, i, k: int, tile: int, combine_weights):
    """Tile i of the overflow: its window start, row mask, tokens and combine weights."""
    m = lay.order.shape[0]
    lo, mask = tile_window(lay.plan, i, m, tile)
    assign = jax.lax.dynamic_slice_in_dim(lay.order, lo, tile)
    w = combine_weights.reshape(-1)[assign]
    return lo, mask, assign // k, jnp.where(mask, w, jnp.zeros((), w.dtype))


def _forward(fns, tile, weights, consts, x, combine_weights, lay):
    """y and what the backward pass needs: the buffers' outputs and their VJP."""
    head_fn, tile_fn = fns
    head_consts, tile_consts = consts
    e, k = weights_experts(weights), combine_weights.shape[1]
    x_slots = _take(x, lay.slot_assign // k).reshape(e, -1, x.shape[1])  # [E, C, d]
    y_slots, head_vjp = jax.vjp(
        lambda w, xs, cs: head_fn(w, xs, *cs), weights, x_slots, head_consts
    )
    y_slots = y_slots.reshape(lay.slot_assign.shape[0], -1)  # [E * C, d_out]
    y = jnp.einsum("tkd,tk->td", _take(y_slots, lay.slot), combine_weights.astype(y_slots.dtype))

    def body(i, acc):
        _, _, tok, w = _tile_rows(lay, i, k, tile, combine_weights)
        ys = tile_fn(_expert_slice(weights, lay.plan.group[i]), x[tok], *tile_consts)
        return acc.at[tok].add(w[:, None].astype(jnp.float32) * ys.astype(jnp.float32))

    over = jax.lax.fori_loop(0, lay.plan.count, body, y.astype(jnp.float32))
    return over.astype(y.dtype), (head_vjp, y_slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _experts(fns, tile, weights, consts, x, combine_weights, lay):
    return _forward(fns, tile, weights, consts, x, combine_weights, lay)[0]


def _experts_fwd(fns, tile, weights, consts, x, combine_weights, lay):
    y, (head_vjp, y_slots) = _forward(fns, tile, weights, consts, x, combine_weights, lay)
    return y, (head_vjp, y_slots, weights, consts, x, combine_weights, lay)


def _experts_bwd(fns, tile, res, g):
    head_vjp, y_slots, weights, (head_consts, tile_consts), x, combine_weights, lay = res
    tile_fn = fns[1]
    t, k = combine_weights.shape
    f32 = jnp.float32
    # The buffers: the combine's transpose is a gather from the output gradient.
    w_slot = _take(combine_weights.reshape(-1), lay.slot_assign).astype(f32)
    d_slots = _take(g.astype(f32), lay.slot_assign // k) * w_slot[:, None]
    d_cw = jnp.einsum("tkd,td->tk", _take(y_slots, lay.slot).astype(f32), g.astype(f32))
    d_w, dx_slots, d_head_consts = head_vjp(
        d_slots.astype(y_slots.dtype).reshape(weights_experts(weights), -1, y_slots.shape[-1])
    )
    dx = _take(dx_slots.reshape(-1, x.shape[1]).astype(f32), lay.slot.reshape(-1))
    dx = dx.reshape(t, k, -1).sum(axis=1)

    # The overflow tiles accumulate onto the buffers' gradients (no zeroed copies to add).
    def body(i, carry):
        d_w, d_consts, dx, d_row = carry
        lo, mask, tok, w = _tile_rows(lay, i, k, tile, combine_weights)
        grp = lay.plan.group[i]
        ys, vjp = jax.vjp(
            lambda wt, xs, cs: tile_fn(wt, xs, *cs),
            _expert_slice(weights, grp),
            x[tok],
            tile_consts,
        )
        gs = g[tok].astype(f32)
        old = jax.lax.dynamic_slice_in_dim(d_row, lo, tile)
        d_row = jax.lax.dynamic_update_slice_in_dim(
            d_row, jnp.where(mask, jnp.sum(gs * ys.astype(f32), axis=-1), old), lo, axis=0
        )
        dwt, dxs, dcs = vjp((w[:, None].astype(f32) * gs).astype(ys.dtype))
        d_w = jax.tree.map(
            lambda acc, d: jax.lax.dynamic_update_index_in_dim(
                acc, jax.lax.dynamic_index_in_dim(acc, grp, 0) + d.astype(acc.dtype), grp, 0
            ),
            d_w,
            dwt,
        )
        d_consts = jax.tree.map(lambda acc, d: acc + d.astype(acc.dtype), d_consts, dcs)
        return d_w, d_consts, dx.at[tok].add(dxs.astype(f32)), d_row

    zeros = lambda a: jnp.zeros(a.shape, f32)  # noqa: E731
    init = (
        jax.tree.map(lambda d: d.astype(f32), d_w),
        jax.tree.map(zeros, tile_consts),
        dx,
        jnp.zeros(lay.order.shape, f32),
    )
    d_w, d_tile_consts, dx, d_row = jax.lax.fori_loop(0, lay.plan.count, body, init)
    d_cw = d_cw + d_row[lay.inverse].reshape(t, k)  # sorted rows back to (token, choice)
    cast = lambda d, a: d.astype(a.dtype)  # noqa: E731
    return (
        jax.tree.map(cast, d_w, weights),
        (d_head_consts, jax.tree.map(cast, d_tile_consts, tile_consts)),
        dx.astype(x.dtype),
        d_cw.astype(combine_weights.dtype),
        None,
    )


_experts.defvjp(_experts_fwd, _experts_bwd)


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
    tile = min(tile, t * k)
    lay = make_layout(expert_ids, combine_weights > 0, num_experts, cap, tile)
    weights, fn = expert_fn.weights, expert_fn.fn
    # Closed-over arrays (MixLoRA's frozen W_down) become explicit inputs of the custom VJP.
    slots = jnp.zeros((num_experts, cap, x.shape[1]), x.dtype)  # example shapes, for tracing
    rows = jnp.zeros((tile, x.shape[1]), x.dtype)
    head_fn, head_consts = jax.closure_convert(lambda w, xs: fn(w, xs, batched_mm), weights, slots)
    tile_fn, tile_consts = jax.closure_convert(
        lambda w, xs: fn(w, xs, _tile_mm), _expert_slice(weights, 0), rows
    )
    consts = (tuple(head_consts), tuple(tile_consts))
    return _experts((head_fn, tile_fn), tile, weights, consts, x, combine_weights, lay)
