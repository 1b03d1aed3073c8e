"""Fused MoE token permutation as kernels with their own VJPs.

`permute(x[T, d], order[T*k], inverse[T*k], k) -> x_sorted[T*k, d]`: row r is token
`order[r] // k`, so every token appears once per chosen expert, rows in expert order
(`order` sorts the flattened `(token, choice)` assignments by expert; `inverse` is its
inverse permutation).
`unpermute_combine(y_sorted[T*k, d], order, inverse, weights[T, k]) -> y[T, d]`:
`y[t] = sum_j weights[t, j] * y_sorted[inverse[t*k + j]]`, the unpermute, the scatter-add
and the combine weights in one pass (MegaBlocks, Gale et al., 2022, arXiv 2211.15841).

Each is built from the row kernels of `permute_kernels.py` and is the other's transpose:
- d permute: `dx[t] = sum_j g[inverse[t*k + j]]` = combine with unit weights;
- d unpermute_combine / d y_sorted: `g_sorted[r] = w[order[r]] * g[order[r] // k]` = gather
  with a per-row scale; d weights: `dw[t, j] = <y_sorted[inverse[t*k + j]], g[t]>` (XLA).
Pure-JAX ground truth: `pallas_kernels.reference.permute_reference` / `unpermute_combine_reference`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend, resolve_interpret
from pallas_kernels.manual_axes import sum_to_vma, vary_together
from pallas_kernels.permute_kernels import (
    combine_rows_gpu,
    combine_rows_tpu,
    gather_rows_gpu,
    gather_rows_tpu,
)


class _Opts(NamedTuple):
    backend: str
    interpret: bool


def _gather(x, src, scale, opts: _Opts):
    fn = gather_rows_tpu if opts.backend == "mosaic_tpu" else gather_rows_gpu
    x, src, scale = vary_together(x, src.astype(jnp.int32), scale.astype(jnp.float32))
    return fn(x, src, scale, interpret=opts.interpret)


def _combine(y, idx, weights, opts: _Opts):
    if opts.backend == "jax_triton":
        from pallas_kernels.triton_combine import combine_rows_triton

        return combine_rows_triton(y, idx, weights)
    fn = combine_rows_tpu if opts.backend == "mosaic_tpu" else combine_rows_gpu
    y, idx, weights = vary_together(y, idx.astype(jnp.int32), weights.astype(jnp.float32))
    return fn(y, idx, weights, interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _permute(x, order, inverse, k, opts):
    return _gather(x, order // k, jnp.ones(order.shape, jnp.float32), opts)


def _permute_fwd(x, order, inverse, k, opts):
    return _permute(x, order, inverse, k, opts), (order, inverse)


def _permute_bwd(k, opts, res, g):
    order, inverse = res
    idx = inverse.reshape(-1, k)
    return _combine(g, idx, jnp.ones(idx.shape, jnp.float32), opts), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _unpermute_combine(y_sorted, order, inverse, weights, opts):
    return _combine(y_sorted, inverse.reshape(weights.shape), weights, opts)


def _unpermute_fwd(y_sorted, order, inverse, weights, opts):
    return _unpermute_combine(y_sorted, order, inverse, weights, opts), (
        y_sorted,
        order,
        inverse,
        weights,
    )


def _unpermute_bwd(opts, res, g):
    y_sorted, order, inverse, weights = res
    t, k = weights.shape
    d_y = _gather(g, order // k, weights.reshape(-1)[order], opts).astype(y_sorted.dtype)
    rows = y_sorted[inverse].reshape(t, k, -1).astype(jnp.float32)
    d_w = jnp.einsum("tkd,td->tk", rows, g.astype(jnp.float32)).astype(weights.dtype)
    return sum_to_vma(d_y, y_sorted), None, None, sum_to_vma(d_w, weights)


_unpermute_combine.defvjp(_unpermute_fwd, _unpermute_bwd)


def _check_plan(order, inverse, rows: int, name: str) -> None:
    for arg, value in (("order", order), ("inverse", inverse)):
        if value.shape != (rows,) or not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(
                f"{name}: {arg} must be an integer vector of shape [T*k]=[{rows}]; "
                f"got {value.dtype}{list(value.shape)}"
            )


def permute(
    x: jax.Array,
    order: jax.Array,
    inverse: jax.Array,
    k: int,
    *,
    backend: str | None = "auto",
    interpret: bool | None = False,
) -> jax.Array:
    """`[T, d] -> [T*k, d]` in expert order; see the module docstring.

    backend: as for `pallas_kernels.gmm`; interpret: run in Pallas interpret mode (required
    on CPU; None = only on CPU).
    """
    if x.ndim != 2:
        raise ValueError(f"permute: x must be [T, d]; got shape {x.shape}")
    _check_plan(order, inverse, x.shape[0] * k, "permute")
    opts = _Opts(resolve_backend(backend), resolve_interpret(interpret))
    return _permute(x, order.astype(jnp.int32), inverse.astype(jnp.int32), k, opts)


def unpermute_combine(
    y_sorted: jax.Array,
    order: jax.Array,
    inverse: jax.Array,
    weights: jax.Array,
    *,
    backend: str | None = "auto",
    interpret: bool | None = False,
) -> jax.Array:
    """`[T*k, d] -> [T, d]`, weighted sum of each token's k expert outputs."""
    if weights.ndim != 2:
        raise ValueError(f"unpermute_combine: weights must be [T, k]; got shape {weights.shape}")
    if y_sorted.ndim != 2 or y_sorted.shape[0] != weights.size:
        raise ValueError(
            f"unpermute_combine: y_sorted must be [T*k, d]=[{weights.size}, d]; "
            f"got shape {y_sorted.shape}"
        )
    _check_plan(order, inverse, weights.size, "unpermute_combine")
    opts = _Opts(resolve_backend(backend), resolve_interpret(interpret))
    return _unpermute_combine(
        y_sorted, order.astype(jnp.int32), inverse.astype(jnp.int32), weights, opts
    )
