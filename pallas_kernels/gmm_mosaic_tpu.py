"""Grouped matmul kernels for Mosaic TPU (and CPU interpret mode), metadata by scalar prefetch.

`gmm_mosaic_tpu(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> [M, N]` and
`tgmm_mosaic_tpu(lhs[M, K], grad[M, N], group_sizes[G]) -> [G, K, N]`, the block-sparse
products of MegaBlocks (Gale et al., 2022, arXiv 2211.15841) laid out for the TPU's
BlockSpec pipeline, in the spirit of JAX's megablox kernels. The work items of
`pallas_kernels.tiling.make_work_items` are prefetched into SMEM and the BlockSpec index maps
read them, so every grid step's `lhs`/`rhs` blocks are chosen by data, not by shape.

gmm grid `(N / tn, items, K / tk)`: step (j, i, k) accumulates `lhs[tile_i, k] @ rhs[g_i, k, j]`
in a float32 VMEM scratch; at the last k it writes the rows `[lo_i, hi_i)` of the output
tile and keeps the others (rows of the neighbour group that shares the tile). The first item
of a row tile writes zeros into the rows it does not own, so rows past `sum(group_sizes)`
(owned by the virtual tail group, whose items skip the matmul) come out zero.

tgmm grid `(K / tk, N / tn, items)`: the items of one group are consecutive, so the output
block `[g_i, k, j]` stays resident while step i adds `lhs[tile_i]^T @ grad[tile_i]` (rows
outside `[lo_i, hi_i)` masked to zero); it is written at the group's last item. Empty groups
have one item with an empty mask, so their gradient is written as zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import out_struct
from pallas_kernels.tiling import Tiling, cdiv, make_work_items

_ARBITRARY, _PARALLEL = "arbitrary", "parallel"


def _row_mask(m_tile, lo, hi, tm: int, shape) -> jax.Array:
    rows = m_tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= lo) & (rows < hi)


def _gmm_kernel(
    group_ref,
    mtile_ref,
    lo_ref,
    hi_ref,
    real_ref,
    count_ref,  # scalar prefetch
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    tm: int,
    tiles_k: int,
    transpose_rhs: bool,
):
    i, k = pl.program_id(1), pl.program_id(2)
    live = i < count_ref[0]

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live & (real_ref[i] == 1))
    def _accumulate():
        contract = 1 if transpose_rhs else 0  # rhs block [tn, tk] or [tk, tn]
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...],
            rhs_ref[...],
            (((1,), (contract,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    store = live & (k == tiles_k - 1)
    first = (i == 0) | (mtile_ref[jnp.maximum(i - 1, 0)] != mtile_ref[i])
    mask = _row_mask(mtile_ref[i], lo_ref[i], hi_ref[i], tm, acc_ref.shape)

    @pl.when(store & first)
    def _store_first():  # first visit of this row tile: rows owned by nobody yet become 0
        out_ref[...] = jnp.where(mask, acc_ref[...], 0.0).astype(out_ref.dtype)

    @pl.when(store & jnp.logical_not(first))
    def _store_again():
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
            out_ref.dtype
        )


def _tgmm_kernel(
    group_ref,
    mtile_ref,
    lo_ref,
    hi_ref,
    real_ref,
    count_ref,
    lhs_ref,
    grad_ref,
    out_ref,
    acc_ref,
    *,
    tm: int,
    num_items: int,
):
    del real_ref  # tgmm has no tail items
    i = pl.program_id(2)
    count = count_ref[0]
    live = i < count
    g = group_ref[i]
    first = (i == 0) | (group_ref[jnp.maximum(i - 1, 0)] != g)
    last = (i == count - 1) | (group_ref[jnp.minimum(i + 1, num_items - 1)] != g)

    @pl.when(live & first)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _accumulate():
        x, dy = lhs_ref[...], grad_ref[...]
        x = jnp.where(_row_mask(mtile_ref[i], lo_ref[i], hi_ref[i], tm, x.shape), x, 0)
        dy = jnp.where(_row_mask(mtile_ref[i], lo_ref[i], hi_ref[i], tm, dy.shape), dy, 0)
        acc_ref[...] += jax.lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when(live & last)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _prefetch(items):
    return (items.group, items.m_tile, items.lo, items.hi, items.real, items.count)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret", "transpose_rhs"))
def gmm_mosaic_tpu(
    lhs,
    rhs,
    group_sizes,
    *,
    tiling: Tiling,
    out_dtype,
    interpret: bool,
    transpose_rhs: bool = False,
):
    """`[M, K] x [G, K, N] -> [M, N]` (rhs `[G, N, K]` if `transpose_rhs`); see the module
    docstring. Checked inputs only."""
    (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
    tm, tk, tn = tiling
    tiles_k = k // tk
    items = make_work_items(group_sizes, m, tm, cover_tail=True, visit_empty_groups=False)
    num_items = items.group.shape[0]

    def k_block(i, kk, count_ref):  # skipped items keep the previous blocks: no new copies
        return jnp.where(i < count_ref[0], kk, tiles_k - 1)

    def lhs_map(j, i, kk, group, mtile, lo, hi, real, count):
        return mtile[i], k_block(i, kk, count)

    def rhs_map(j, i, kk, group, mtile, lo, hi, real, count):
        if transpose_rhs:
            return group[i], j, k_block(i, kk, count)
        return group[i], k_block(i, kk, count), j

    def out_map(j, i, kk, group, mtile, lo, hi, real, count):
        return mtile[i], j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(cdiv(n, tn), num_items, tiles_k),
        in_specs=[
            pl.BlockSpec((tm, tk), lhs_map),
            pl.BlockSpec((None, tn, tk) if transpose_rhs else (None, tk, tn), rhs_map),
        ],
        out_specs=pl.BlockSpec((tm, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=lhs.nbytes + rhs.nbytes + m * n * jnp.dtype(out_dtype).itemsize,
    )
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, tiles_k=tiles_k, transpose_rhs=transpose_rhs),
        out_shape=out_struct((m, n), out_dtype, lhs, rhs),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(_PARALLEL, _ARBITRARY, _ARBITRARY)
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="moejax_gmm",
    )(*_prefetch(items), lhs, rhs)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "num_groups", "interpret"))
def tgmm_mosaic_tpu(
    lhs, grad, group_sizes, *, tiling: Tiling, out_dtype, num_groups: int, interpret: bool
):
    """Per-group `lhs^T @ grad -> [G, K, N]`; see the module docstring. Checked inputs only."""
    (m, k), n = lhs.shape, grad.shape[1]
    tm, tk, tn = tiling
    items = make_work_items(group_sizes, m, tm, cover_tail=False, visit_empty_groups=True)
    num_items = items.group.shape[0]

    def lhs_map(kk, j, i, group, mtile, lo, hi, real, count):
        return mtile[i], kk

    def grad_map(kk, j, i, group, mtile, lo, hi, real, count):
        return mtile[i], j

    def out_map(kk, j, i, group, mtile, lo, hi, real, count):
        return group[i], kk, j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(cdiv(k, tk), cdiv(n, tn), num_items),
        in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
        out_specs=pl.BlockSpec((None, tk, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=lhs.nbytes
        + grad.nbytes
        + num_groups * k * n * jnp.dtype(out_dtype).itemsize,
    )
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, num_items=num_items),
        out_shape=out_struct((num_groups, k, n), out_dtype, lhs, grad),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(_PARALLEL, _PARALLEL, _ARBITRARY)
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="moejax_tgmm",
    )(*_prefetch(items), lhs, grad)
