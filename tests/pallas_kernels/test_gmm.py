"""Pallas `gmm`/`tgmm` (both backends, CPU interpret mode) against the pure-JAX references:
empty groups, one group holding every row, groups and M not multiples of the tile, rows past
sum(group_sizes), bf16, gradients, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import f32, rel_err

from pallas_kernels import gmm, gmm_reference, tgmm, tgmm_reference
from pallas_kernels.tiling import choose_tiling, make_work_items

BACKENDS = ["mosaic_tpu", "pallas_gpu"]
# (group sizes, M): tile is 16 rows below, so every case has groups not aligned to it.
CASES = [
    ([5, 0, 17, 3, 0, 9], 40),  # empty groups, M not a multiple of 16, 6 rows past the total
    ([0, 0, 33], 33),  # one group holds every row
    ([3, 0, 0, 1], 37),  # 33 rows past the total
    ([0, 0, 0], 20),  # nothing to compute: all zeros
]
TILING = {"mosaic_tpu": (16, 8, 8), "pallas_gpu": (16, 16, 16)}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def operands(m, num_groups, k=16, n=24, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)), dtype)
    grad = jnp.asarray(rng.normal(size=(m, n)), dtype)
    return lhs, rhs, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,m", CASES)
def test_gmm_and_tgmm_match_reference(backend, sizes, m):
    lhs, rhs, grad = operands(m, len(sizes))
    sizes = jnp.asarray(sizes, jnp.int32)
    kw = {"tiling": TILING[backend], "interpret": True, "backend": backend}
    out = gmm(lhs, rhs, sizes, **kw)
    want = gmm_reference(lhs, rhs, sizes)
    assert out.shape == (m, rhs.shape[2]) and out.dtype == jnp.float32
    assert np.all(np.asarray(out)[int(sizes.sum()) :] == 0)  # rows past the total
    if int(sizes.sum()):
        assert rel_err(out, want) < 1e-5
    d_rhs = tgmm(lhs, grad, sizes, **kw)
    assert d_rhs.shape == rhs.shape
    want_t = tgmm_reference(lhs, grad, sizes)
    assert np.all(np.asarray(d_rhs)[np.asarray(sizes) == 0] == 0)  # empty groups: zero
    if int(sizes.sum()):
        assert rel_err(d_rhs, want_t) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_group_sizes_bf16_and_default_tiles(backend):
    rng = np.random.default_rng(7)
    m, g = 77, 9
    sizes = rng.multinomial(70, rng.dirichlet(np.full(g, 0.3)))  # skewed, some empty
    sizes[rng.choice(g, 2, replace=False)] = 0
    sizes = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, grad = operands(m, g, k=32, n=40, dtype=jnp.bfloat16, seed=3)
    kw = {"interpret": True, "backend": backend}  # tiles from the table
    out = gmm(lhs, rhs, sizes, **kw)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, gmm_reference(*f32(lhs, rhs), sizes)) < TOL[jnp.bfloat16]
    out32 = gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, **kw)
    assert out32.dtype == jnp.float32
    assert rel_err(out32, gmm_reference(*f32(lhs, rhs), sizes)) < TOL[jnp.bfloat16]
    d_rhs = tgmm(lhs, grad, sizes, **kw)
    assert rel_err(d_rhs, tgmm_reference(*f32(lhs, grad), sizes)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_through_gmm_matches_reference(backend):
    sizes = jnp.asarray([7, 0, 12, 1], jnp.int32)
    lhs, rhs, _ = operands(24, 4, k=16, n=16, seed=2)
    probe = jnp.asarray(np.random.default_rng(5).normal(size=(24, 16)), jnp.float32)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.tanh(fn(a, b)) * probe)

    def kernel(a, b):
        return gmm(a, b, sizes, tiling=TILING[backend], interpret=True, backend=backend)

    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(lhs, rhs)
    want = jax.grad(loss(lambda a, b: gmm_reference(a, b, sizes)), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    assert np.all(np.asarray(got[0])[20:] == 0)  # rows past the total feed no output


def test_grad_through_tgmm_matches_reference():
    sizes = jnp.asarray([5, 0, 11], jnp.int32)
    lhs, _, grad = operands(20, 3, k=8, n=8, seed=4)
    probe = jnp.asarray(np.random.default_rng(6).normal(size=(3, 8, 8)), jnp.float32)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.sin(fn(a, b)) * probe)

    def kernel(a, b):
        return tgmm(a, b, sizes, tiling=(8, 8, 8), interpret=True, backend="mosaic_tpu")

    got = jax.grad(loss(kernel), argnums=(0, 1))(lhs, grad)
    want = jax.grad(loss(lambda a, b: tgmm_reference(a, b, sizes)), argnums=(0, 1))(lhs, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_work_items_cover_every_row_once():
    sizes = jnp.asarray([5, 0, 17, 3, 0, 9], jnp.int32)
    m, tm = 40, 8
    items = jax.tree.map(
        np.asarray, make_work_items(sizes, m, tm, cover_tail=True, visit_empty_groups=False)
    )
    count = int(items.count[0])
    assert items.group.shape == (-(-m // tm) + 6,) and count <= items.group.shape[0]
    covered = np.zeros(m, int)
    for i in range(count):
        rows = np.arange(items.m_tile[i] * tm, (items.m_tile[i] + 1) * tm)
        covered[rows[(rows >= items.lo[i]) & (rows < items.hi[i])]] += 1
    np.testing.assert_array_equal(covered, np.ones(m))
    assert np.all(np.diff(items.m_tile[:count]) >= 0)  # a row tile's visits are consecutive
    assert items.real[count - 1] == 0  # the last item is the zero-filled tail
    # Padding items repeat the last real one, so the kernels keep the same blocks.
    assert np.all(items.m_tile[count:] == items.m_tile[count - 1])
    t_items = make_work_items(sizes, m, tm, cover_tail=False, visit_empty_groups=True)
    groups = np.asarray(t_items.group[: int(t_items.count[0])])
    assert set(groups) == set(range(6))  # empty groups get an item too


def test_tile_table():
    assert choose_tiling(16384 * 6, 2048, 1408, 64, 2, "mosaic_tpu") == (512, 512, 128)
    assert choose_tiling(4096, 4096, 14336, 64, 2, "mosaic_tpu").tm == 128
    assert choose_tiling(4096, 4096, 14336, 8, 2, "pallas_gpu") == (128, 64, 128)
    assert choose_tiling(40, 12, 7, 6, 4, "mosaic_tpu", interpret=True) == (40, 12, 7)


def test_bad_arguments_are_named():
    lhs, rhs, grad = operands(8, 2, k=4, n=4)
    sizes = jnp.asarray([4, 4], jnp.int32)
    kw = {"interpret": True}
    with pytest.raises(ValueError, match="rhs must be"):
        gmm(lhs, jnp.zeros((2, 5, 4)), sizes, **kw)
    with pytest.raises(ValueError, match="lhs must be"):
        gmm(lhs[0], rhs, sizes, **kw)
    with pytest.raises(ValueError, match="group_sizes must have shape"):
        gmm(lhs, rhs, jnp.asarray([8], jnp.int32), **kw)
    with pytest.raises(ValueError, match="group_sizes must be integers"):
        gmm(lhs, rhs, jnp.asarray([4.0, 4.0]), **kw)
    with pytest.raises(ValueError, match="same dtype"):
        gmm(lhs, rhs.astype(jnp.bfloat16), sizes, **kw)
    with pytest.raises(ValueError, match="grad must be"):
        tgmm(lhs, grad[:5], sizes, **kw)
    with pytest.raises(ValueError, match="same dtype"):
        tgmm(lhs, grad.astype(jnp.bfloat16), sizes, **kw)
    with pytest.raises(ValueError, match="tk=3 must divide K=4"):
        gmm(lhs, rhs, sizes, tiling=(8, 3, 4), backend="mosaic_tpu", **kw)
    with pytest.raises(ValueError, match="powers of two"):
        gmm(lhs, rhs, sizes, tiling=(24, 16, 16), backend="pallas_gpu", **kw)
    with pytest.raises(ValueError, match="backend='cuda' is unknown"):
        gmm(lhs, rhs, sizes, backend="cuda", **kw)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            gmm(lhs, rhs, sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_rhs_and_its_gradient_match_reference(backend):
    sizes = jnp.asarray([0, 9, 14], jnp.int32)
    lhs, _, _ = operands(26, 3, k=16, n=16, seed=8)
    rhs_t = jnp.asarray(np.random.default_rng(9).normal(size=(3, 32, 16)), jnp.float32)  # [G,N,K]
    probe = jnp.asarray(np.random.default_rng(10).normal(size=(26, 32)), jnp.float32)
    kw = {"tiling": TILING[backend], "interpret": True, "backend": backend, "transpose_rhs": True}

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.tanh(fn(a, b)) * probe)

    def ref(a, b):
        return gmm_reference(a, jnp.swapaxes(b, 1, 2), sizes)

    assert rel_err(gmm(lhs, rhs_t, sizes, **kw), ref(lhs, rhs_t)) < 1e-5
    got = jax.grad(loss(lambda a, b: gmm(a, b, sizes, **kw)), argnums=(0, 1))(lhs, rhs_t)
    want = jax.grad(loss(ref), argnums=(0, 1))(lhs, rhs_t)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    with pytest.raises(ValueError, match=r"rhs must be \[G, N, K\]"):
        gmm(lhs, jnp.swapaxes(rhs_t, 1, 2), sizes, **kw)
