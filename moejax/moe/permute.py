"""Token permutation for sorted dispatch, with gather-only backward passes.

`permute(x[T, d], order, inverse, k) -> x_sorted[T*k, d]`: row r of the result is token
`order[r] % T` (each token appears k times, once per selected expert): the assignments are
numbered choice-major, a = j*T + t for choice j of token t, so `sort_by_expert` takes
`expert_ids.T`.
`unpermute(y_sorted[T*k, d], order, inverse) -> y[T*k, d]` in (choice, token) order, which
`.reshape(k, T, d)` splits along a major dimension. Token-major numbering would split
`[T*k, d]` into `[T, k, d]`, whose two minor dimensions (k, d) XLA:TPU tiles as (8, 128):
k = 6 pads to 8 and every reshape between the two is a relayout copy (three of 100 MB per
fwd+bwd at the benchmark shape, `experiments/benchmarks/moe_layer_tpu_cost.py`).

Autodiff would transpose these gathers into scatter-adds, which XLA:CPU runs several times
slower than gathers; since `order` is a permutation, both transposes are gathers too:
d x[t] = sum_j g[inverse[j*T + t]] and d y_sorted = g[order].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.moe.one_hot import count_ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    return x[order % x.shape[0]]


def _permute_fwd(x, order, inverse, k):
    return permute(x, order, inverse, k), (order, inverse)


def _permute_bwd(k, res, g):
    order, inverse = res
    t = inverse.shape[0] // k
    dx = g[inverse].reshape(k, t, -1).sum(axis=0)
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
    """(order[T*k], inverse[T*k], group_sizes[E]) of the assignments, numbered in the
    order `expert_ids` flattens: token-major for `[T, k]` ids (the hybrid plan, the
    `pallas` kernels), choice-major for the `[k, T]` transpose that `permute` expects.

    `used` (optional, bool, shaped like `expert_ids`): slots that are not used (zero
    combine weight: padding tokens, empty top-p slots) are sorted after every group and left
    out of `group_sizes`, so the grouped matmul computes nothing for them (its rows past the
    total are zeros).
    """
    flat = expert_ids.reshape(-1)
    if used is not None:
        flat = jnp.where(used.reshape(-1), flat, num_experts)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    group_sizes = count_ids(flat, num_experts)
    return order, inverse, group_sizes
