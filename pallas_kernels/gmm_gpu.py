"""Grouped matmul kernels for GPU, Pallas with the Triton lowering (masked loads and stores).

`gmm_pallas_gpu(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> [M, N]` and
`tgmm_pallas_gpu(lhs[M, K], grad[M, N], group_sizes[G]) -> [G, K, N]`, the block-sparse
products of MegaBlocks (Gale et al., 2022, arXiv 2211.15841) in the form of a Triton grouped
GEMM: the operands stay in global memory, each program reads its metadata from refs and loads
its tiles with masks, and a loop over K accumulates in float32 registers.

gmm grid `(items, N / tn)` over the work items of `pallas_kernels.tiling.make_work_items`:
program (i, j) computes the row tile of item i for group g_i and stores only rows
`[lo_i, hi_i)`, so two programs that share a row tile (a group boundary inside it) write
disjoint rows and need no synchronisation. Items of the virtual tail group skip the K loop
and store zeros, which is how rows past `sum(group_sizes)` become zero.

tgmm grid `(G, K / tk, N / tn)`: program (g, k, j) walks group g's rows from its first row
in windows of tm (not aligned to tiles, so no window is shared) and accumulates
`lhs[window]^T @ grad[window]`; an empty group runs no iteration and stores zeros.

The Triton lowering is chosen with `compiler_params=pallas.triton.CompilerParams`: Mosaic GPU
has been the default Pallas GPU lowering since JAX 0.9 and Pallas's Triton lowering is
deprecated from JAX 0.11; `gmm_mosaic_gpu.py` (TMA + wgmma) is the successor, and these
kernels stay for what it does not take (float32, shapes off its tiles, non-Hopper GPUs).
Measured on an H200 (README): tgmm 2.2-3.2x the same-FLOP dense matmul's time (Mosaic GPU:
1.15-1.37x); gmm's trip count first failed the Triton verifier under jax 0.11.2 and was
rewritten in tgmm's form (not re-run on a GPU since; tests/pallas_kernels/
test_triton_modules.py runs the verifier on every kernel here without a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.backend import out_struct
from pallas_kernels.tiling import Tiling, cdiv, group_bounds, make_work_items

COMPILER_PARAMS = plt.CompilerParams(num_warps=4, num_stages=3)


def _gmm_kernel(
    group_ref,
    mtile_ref,
    lo_ref,
    hi_ref,
    real_ref,
    count_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    tiling: Tiling,
    k: int,
    n: int,
    transpose_rhs: bool,
):
    tm, tk, tn = tiling
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < count_ref[0])
    def _item():
        g, row0 = group_ref[i], mtile_ref[i] * tm
        rows = row0 + jnp.arange(tm)
        row_ok = (rows >= lo_ref[i]) & (rows < hi_ref[i])
        col_ok = j * tn + jnp.arange(tn) < n

        def step(kb, acc):
            k_ok = kb * tk + jnp.arange(tk) < k
            x = plt.load(
                lhs_ref.at[pl.ds(row0, tm), pl.ds(kb * tk, tk)],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0,
            )
            if transpose_rhs:  # rhs is [G, N, K]: load the [tn, tk] tile and transpose it
                w = plt.load(
                    rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kb * tk, tk)],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0,
                ).T
            else:
                w = plt.load(
                    rhs_ref.at[g, pl.ds(kb * tk, tk), pl.ds(j * tn, tn)],
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0,
                )
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        # real is 0 or 1: an int32 trip count from a loaded value, the form the Triton
        # lowering accepts (a `jnp.where` of two Python ints failed to verify on jax 0.11.2)
        steps = real_ref[i] * cdiv(k, tk)
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))
        plt.store(
            out_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)],
            acc.astype(out_ref.dtype),
            mask=row_ok[:, None] & col_ok[None, :],
        )


def _tgmm_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, tiling: Tiling, k: int, n: int):
    tm, tk, tn = tiling
    g, kb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[g], end_ref[g]
    k_ok = kb * tk + jnp.arange(tk) < k
    col_ok = j * tn + jnp.arange(tn) < n

    def step(t, acc):
        row0 = start + t * tm
        row_ok = row0 + jnp.arange(tm) < end
        x = plt.load(
            lhs_ref.at[pl.ds(row0, tm), pl.ds(kb * tk, tk)],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0,
        )
        dy = plt.load(
            grad_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0,
        )
        return acc + jnp.dot(x.T, dy, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, (end - start + tm - 1) // tm, step, jnp.zeros((tk, tn), jnp.float32))
    plt.store(
        out_ref.at[g, pl.ds(kb * tk, tk), pl.ds(j * tn, tn)],
        acc.astype(out_ref.dtype),
        mask=k_ok[:, None] & col_ok[None, :],
    )


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret", "transpose_rhs"))
def gmm_pallas_gpu(
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
    items = make_work_items(group_sizes, m, tiling.tm, cover_tail=True, visit_empty_groups=False)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tiling=tiling, k=k, n=n, transpose_rhs=transpose_rhs),
        out_shape=out_struct((m, n), out_dtype, lhs, rhs),
        grid=(items.group.shape[0], cdiv(n, tiling.tn)),
        compiler_params=COMPILER_PARAMS,
        interpret=interpret,
        name="moejax_gmm_gpu",
    )(*items, lhs, rhs)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "num_groups", "interpret"))
def tgmm_pallas_gpu(
    lhs, grad, group_sizes, *, tiling: Tiling, out_dtype, num_groups: int, interpret: bool
):
    """Per-group `lhs^T @ grad -> [G, K, N]`; see the module docstring. Checked inputs only."""
    (m, k), n = lhs.shape, grad.shape[1]
    starts, ends = group_bounds(group_sizes, m)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tiling=tiling, k=k, n=n),
        out_shape=out_struct((num_groups, k, n), out_dtype, lhs, grad),
        grid=(num_groups, cdiv(k, tiling.tk), cdiv(n, tiling.tn)),
        compiler_params=COMPILER_PARAMS,
        interpret=interpret,
        name="moejax_tgmm_gpu",
    )(starts, ends, lhs, grad)
