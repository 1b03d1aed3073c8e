"""Grouped matmul kernels for Hopper GPUs through Pallas Mosaic GPU (TMA + wgmma).

`gmm_mosaic_gpu(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> [M, N]` and
`tgmm_mosaic_gpu(lhs[M, K], grad[M, N], group_sizes[G]) -> [G, K, N]`: the block-sparse
products of MegaBlocks (Gale et al., 2022, arXiv 2211.15841) written for Mosaic GPU, the
default Pallas GPU lowering since JAX 0.9, after the structure of JAX's
`pallas/ops/gpu/ragged_dot_mgpu.py` and `transposed_ragged_dot_mgpu.py`: a persistent kernel
(one program per SM walking the output tiles with `plgpu.nd_loop`), the K loop an
`emit_pipeline` of TMA copies into shared memory with `max_concurrent_steps` in flight, one
warpgroup issuing `wgmma` into a float32 accumulator in registers.

gmm walks the work items of `pallas_kernels.tiling.make_work_items` (one per (group, row
tile), the rows past `sum(group_sizes)` a virtual tail group) times the N tiles. An item
multiplies its whole row tile by `rhs[g]` and stores only its group's rows in the tile: TMA
stores have static shapes, so the rows go out as at most log2(tm) + 1 power-of-two slabs
(the binary digits of the row count). Two items that share a row tile store disjoint rows.
Tail items skip the K loop and store zeros.

tgmm walks (group, K tile, N tile): it pipelines over the row blocks of `tm` rows that group
g touches (aligned to `tm`; the first and last may hold rows of the neighbouring groups, which
are zeroed in shared memory before the `wgmma`) and accumulates `lhs_block^T @ grad_block`.
An empty group runs no step and stores zeros. Row blocks are whole: where M is not a multiple
of `tm` the operands are padded with zero rows first (the outputs keep M rows).

Scope: 16-bit operands (bf16/f16; wgmma has no float32 mode of float32 accuracy) with K a
multiple of `tk` and N of `tn` (`mosaic_gpu_supports`); `pallas_kernels.gmm` sends every
other call to the Triton-lowering kernels of `gmm_gpu.py`. Tiles (`tiling.choose_tiling`,
swept on an H200 by `experiments/benchmarks/gmm_tiles.py`): gmm (tm, tk, tn) = (192, 64, 128)
when 192 divides M, else (128, 64, 128), 4 stages in flight; tgmm (row block, K tile, N tile)
= (64, 128, 128), 5 stages. On CPU the kernels run in Mosaic GPU interpret mode
(`InterpretGPUParams`), which simulates shared memory, TMA, barriers and wgmma; that is how
CI tests them (jax 0.10's interpreter reads no transposed shared-memory operand, so there
tgmm and `transpose_rhs` are tested on a GPU only). Measured on an H200 (README): gmm 1.17x /
1.25x and tgmm 1.15x / 1.36x the time of a dense matmul of the same FLOPs at the
DeepSeek-like / Mixtral-like shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.backend import out_struct
from pallas_kernels.tiling import Tiling, cdiv, group_bounds, make_work_items

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# TMA copies in flight in the K (gmm) / row (tgmm) pipeline (the kernels' `stages` default),
# from the H200 sweep (experiments/benchmarks/gmm_tiles.py)
GMM_STAGES, TGMM_STAGES = 4, 5
INTERPRET_SMS = 2  # programs of the persistent grid in interpret mode
WG = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


# jax 0.10's Mosaic GPU interpreter cannot read a transposed shared-memory wgmma operand
# (`TransposeTransform`), which tgmm and `transpose_rhs` use; 0.11's can.
INTERPRET_TRANSPOSES = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)


def mosaic_gpu_supports(
    op: str,
    dtype,
    k: int,
    n: int,
    tiling: Tiling,
    *,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> bool:
    """Whether these kernels take a call: 16-bit operands, tiles of multiples of 64, and K a
    multiple of `tk` and N of `tn` (gmm: K is contracted in blocks of tk; tgmm: the output
    `[G, K, N]` is cut in K x N tiles). `op` is "gmm" or "tgmm"."""
    if jnp.dtype(dtype) not in DTYPES or any(t % 64 for t in tiling):
        return False
    if interpret and (op == "tgmm" or transpose_rhs) and not INTERPRET_TRANSPOSES:
        return False
    return k % tiling.tk == 0 and n % tiling.tn == 0


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:  # jax 0.10: not exported yet
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _num_programs(interpret: bool) -> int:
    if interpret:
        return INTERPRET_SMS
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _pad_rows(x: jax.Array, tm: int) -> jax.Array:
    """Zero rows up to a multiple of `tm`, so every row block the kernels load lies inside
    the array (a no-op, no copy, for the usual M = tokens x top-k, a multiple of 128)."""
    pad = -x.shape[0] % tm
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _store_rows(
    o_smem,
    out_ref,
    first: jax.Array,
    count: jax.Array,
    row0: jax.Array,
    col0: jax.Array,
    max_rows: int,
    tn: int,
):
    """Copies rows `[first, first + count)` of `o_smem` to `out_ref[row0 + first + ...,
    col0:col0 + tn]` as power-of-two slabs (TMA copies have static shapes)."""
    offset, size = first, 1 << (max_rows.bit_length() - 1)
    while size:

        @pl.when(count & size != 0)
        def _slab(offset=offset, size=size):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(offset, size)],
                out_ref.at[pl.ds(row0 + offset, size), pl.ds(col0, tn)],
            )

        offset = offset + (count & size)
        size //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _gmm_body(
    count_ref,
    group_ref,
    mtile_ref,
    lo_ref,
    hi_ref,
    real_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    tiling: Tiling,
    m: int,
    k: int,
    n: int,
    num_items: int,
    transpose_rhs: bool,
    stages: int,
):
    tm, tk, tn = tiling
    tiles_n = n // tn

    @plgpu.nd_loop((num_items * tiles_n,), collective_axes="sm")
    def _tile(info):
        item, j = info.index[0] // tiles_n, info.index[0] % tiles_n

        @pl.when(item < count_ref[0])
        def _item():
            g, row_tile = group_ref[item], mtile_ref[item]
            row0 = row_tile * tm

            def matmul(acc_ref):
                def step(_, x_smem, w_smem):
                    plgpu.wgmma(
                        acc_ref, x_smem, w_smem.transpose((1, 0)) if transpose_rhs else w_smem
                    )

                w_block = (tn, tk) if transpose_rhs else (tk, tn)
                pipeline = plgpu.emit_pipeline(
                    step,
                    grid=(k // tk,),
                    max_concurrent_steps=stages,
                    in_specs=[
                        plgpu.BlockSpec((tm, tk), lambda kb: (row_tile, kb), delay_release=1),
                        plgpu.BlockSpec(
                            w_block,
                            (lambda kb: (j, kb)) if transpose_rhs else (lambda kb: (kb, j)),
                            delay_release=1,
                        ),
                    ],
                )

                @pl.when(real_ref[item] == 1)  # tail items keep the zero accumulator
                def _run():
                    pipeline(lhs_ref, rhs_ref.at[g])

                return acc_ref[...]

            acc = pl.run_scoped(matmul, plgpu.ACC((tm, tn)))

            def store(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                # the item's rows [lo, hi) are its group's rows: clip them to this tile
                lo = jnp.maximum(lo_ref[item], row0)
                hi = jnp.minimum(hi_ref[item], row0 + tm)
                _store_rows(o_smem, out_ref, lo - row0, hi - lo, row0, j * tn, min(tm, m), tn)

            pl.run_scoped(store, plgpu.SMEM((tm, tn), out_ref.dtype))


def _tgmm_body(
    start_ref,
    end_ref,
    lhs_ref,
    grad_ref,
    out_ref,
    *,
    tiling: Tiling,
    k: int,
    n: int,
    num_groups: int,
    stages: int,
):
    tm, tk, tn = tiling
    tiles_k, tiles_n = k // tk, n // tn

    @plgpu.nd_loop((num_groups * tiles_k * tiles_n,), collective_axes="sm")
    def _tile(info):
        flat = info.index[0]
        g, kt, j = flat // (tiles_k * tiles_n), flat // tiles_n % tiles_k, flat % tiles_n
        start, end = start_ref[g], end_ref[g]
        first = start // tm
        blocks = jnp.where(end > start, cdiv(end, tm) - first, 0)

        def matmul(acc_ref):
            def step(idx, x_smem, dy_smem):
                r = idx[0]

                @pl.when((r == 0) | (r == blocks - 1))  # blocks shared with another group
                def _mask():
                    rows = plgpu.layout_cast(
                        jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0), plgpu.Layout.WGMMA
                    )
                    rows = rows + (first + r) * tm
                    keep = ((rows >= start) & (rows < end)).astype(x_smem.dtype)
                    x_smem[...] = x_smem[...] * keep
                    plgpu.commit_smem()

                plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_smem)

            @pl.when(blocks > 0)
            def _run():
                plgpu.emit_pipeline(
                    step,
                    grid=(blocks,),
                    max_concurrent_steps=stages,
                    in_specs=[
                        plgpu.BlockSpec((tm, tk), lambda r: (first + r, kt), delay_release=1),
                        plgpu.BlockSpec((tm, tn), lambda r: (first + r, j), delay_release=1),
                    ],
                )(lhs_ref, grad_ref)

            return acc_ref[...]

        acc = pl.run_scoped(matmul, plgpu.ACC((tk, tn)))

        def store(o_smem):
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[g, pl.ds(kt * tk, tk), pl.ds(j * tn, tn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        pl.run_scoped(store, plgpu.SMEM((tk, tn), out_ref.dtype))


def _launch(body, out_type: jax.ShapeDtypeStruct, interpret: bool):
    """The persistent kernel: one program per SM (`INTERPRET_SMS` in interpret mode)."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(_num_programs(interpret),),
        grid_names=("sm",),
        compiler_params=WG,
        interpret=_interpret_params(interpret),
    )


