"""Pure-JAX references for the grouped-matmul kernels: the ground truth kernels test against.

`gmm_reference(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> [M, N]`: rows of `lhs` are sorted
by group; row r of group g is multiplied by `rhs[g]`; rows past `sum(group_sizes)` give 0.
`tgmm_reference(lhs[M, K], grad[M, N], group_sizes) -> [G, K, N]`: per-group `lhs.T @ grad`,
the weight gradient of `gmm`. Both use a one-hot row->group mask: O(M * G) memory, exact,
and differentiable by plain autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group of each of the m rows; rows past the end get G (an out-of-range group)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m), side="right")


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(
        row_groups(group_sizes, lhs.shape[0]), rhs.shape[0], dtype=lhs.dtype
    )  # all-zero rows past the end
    return jnp.einsum("mk,gkn,mg->mn", lhs, rhs, onehot)


def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(
        row_groups(group_sizes, lhs.shape[0]), group_sizes.shape[0], dtype=lhs.dtype
    )
    return jnp.einsum("mk,mn,mg->gkn", lhs, grad, onehot)


def permute_reference(x: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """Row r of the result is token `order[r] // k` (the expert-sorted, top-k-duplicated x)."""
    return x[order // k]


def unpermute_combine_reference(
    y_sorted: jax.Array, order: jax.Array, weights: jax.Array
) -> jax.Array:
    """`y[t] = sum_j weights[t, j] * y_sorted[r]` where `order[r] = t*k + j` (a scatter-add)."""
    t, k = weights.shape
    w_sorted = weights.reshape(-1)[order].astype(y_sorted.dtype)
    return (
        jnp.zeros((t, y_sorted.shape[1]), y_sorted.dtype)
        .at[order // k]
        .add(y_sorted * w_sorted[:, None])
    )
