"""Row gather and gather-combine kernels, the two halves of MoE token permutation.

`gather_rows(x[T, d], src[M], scale[M]) -> [M, d]`: `out[r] = scale[r] * x[src[r]]`.
`combine_rows(y[M, d], idx[T, k], weights[T, k]) -> [T, d]`:
`out[t] = sum_j weights[t, j] * y[idx[t, j]]` (accumulated in float32).

Dispatch is `gather_rows(x, order // k, 1)` (each token copied once per chosen expert, rows
in expert order); the combine after the experts is `combine_rows(y_sorted, inverse, w)`: the
scatter-add of MegaBlocks' unpermute (Gale et al., 2022, arXiv 2211.15841) written as a
gather-reduce over each token's k rows, so no two programs write the same row and no atomics
are needed. Each is the other's transpose, which is how `pallas_kernels.permute` builds the
VJPs.

Two lowerings of each:
- Mosaic TPU (and CPU interpret mode): one row per grid step; the row indices and weights
  are scalar-prefetched into SMEM and the input BlockSpec's index map reads them, so the
  pipeline copies exactly the rows needed. Arrays are viewed as `[rows, 1, d]` so a block is
  one full `(1, d)` row.
- Pallas GPU (Triton lowering): one program per output row, indices read from refs, the row
  loaded with a column mask (Triton blocks are powers of two).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.backend import out_struct
from pallas_kernels.gmm_gpu import COMPILER_PARAMS

# ----------------------------------------------------------------------------- Mosaic TPU


def _gather_kernel_tpu(src_ref, scale_ref, x_ref, out_ref):
    r = pl.program_id(0)
    out_ref[...] = (x_ref[...].astype(jnp.float32) * scale_ref[r]).astype(out_ref.dtype)


def _combine_kernel_tpu(idx_ref, w_ref, y_ref, out_ref, acc_ref, *, k: int):
    t, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += y_ref[...].astype(jnp.float32) * w_ref[t * k + j]

    @pl.when(j == k - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows_tpu(x, src, scale, *, interpret: bool):
    (t, d), m = x.shape, src.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(m,),
        in_specs=[pl.BlockSpec((None, 1, d), lambda r, src, scale: (src[r], 0, 0))],
        out_specs=pl.BlockSpec((None, 1, d), lambda r, src, scale: (r, 0, 0)),
    )
    out = pl.pallas_call(
        _gather_kernel_tpu,
        out_shape=out_struct((m, 1, d), x.dtype, x, src),
        grid_spec=grid_spec,
        interpret=interpret,
        name="moejax_gather_rows",
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    )(src, scale, x.reshape(t, 1, d))
    return out.reshape(m, d)


@functools.partial(jax.jit, static_argnames=("interpret",))
def combine_rows_tpu(y, idx, weights, *, interpret: bool):
    (m, d), (t, k) = y.shape, idx.shape
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(t, k),
        in_specs=[pl.BlockSpec((None, 1, d), lambda i, j, idx, w: (idx[i * k + j], 0, 0))],
        out_specs=pl.BlockSpec((None, 1, d), lambda i, j, idx, w: (i, 0, 0)),
        scratch_shapes=[pltpu.VMEM((1, d), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_combine_kernel_tpu, k=k),
        out_shape=out_struct((t, 1, d), y.dtype, y, idx),
        grid_spec=grid_spec,
        interpret=interpret,
        name="moejax_combine_rows",
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    )(idx.reshape(-1), weights.reshape(-1), y.reshape(m, 1, d))
    return out.reshape(t, d)


# ----------------------------------------------------------------------------- Pallas GPU


def _columns(d: int):
    width = pl.next_power_of_2(d)
    return width, jnp.arange(width) < d


def _gather_kernel_gpu(src_ref, scale_ref, x_ref, out_ref, *, d: int):
    r = pl.program_id(0)
    width, col_ok = _columns(d)
    row = plt.load(x_ref.at[src_ref[r], pl.ds(0, width)], mask=col_ok, other=0)
    plt.store(
        out_ref.at[r, pl.ds(0, width)],
        (row.astype(jnp.float32) * scale_ref[r]).astype(out_ref.dtype),
        mask=col_ok,
    )


def _combine_kernel_gpu(idx_ref, w_ref, y_ref, out_ref, *, k: int, d: int):
    t = pl.program_id(0)
    width, col_ok = _columns(d)
    acc = jnp.zeros((width,), jnp.float32)
    for j in range(k):  # k is small and static: unrolled
        row = plt.load(y_ref.at[idx_ref[t * k + j], pl.ds(0, width)], mask=col_ok, other=0)
        acc += row.astype(jnp.float32) * w_ref[t * k + j]
    plt.store(out_ref.at[t, pl.ds(0, width)], acc.astype(out_ref.dtype), mask=col_ok)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows_gpu(x, src, scale, *, interpret: bool):
    d, m = x.shape[1], src.shape[0]
    return pl.pallas_call(
        functools.partial(_gather_kernel_gpu, d=d),
        grid=(m,),
        out_shape=out_struct((m, d), x.dtype, x, src),
        compiler_params=COMPILER_PARAMS,
        interpret=interpret,
        name="moejax_gather_rows_gpu",
    )(src, scale, x)


@functools.partial(jax.jit, static_argnames=("interpret",))
def combine_rows_gpu(y, idx, weights, *, interpret: bool):
    (t, k), d = idx.shape, y.shape[1]
    return pl.pallas_call(
        functools.partial(_combine_kernel_gpu, k=k, d=d),
        grid=(t,),
        out_shape=out_struct((t, d), y.dtype, y, idx),
        compiler_params=COMPILER_PARAMS,
        interpret=interpret,
        name="moejax_combine_rows_gpu",
    )(idx.reshape(-1), weights.reshape(-1), y)
