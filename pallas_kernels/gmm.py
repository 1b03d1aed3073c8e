"""`gmm` and `tgmm`: grouped matmuls for dropless MoE, as Pallas kernels with a `custom_vjp`.

`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> [M, N]`: the rows of `lhs` are sorted by
group; rows `[s_g, s_g + n_g)` are multiplied by `rhs[g]`; rows past `sum(group_sizes)` give
zeros. `tgmm(lhs[M, K], grad[M, N], group_sizes) -> [G, K, N]`: `out[g] = lhs[rows of g]^T @
grad[rows of g]`, the weight gradient of `gmm`. Groups may be empty and need not align to
tiles. This is MegaBlocks' formulation of an MoE layer as block-sparse products (Gale et
al., 2022, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", arXiv 2211.15841).

Reverse mode (`jax.grad` cannot see through a bare `pallas_call`) goes through `custom_vjp`s:
for `y = gmm(x, w)`: `dx = gmm(dy, w^T)` and `dw = tgmm(x, dy)`; for `z = tgmm(x, dy)`:
`dx = gmm(dy, z_bar^T)` and `d dy = gmm(x, z_bar)`. The `w^T` products read `w` in place
(`transpose_rhs`), with no transposed copy. Backends (`pallas_kernels.backend`):
`mosaic_tpu` (`gmm_mosaic_tpu.py`), `mosaic_gpu` (`gmm_mosaic_gpu.py`, 16-bit operands on
shapes that fit its tiles, the rest of its calls going to `pallas_gpu`) or `pallas_gpu`
(`gmm_gpu.py`, Triton lowering), picked from the platform; `interpret=True` runs each on
CPU. Tiles come from the table in `pallas_kernels.tiling` unless `tiling=(tm, tk, tn)` is
given. The pure-JAX ground truth is
`pallas_kernels.reference.gmm_reference` / `tgmm_reference`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend, resolve_interpret
from pallas_kernels.gmm_gpu import gmm_pallas_gpu, tgmm_pallas_gpu
from pallas_kernels.gmm_mosaic_gpu import gmm_mosaic_gpu, mosaic_gpu_supports, tgmm_mosaic_gpu
from pallas_kernels.gmm_mosaic_tpu import gmm_mosaic_tpu, tgmm_mosaic_tpu
from pallas_kernels.manual_axes import sum_to_vma, vary_together
from pallas_kernels.tiling import Tiling, check_tiling, choose_tiling, is_triton_tiling


class _Opts(NamedTuple):
    """Static options of one call (hashable: the nondiff argument of the custom_vjps)."""

    out_dtype: jnp.dtype
    tiling: Tiling | None  # None: from the tile table
    backend: str
    interpret: bool
    transpose_rhs: bool = False  # gmm only: rhs is [G, N, K]


def _kernel_backend(backend: str) -> str:
    return backend if backend in ("mosaic_tpu", "mosaic_gpu") else "pallas_gpu"


def _plan(opts: _Opts, dtype, m: int, k: int, n: int, num_groups: int, op: str):
    """(kernel family, tiling) of one call. `mosaic_gpu` takes the calls its kernels support
    (`gmm_mosaic_gpu.mosaic_gpu_supports`) and hands the rest to the Triton-lowering ones."""
    backend = _kernel_backend(opts.backend)
    itemsize = jnp.dtype(dtype).itemsize
    if backend == "mosaic_gpu":
        tiling = opts.tiling or choose_tiling(
            m, k, n, num_groups, itemsize, backend, opts.interpret, op=op
        )
        if mosaic_gpu_supports(
            op, dtype, k, n, tiling, transpose_rhs=opts.transpose_rhs, interpret=opts.interpret
        ):
            return backend, tiling
        backend = "pallas_gpu"
    # A given tiling that a Mosaic block cannot use here (the backward gmm contracts over N,
    # which its tn need not divide) falls back to the table.
    given = opts.tiling
    if given is not None and (
        backend == "pallas_gpu"
        and is_triton_tiling(given)
        or backend == "mosaic_tpu"
        and k % given.tk == 0
    ):
        return backend, given
    return backend, choose_tiling(m, k, n, num_groups, itemsize, backend, opts.interpret)


KERNELS = {
    "mosaic_tpu": (gmm_mosaic_tpu, tgmm_mosaic_tpu),
    "mosaic_gpu": (gmm_mosaic_gpu, tgmm_mosaic_gpu),
    "pallas_gpu": (gmm_pallas_gpu, tgmm_pallas_gpu),
}


def _gmm_call(lhs, rhs, group_sizes, opts: _Opts):
    (m, k), num_groups = lhs.shape, rhs.shape[0]
    n = rhs.shape[1 if opts.transpose_rhs else 2]
    if m == 0:
        return jnp.zeros((0, n), opts.out_dtype)
    backend, tiling = _plan(opts, lhs.dtype, m, k, n, num_groups, "gmm")
    lhs, rhs, group_sizes = vary_together(lhs, rhs, group_sizes)
    return KERNELS[backend][0](
        lhs,
        rhs,
        group_sizes,
        tiling=tiling,
        out_dtype=opts.out_dtype,
        interpret=opts.interpret,
        transpose_rhs=opts.transpose_rhs,
    )


def _tgmm_call(lhs, grad, group_sizes, opts: _Opts):
    (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, k, n), opts.out_dtype)
    backend, tiling = _plan(opts, lhs.dtype, m, k, n, num_groups, "tgmm")
    lhs, grad, group_sizes = vary_together(lhs, grad, group_sizes)
    return KERNELS[backend][1](
        lhs,
        grad,
        group_sizes,
        tiling=tiling,
        out_dtype=opts.out_dtype,
        num_groups=num_groups,
        interpret=opts.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, opts):
    return _gmm_call(lhs, rhs, group_sizes, opts)


def _gmm_fwd(lhs, rhs, group_sizes, opts):
    return _gmm_call(lhs, rhs, group_sizes, opts), (lhs, rhs, group_sizes)


def _gmm_bwd(opts, res, dy):
    # y = x @ w[g] (w: [G, K, N]) or, transposed, y = x @ w[g]^T (w: [G, N, K]):
    # dx = dy @ w[g]^T (resp. dy @ w[g]), read in place by flipping transpose_rhs;
    # dw[g] = x^T dy (resp. dy^T x) = tgmm.
    lhs, rhs, group_sizes = res
    dy = dy.astype(lhs.dtype)
    swapped = opts.tiling and Tiling(opts.tiling.tm, opts.tiling.tn, opts.tiling.tk)
    d_lhs = _gmm(
        dy,
        rhs,
        group_sizes,
        opts._replace(out_dtype=lhs.dtype, tiling=swapped, transpose_rhs=not opts.transpose_rhs),
    )
    plain = opts._replace(out_dtype=rhs.dtype, transpose_rhs=False)
    if opts.transpose_rhs:
        d_rhs = _tgmm(dy, lhs, group_sizes, plain._replace(tiling=swapped))
    else:
        d_rhs = _tgmm(lhs, dy, group_sizes, plain)
    return sum_to_vma(d_lhs, lhs), sum_to_vma(d_rhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tgmm(lhs, grad, group_sizes, opts):
    return _tgmm_call(lhs, grad, group_sizes, opts)


def _tgmm_fwd(lhs, grad, group_sizes, opts):
    return _tgmm_call(lhs, grad, group_sizes, opts), (lhs, grad, group_sizes)


def _tgmm_bwd(opts, res, dz):
    lhs, grad, group_sizes = res
    dz = dz.astype(lhs.dtype)
    plain = opts._replace(tiling=None)  # operand shapes differ from the call's: use the table
    d_lhs = _gmm(
        grad, dz, group_sizes, plain._replace(out_dtype=lhs.dtype, transpose_rhs=True)
    )  # dy @ dz[g]^T
    d_grad = _gmm(lhs, dz, group_sizes, plain._replace(out_dtype=grad.dtype))
    return sum_to_vma(d_lhs, lhs), sum_to_vma(d_grad, grad), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _check_group_sizes(group_sizes, num_groups: int | None) -> jax.Array:
    group_sizes = jnp.asarray(group_sizes)
    if group_sizes.ndim != 1 or (num_groups is not None and group_sizes.shape[0] != num_groups):
        want = f"[G]=[{num_groups}]" if num_groups is not None else "[G]"
        raise ValueError(f"group_sizes must have shape {want}; got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers; got dtype {group_sizes.dtype}")
    return group_sizes.astype(jnp.int32)


def _opts(
    a, b, preferred_element_type, tiling, backend, interpret, k, transpose_rhs=False
) -> _Opts:
    backend = resolve_backend(backend)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(a, b))
    if tiling is not None:
        tiling = check_tiling(tiling, k, _kernel_backend(backend))
    return _Opts(out_dtype, tiling, backend, resolve_interpret(interpret), transpose_rhs)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    tiling=None,
    interpret: bool | None = False,
    backend: str | None = "auto",
    transpose_rhs: bool = False,
) -> jax.Array:
    """Grouped matmul `[M, K] x [G, K, N] -> [M, N]`; see the module docstring.

    preferred_element_type: output dtype (default: the operands' dtype); accumulation is
    float32 either way. tiling: `(tm, tk, tn)`, default from the tile table. interpret: run
    the Pallas kernel in interpret mode (required on CPU; None = only on CPU). backend:
    "auto" (from the platform), "mosaic_tpu", "mosaic_gpu", "pallas_gpu" or "jax_triton"
    (same gmm as pallas_gpu). transpose_rhs: rhs is `[G, N, K]` and row r of group g gets
    `lhs[r] @ rhs[g]^T` (read in place, no transposed copy; the backward pass uses it).
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K]; got shape {lhs.shape}")
    layout, k_axis = ("[G, N, K]", 2) if transpose_rhs else ("[G, K, N]", 1)
    if rhs.ndim != 3 or rhs.shape[k_axis] != lhs.shape[1]:
        raise ValueError(
            f"rhs must be {layout} with K = lhs.shape[1] = {lhs.shape[1]}; got shape {rhs.shape}"
        )
    if lhs.dtype != rhs.dtype:
        raise ValueError(
            f"lhs and rhs must have the same dtype; got lhs {lhs.dtype} and rhs {rhs.dtype}"
        )
    group_sizes = _check_group_sizes(group_sizes, rhs.shape[0])
    opts = _opts(
        lhs,
        rhs,
        preferred_element_type,
        tiling,
        backend,
        interpret,
        lhs.shape[1],
        bool(transpose_rhs),
    )
    return _gmm(lhs, rhs, group_sizes, opts)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    tiling=None,
    interpret: bool | None = False,
    backend: str | None = "auto",
) -> jax.Array:
    """Per-group `lhs^T @ grad`: `[M, K], [M, N] -> [G, K, N]` (the weight gradient of gmm).

    Same options as `gmm`; `tiling=(tm, tk, tn)` tiles rows, K and N.
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K]; got shape {lhs.shape}")
    if grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
        raise ValueError(
            f"grad must be [M, N] with M = lhs.shape[0] = {lhs.shape[0]}; got shape {grad.shape}"
        )
    if lhs.dtype != grad.dtype:
        raise ValueError(
            f"lhs and grad must have the same dtype; got lhs {lhs.dtype} and grad {grad.dtype}"
        )
    group_sizes = _check_group_sizes(group_sizes, None)
    opts = _opts(lhs, grad, preferred_element_type, tiling, backend, interpret, lhs.shape[1])
    return _tgmm(lhs, grad, group_sizes, opts)
