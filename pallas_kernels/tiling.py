"""Tile sizes for the grouped-matmul kernels (a small table) and the work-item metadata.

Tile table (`choose_tiling`). `tm` rows, `tk` contraction, `tn` output columns per block,
picked from the average rows per group `M / G` (groups share tiles at their boundaries, so
small groups want short row tiles to waste fewer masked rows):

| backend    | tm if M/G < 256 | tm otherwise | tk                       | tn                      |
| ---------- | --------------- | ------------ | ------------------------ | ----------------------- |
| mosaic_tpu | 128             | 512          | 512/256/128 dividing K, K| 1024..128 dividing N, N |
| pallas_gpu | 64              | 128          | 64 (2-byte), 32 (4-byte) | 128                     |

`mosaic_gpu` (Hopper wgmma, one warpgroup per tile, 64-row wgmma steps, 128-byte swizzle =
64 bf16 columns), from the sweep `experiments/benchmarks/gmm_tiles.py` on an H200 (bf16,
balanced groups; time / same-FLOP dense matmul, DeepSeek-like / Mixtral-like shape):
gmm `(tm, tk, tn) = (192, 64, 128)`, 4 stages: 1.17x / 1.25x (128 rows: 1.26x / 1.33x;
`(128, 128, 128)` 1.26x / 1.36x at 3 stages, over the shared memory at 4), used when 192
divides M (no padding copy), else 128 rows; tgmm (row block, K tile, N tile) =
`(64, 128, 128)`, 5 stages: 1.15x / 1.36x (64-wide K or N tiles: 1.6-2x). A tile of 128
falls to 64 where 128 does not divide the dimension, and in interpret mode every tile is 64
(small test shapes). Every `mosaic_gpu` tile is a multiple of 64.

The TPU and Triton rows are starting points from the MegaBlocks / megablox defaults, not
tuned on hardware (no TPU was available; on GPU see the README's measured table). A Mosaic
TPU block must divide K exactly (a partial K block would add garbage into the sum), so `tk`
falls back to the whole K; the Triton GPU kernels mask every edge, and their tiles are
powers of two (Triton needs that). On CPU (interpret mode) `tm` is also capped by M so small
test shapes stay small.

Work items (`make_work_items`). Rows of `lhs` are sorted by group; group g owns rows
`[start_g, end_g)`. The kernels walk a 1-D list of work items, each one (group, row tile):
every row tile a group touches is one item, in group order, so an output row tile is visited
by consecutive items only (the Mosaic kernels rely on this to keep it resident). A group
that starts or ends inside a tile shares that tile with its neighbour; each item masks in
only rows `[lo, hi)`. With `cover_tail` a virtual group G owns the rows past
`sum(group_sizes)` so they are written (as zeros); with `visit_empty_groups` an empty group
gets one item with an empty mask, so `tgmm` writes its zero gradient. The list has the
static length `cdiv(M, tm) + G`, an upper bound; the items past `count` repeat the last
real one (same blocks, so no new copies) and are skipped by the kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TM_TABLE = {"mosaic_tpu": ((256, 128), (None, 512)), "pallas_gpu": ((256, 64), (None, 128))}
TPU_TK = (512, 256, 128)
TPU_TN = (1024, 512, 256, 128)


class Tiling(NamedTuple):
    tm: int
    tk: int
    tn: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _divisor_or_full(dim: int, candidates: tuple[int, ...]) -> int:
    return next((c for c in candidates if dim % c == 0 and c <= dim), dim)


def _mosaic_gpu_tiling(m: int, k: int, n: int, interpret: bool, op: str) -> Tiling:
    def fit(dim: int) -> int:
        return 128 if dim % 128 == 0 and not interpret else 64

    if op == "tgmm":
        return Tiling(64, fit(k), fit(n))
    tm = 64 if interpret else 192 if m % 192 == 0 else 128
    return Tiling(tm, 64, fit(n))


def choose_tiling(
    m: int,
    k: int,
    n: int,
    num_groups: int,
    itemsize: int,
    backend: str,
    interpret: bool = False,
    op: str = "gmm",
) -> Tiling:
    """The table above: (tm, tk, tn) for an `[M, K] x [G, K, N]` grouped matmul (`op` "gmm")
    or its weight gradient (`op` "tgmm"; only `mosaic_gpu` tiles that one differently)."""
    if backend == "mosaic_gpu":
        return _mosaic_gpu_tiling(m, k, n, interpret, op)
    rows_per_group = m / max(num_groups, 1)
    tm = next(t for limit, t in TM_TABLE[backend] if limit is None or rows_per_group < limit)
    if backend == "mosaic_tpu":
        tk, tn = _divisor_or_full(k, TPU_TK), _divisor_or_full(n, TPU_TN)
        if interpret or m < tm:  # a block may equal the whole dimension
            tm = min(tm, m)
    else:
        tk, tn = (64 if itemsize <= 2 else 32), 128
        if interpret:  # keep interpret-mode blocks near the problem size (powers of two)
            tm = min(tm, max(16, 1 << (m - 1).bit_length()))
            tn = min(tn, max(16, 1 << (n - 1).bit_length()))
    return Tiling(tm, tk, tn)


def is_triton_tiling(tiling: Tiling) -> bool:
    """Whether the Triton-lowering kernels can use `tiling`: powers of two >= 16."""
    return all(t >= 16 and not t & (t - 1) for t in tiling)


def check_tiling(tiling, k: int, backend: str) -> Tiling:
    """Validates a user-given `tiling=(tm, tk, tn)`; names the argument in every error."""
    try:
        tiling = Tiling(*(int(t) for t in tiling))
    except (TypeError, ValueError):
        raise ValueError(f"tiling must be three ints (tm, tk, tn); got {tiling!r}") from None
    if min(tiling) <= 0:
        raise ValueError(f"tiling={tuple(tiling)} must be positive")
    if backend == "mosaic_tpu" and k % tiling.tk:
        raise ValueError(
            f"tiling tk={tiling.tk} must divide K={k} for the mosaic_tpu kernels "
            "(a partial contraction block would add garbage)"
        )
    if backend == "mosaic_gpu" and any(t % 64 for t in tiling):
        raise ValueError(
            f"tiling={tuple(tiling)}: the mosaic_gpu kernels need multiples of 64 "
            "(wgmma steps of 64 rows, 128-byte swizzled 16-bit tiles)"
        )
    if backend == "pallas_gpu" and not is_triton_tiling(tiling):
        raise ValueError(
            f"tiling={tuple(tiling)}: the pallas_gpu kernels need powers of two "
            ">= 16 (Triton block shapes)"
        )
    return tiling


class WorkItems(NamedTuple):
    """Per-item int32 arrays of static length `cdiv(M, tm) + G` (see the module docstring).

    group: rhs/output group of the item (the virtual tail group is clamped to G - 1);
    m_tile: its row tile; lo, hi: the rows it masks in; real: 0 for tail items (zero fill);
    count: `[1]`, how many items are real.
    """

    group: jax.Array
    m_tile: jax.Array
    lo: jax.Array
    hi: jax.Array
    real: jax.Array
    count: jax.Array


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(start, end) rows of each group, clamped to [0, m] (sizes summing past M are cut)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def make_work_items(
    group_sizes: jax.Array, m: int, tm: int, *, cover_tail: bool, visit_empty_groups: bool
) -> WorkItems:
    """O(G + M / tm) integer work, no matmuls; see the module docstring."""
    num_groups = group_sizes.shape[0]
    tiles_m = cdiv(m, tm)
    starts, ends = group_bounds(group_sizes, m)
    can_be_empty = jnp.full((num_groups,), visit_empty_groups)
    if cover_tail:  # virtual group G: rows [sum(group_sizes), m)
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
        can_be_empty = jnp.concatenate([can_be_empty, jnp.zeros((1,), bool)])
    first = jnp.minimum(starts // tm, tiles_m - 1)  # an empty group may start at row m
    last = (jnp.maximum(ends, starts + 1) - 1) // tm
    counts = jnp.where(ends > starts, last - first + 1, can_be_empty.astype(jnp.int32))
    item_ends = jnp.cumsum(counts)
    count = item_ends[-1]
    i = jnp.minimum(jnp.arange(tiles_m + num_groups, dtype=jnp.int32), jnp.maximum(count - 1, 0))
    g = jnp.minimum(jnp.searchsorted(item_ends, i, side="right"), starts.shape[0] - 1)
    m_tile = first[g] + i - (item_ends[g] - counts[g])
    return WorkItems(
        group=jnp.minimum(g, num_groups - 1).astype(jnp.int32),
        m_tile=m_tile.astype(jnp.int32),
        lo=starts[g],
        hi=ends[g],
        real=(g < num_groups).astype(jnp.int32),
        count=count.reshape(1).astype(jnp.int32),
    )