@functools.partial(
    jax.jit, static_argnames=("tiling", "out_dtype", "interpret", "transpose_rhs", "stages")
)
def gmm_mosaic_gpu(
    lhs,
    rhs,
    group_sizes,
    *,
    tiling: Tiling,
    out_dtype,
    interpret: bool,
    transpose_rhs: bool = False,
    stages: int = GMM_STAGES,
):
    """`[M, K] x [G, K, N] -> [M, N]` (rhs `[G, N, K]` if `transpose_rhs`); see the module
    docstring. Checked inputs that `mosaic_gpu_supports("gmm", ...)` accepts only."""
    (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
    items = make_work_items(group_sizes, m, tiling.tm, cover_tail=True, visit_empty_groups=False)
    body = functools.partial(
        _gmm_body,
        tiling=tiling,
        m=m,
        k=k,
        n=n,
        num_items=items.group.shape[0],
        transpose_rhs=transpose_rhs,
        stages=stages,
    )
    kernel = _launch(body, out_struct((m, n), out_dtype, lhs, rhs), interpret)
    return kernel(
        items.count,
        items.group,
        items.m_tile,
        items.lo,
        items.hi,
        items.real,
        _pad_rows(lhs, tiling.tm),
        rhs,
    )


@functools.partial(
    jax.jit, static_argnames=("tiling", "out_dtype", "num_groups", "interpret", "stages")
)
def tgmm_mosaic_gpu(
    lhs,
    grad,
    group_sizes,
    *,
    tiling: Tiling,
    out_dtype,
    num_groups: int,
    interpret: bool,
    stages: int = TGMM_STAGES,
):
    """Per-group `lhs^T @ grad -> [G, K, N]`; see the module docstring. Checked inputs that
    `mosaic_gpu_supports("tgmm", ...)` accepts only."""
    (m, k), n = lhs.shape, grad.shape[1]
    starts, ends = group_bounds(group_sizes, m)
    body = functools.partial(
        _tgmm_body, tiling=tiling, k=k, n=n, num_groups=num_groups, stages=stages
    )
    kernel = _launch(body, out_struct((num_groups, k, n), out_dtype, lhs, grad), interpret)
    return kernel(starts, ends, _pad_rows(lhs, tiling.tm), _pad_rows(grad, tiling.tm))
