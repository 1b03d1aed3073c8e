"""Linear projections computed as one 2-D matmul over the flattened tokens.

    project(x[..., K_1..K_c], w[K_1..K_c, N_1..N_m])
        = einsum over the K axes
        = (x.reshape(T, K) @ w.reshape(K, N)).reshape(..., N_1..N_m)

with T the product of x's leading (token) axes, K = prod K_i and N = prod N_j. The result is
the einsum's; only the shape of the matmul XLA sees changes. XLA:CPU runs a projection of a
3-D activation (`[B, L, d] @ [d, f]`, whose weight gradient contracts over both B and L) about
1.8x slower, forward and backward, than the same projection on `[B * L, d]`; on TPU and GPU
the reshapes are free (they merge major dimensions, so a batch-sharded `B` stays sharded).
Every projection of the models (attention, MLA, SwiGLU, LM head) goes through here.
"""

from __future__ import annotations

import math

import jax


def project(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """`x`'s last `contract` axes contracted with `w`'s first `contract` axes (module
    docstring): `[..., *w.shape[:contract]] -> [..., *w.shape[contract:]]`."""
    k_shape, n_shape = w.shape[:contract], w.shape[contract:]
    if x.shape[x.ndim - contract :] != k_shape:
        raise ValueError(
            f"project: input axes {x.shape[x.ndim - contract :]} do not match the weight's "
            f"contracted axes {k_shape} (x {x.shape}, w {w.shape})"
        )
    lead = x.shape[: x.ndim - contract]
    k = math.prod(k_shape)
    y = x.reshape(-1, k) @ w.reshape(k, math.prod(n_shape))
    return y.reshape(lead + n_shape)
