"""Counting and picking experts with one-hot reductions instead of scatters and gathers.

Routing works on small operands with many indices: the `[E]` expert loads of T*k
assignments, the `[T, k]` weights picked from the `[T, E]` router probabilities (and their
gradient, a scatter back into `[T, E]`). XLA:TPU expands a scatter-add of T*k updates into a
tiny operand into a serial loop: compiled for a v5p chip (jax 0.10.2, libtpu 0.0.42) at
T*k = 49,152 and E = 64, its cost analysis charges 8.6 GB for one such count and 8.7 GB for
the gradient of `lax.top_k`'s values, against under 0.05 GB for these one-hot forms
(`experiments/benchmarks/moe_layer_tpu_cost.py`). The one-hot products here are elementwise
(multiply, then reduce) rather than matmuls, so they are exact in float32 on every platform:
TPU's default matmul precision would round them to bfloat16. This is the one-hot routing
of GShard (Lepikhin et al., 2020) and MaxText, kept to the `[T, k, E]` reductions it needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def count_ids(ids: jax.Array, n: int, weights: jax.Array | None = None) -> jax.Array:
    """`out[j] = sum of weights[i] over positions i with ids[i] == j`, for j < n (ids outside
    [0, n) count nowhere). Without `weights`, exact int32 counts; with them, float32."""
    hits = ids[..., None] == jnp.arange(n, dtype=ids.dtype)
    axes = tuple(range(ids.ndim))
    if weights is None:
        return jnp.sum(hits.astype(jnp.int32), axis=axes)
    return jnp.sum(hits * weights.astype(jnp.float32)[..., None], axis=axes)


def take_experts(values: jax.Array, ids: jax.Array) -> jax.Array:
    """`values[t, ids[t, j]]` -> `[T, k]`, differentiable in `values` without a scatter."""
    hits = ids[..., None] == jnp.arange(values.shape[-1], dtype=ids.dtype)
    return jnp.sum(jnp.where(hits, values[..., None, :], jnp.zeros((), values.dtype)), axis=-1)
