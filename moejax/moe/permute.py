"""Token permutation for sorted dispatch, with gather-only backward passes.

`permute(x[T, d], order, inverse, k) -> x_sorted[T*k, d]`: row r of the result is token
`order[r] // k` (each token appears k times, once per selected expert).
`unpermute(y_sorted[T*k, d], order, inverse) -> y[T*k, d]` in (token, choice) order.

Autodiff would transpose these gathers into scatter-adds, which XLA:CPU runs several times
slower than gathers; since `order` is a permutation, both transposes are gathers too:
d x[t] = sum_j g[inverse[t*k + j]] and d y_sorted = g[order].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.moe.one_hot import count_ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    return x[order // k]


def _permute_fwd(x, order, inverse, k):
    return permute(x, order, inverse, k), (order, inverse)


def _permute_bwd(k, res, g):
    order, inverse = res
    t = inverse.shape[0] // k
    dx = g[inverse].reshape(t, k, -1).sum(axis=1)
    return dx, None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(y_sorted: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    return y_sorted[inverse]


def _unpermute_fwd(y_sorted, order, inverse):
    return unpermute(y_sorted, order, inverse), (order, inverse)


def _unpermute_bwd(res, g):
    order, inverse = res
    return g[order], None, None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def sort_by_expert(expert_ids: jax.Array, num_experts: int, used: jax.Array | None = None):
    """(order[T*k], inverse[T*k], group_sizes[E]) of the (token, choice) assignments.

    `used[T, k]` (optional, bool): slots that are not used (zero combine weight: padding
    tokens, empty top-p slots) are sorted after every group and left out of `group_sizes`,
    so the grouped matmul computes nothing for them (its rows past the total are zeros).
    """
    flat = expert_ids.reshape(-1)
    if used is not None:
        flat = jnp.where(used.reshape(-1), flat, num_experts)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    group_sizes = count_ids(flat, num_experts)
    return order, inverse, group_sizes
