"""Sorted-dispatch permutations: values and custom (gather-only) gradients vs autodiff."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe.permute import permute, sort_by_expert, unpermute


def test_sort_by_expert():
    ids = jnp.asarray([[2, 0], [0, 1], [2, 2]], jnp.int32)  # token 2 picks expert 2 twice
    order, inverse, sizes = sort_by_expert(ids, 4)
    np.testing.assert_array_equal(sizes, [2, 1, 3, 0])
    flat = np.asarray(ids).reshape(-1)
    assert list(flat[np.asarray(order)]) == [0, 0, 1, 2, 2, 2]
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(6))


def test_permute_and_unpermute_gradients_match_autodiff():
    rng = np.random.default_rng(0)
    t, k, d = 7, 3, 5
    ids = jnp.asarray(rng.integers(0, 4, size=(t, k)), jnp.int32)
    order, inverse, _ = sort_by_expert(ids.T, 4)  # assignments numbered choice-major
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    probe_a = jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32)
    probe_b = jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32)

    def ours(x):
        xs = permute(x, order, inverse, k)
        return jnp.sum(unpermute(jnp.sin(xs) * probe_a, order, inverse) * probe_b)

    def plain(x):
        xs = x[order % t]
        return jnp.sum((jnp.sin(xs) * probe_a)[inverse] * probe_b)

    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-5, atol=1e-6)
    # Unpermute undoes the sort: each (choice, token) row gets its token back.
    xs = permute(x, order, inverse, k)
    np.testing.assert_array_equal(
        unpermute(xs, order, inverse).reshape(k, t, d), jnp.broadcast_to(x[None], (k, t, d))
    )
    # Each sorted row is its token, in expert order.
    np.testing.assert_array_equal(xs, x[np.asarray(order) % t])
    flat = np.asarray(ids).T.reshape(-1)[np.asarray(order)]
    assert np.all(np.diff(flat) >= 0)
