"""Grouped matmul against float64 NumPy: values, empty/unaligned groups, tails, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.grouped_matmul import gmm, make_tile_plan, tgmm
from pallas_kernels import gmm_reference, tgmm_reference


def numpy_gmm(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, n in enumerate(np.asarray(sizes)):
        out[start : start + n] = lhs[start : start + n] @ rhs[g]
        start += n
    return out


def numpy_tgmm(lhs, grad, sizes):
    lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
    out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]))
    start = 0
    for g, n in enumerate(np.asarray(sizes)):
        out[g] = lhs[start : start + n].T @ grad[start : start + n]
        start += n
    return out


CASES = [
    # (group sizes, M, tile): empty groups, groups not aligned to tiles, rows past the sum.
    ([5, 0, 17, 3, 0, 9], 40, 4),
    ([0, 0, 33], 33, 8),
    ([64, 64], 128, 64),
    ([1, 1, 1, 1], 10, 16),
    ([0, 0, 0], 6, 4),
]


@pytest.mark.parametrize("sizes,m,tile", CASES)
def test_gmm_matches_numpy(sizes, m, tile):
    rng = np.random.default_rng(0)
    lhs = rng.normal(size=(m, 12)).astype(np.float32)
    rhs = rng.normal(size=(len(sizes), 12, 7)).astype(np.float32)
    sizes = np.array(sizes, np.int32)
    want = numpy_gmm(lhs, rhs, sizes)
    got = jax.jit(lambda a, b, s: gmm(a, b, s, tile=tile))(lhs, rhs, sizes)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(got)[sizes.sum() :] == 0)
    np.testing.assert_allclose(gmm_reference(lhs, rhs, sizes), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gmm(lhs, rhs, sizes, impl="ragged_dot"), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sizes,m,tile", CASES)
def test_tgmm_matches_numpy(sizes, m, tile):
    rng = np.random.default_rng(1)
    lhs = rng.normal(size=(m, 6)).astype(np.float32)
    grad = rng.normal(size=(m, 5)).astype(np.float32)
    sizes = np.array(sizes, np.int32)
    got = tgmm(lhs, grad, sizes, tile=tile)
    want = numpy_tgmm(lhs, grad, sizes)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(tgmm_reference(lhs, grad, sizes), want, atol=1e-4, rtol=1e-4)


def test_gmm_gradients_match_reference():
    rng = np.random.default_rng(2)
    sizes = jnp.array([7, 0, 12, 1], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(24, 10)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(4, 10, 6)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.tanh(fn(a, b, sizes)) * probe)

    got = jax.grad(loss(lambda a, b, s: gmm(a, b, s, tile=4)), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(loss(gmm_reference), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    # Rows past sum(sizes) get no gradient, as they feed no output.
    assert np.all(np.asarray(got[0])[20:] == 0)


def test_tile_plan_covers_each_group_exactly():
    sizes = jnp.array([5, 0, 17, 3], jnp.int32)
    plan = make_tile_plan(sizes, 25, 4)
    n = int(plan.count)
    assert n == 2 + 0 + 5 + 1
    rows = np.zeros(25, int)
    for t in range(n):
        rows[int(plan.start[t]) : int(plan.start[t]) + int(plan.rows[t])] += 1
        assert int(plan.rows[t]) > 0
    np.testing.assert_array_equal(rows, np.ones(25))
    np.testing.assert_array_equal(np.asarray(plan.group[:n]), [0, 0, 2, 2, 2, 2, 2, 3])


def test_gmm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rhs"):
        gmm(jnp.zeros((4, 3)), jnp.zeros((2, 5, 3)), jnp.array([2, 2]))
    with pytest.raises(ValueError, match="impl"):
        gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 3)), jnp.array([2, 2]), impl="nope")


def test_gmm_bfloat16_operands():
    rng = np.random.default_rng(5)
    sizes = jnp.array([9, 0, 20, 3], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.bfloat16)
    got = gmm(lhs, rhs, sizes, tile=8)
    assert got.dtype == jnp.bfloat16
    want = numpy_gmm(np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), sizes)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=2e-2)
    d_rhs = jax.grad(lambda b: jnp.sum(gmm(lhs, b, sizes, tile=8).astype(jnp.float32)))(rhs)
    assert d_rhs.dtype == jnp.bfloat16
