"""Fused permute / unpermute+combine kernels (CPU interpret mode) and their VJPs against pure
JAX; the jax-triton combine against the same reference where a GPU and jax_triton exist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.permute import sort_by_expert
from pallas_kernels import (
    permute,
    permute_reference,
    unpermute_combine,
    unpermute_combine_reference,
)
from pallas_kernels.triton_combine import combine_rows_triton, triton_available

T, K, E, D = 13, 3, 5, 24


def plan(seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    ids[:6, 0] = 1  # a hot expert; others may be empty
    order, inverse, _ = sort_by_expert(jnp.asarray(ids), E)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    y_sorted = jnp.asarray(rng.normal(size=(T * K, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(T, K)), jnp.float32)
    return order, inverse, x, y_sorted, w


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("backend", ["mosaic_tpu", "pallas_gpu"])
def test_permute_and_vjp_match_pure_jax(backend):
    order, inverse, x, y_sorted, _ = plan()
    kw = {"backend": backend, "interpret": True}
    got = permute(x, order, inverse, K, **kw)
    assert got.shape == (T * K, D)
    np.testing.assert_array_equal(got, permute_reference(x, order, K))  # a copy: exact
    probe = y_sorted  # any [T*k, d] cotangent
    g_got = jax.grad(lambda a: jnp.sum(permute(a, order, inverse, K, **kw) * probe))(x)
    g_want = jax.grad(lambda a: jnp.sum(permute_reference(a, order, K) * probe))(x)
    close(g_got, g_want)


@pytest.mark.parametrize("backend", ["mosaic_tpu", "pallas_gpu"])
def test_unpermute_combine_and_vjp_match_pure_jax(backend):
    order, inverse, x, y_sorted, w = plan(seed=1)
    kw = {"backend": backend, "interpret": True}
    got = unpermute_combine(y_sorted, order, inverse, w, **kw)
    close(got, unpermute_combine_reference(y_sorted, order, w))
    probe = x  # any [T, d] cotangent

    def loss(fn):
        return lambda ys, ww: jnp.sum(jnp.tanh(fn(ys, ww)) * probe)

    got_g = jax.jit(
        jax.grad(
            loss(lambda ys, ww: unpermute_combine(ys, order, inverse, ww, **kw)), argnums=(0, 1)
        )
    )(y_sorted, w)
    want_g = jax.grad(
        loss(lambda ys, ww: unpermute_combine_reference(ys, order, ww)), argnums=(0, 1)
    )(y_sorted, w)
    for g, r in zip(got_g, want_g):
        close(g, r)


def test_bfloat16_rows_accumulate_in_float32():
    order, inverse, _, y_sorted, w = plan(seed=2)
    y16 = y_sorted.astype(jnp.bfloat16)
    got = unpermute_combine(y16, order, inverse, w, backend="mosaic_tpu", interpret=True)
    assert got.dtype == jnp.bfloat16
    want = unpermute_combine_reference(y16.astype(jnp.float32), order, w)
    close(got, want, tol=1e-2)


def test_bad_plans_are_named():
    order, inverse, x, y_sorted, w = plan()
    with pytest.raises(ValueError, match="inverse must be"):
        permute(x, order, inverse[:-1], K, interpret=True)
    with pytest.raises(ValueError, match="y_sorted must be"):
        unpermute_combine(y_sorted[:-1], order, inverse, w, interpret=True)
    with pytest.raises(ValueError, match="order must be"):
        unpermute_combine(y_sorted, order.astype(jnp.float32), inverse, w, interpret=True)


def test_triton_reports_why_it_cannot_run():
    ok, reason = triton_available()
    assert ok or reason  # never silently unavailable
    if not ok:
        with pytest.raises(RuntimeError, match="jax_triton"):
            combine_rows_triton(jnp.zeros((4, 8)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2)))


@pytest.mark.skipif(not triton_available()[0], reason=triton_available()[1] or "available")
def test_triton_combine_matches_pure_jax():
    order, inverse, _, y_sorted, w = plan(seed=3)
    got = combine_rows_triton(y_sorted, inverse.reshape(T, K), w)
    close(got, unpermute_combine_reference(y_sorted, order, w))
    got = unpermute_combine(y_sorted, order, inverse, w, backend="jax_triton")
    close(got, unpermute_combine_reference(y_sorted, order, w))
