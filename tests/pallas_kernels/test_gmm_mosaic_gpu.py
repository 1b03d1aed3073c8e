"""The Mosaic GPU grouped matmuls (`pallas_kernels/gmm_mosaic_gpu.py`) against the pure-JAX
references: on CPU in Mosaic GPU interpret mode, on a GPU compiled (there the Triton-lowering
kernels are checked compiled too). Tiles are multiples of 64, so every case below has groups
that do not align to them, M not a multiple of them, empty groups and rows past the total."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import f32, rel_err

from pallas_kernels import gmm, gmm_reference, tgmm, tgmm_reference
from pallas_kernels.gmm import _Opts, _plan
from pallas_kernels.gmm_mosaic_gpu import INTERPRET_TRANSPOSES, gmm_mosaic_gpu, tgmm_mosaic_gpu
from pallas_kernels.tiling import Tiling, check_tiling, choose_tiling

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TILE = Tiling(64, 64, 64)
CASES = [
    ([70, 0, 50, 60], 200),  # empty group, 20 rows past the total, M % 64 != 0
    ([0, 0, 130], 130),  # one group holds every row
    ([0, 0, 0], 64),
]  # nothing to compute
needs_transposes = pytest.mark.skipif(
    INTERPRET and not INTERPRET_TRANSPOSES,
    reason="jax < 0.11: the Mosaic GPU interpreter reads no transposed shared-memory operand; "
    "this runs compiled on a GPU",
)


def operands(m, g, k=64, n=128, seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return make(m, k), make(g, k, n), make(m, n)


@pytest.mark.parametrize(
    "sizes,m,tiling", [(*case, TILE) for case in CASES] + [(CASES[0][0], 200, Tiling(192, 64, 128))]
)  # the GPU's row tile
def test_gmm_kernel_matches_reference(sizes, m, tiling):
    lhs, rhs, _ = operands(m, len(sizes), seed=len(sizes))
    sizes = jnp.asarray(sizes, jnp.int32)
    out = gmm_mosaic_gpu(lhs, rhs, sizes, tiling=tiling, out_dtype=jnp.float32, interpret=INTERPRET)
    assert out.shape == (m, rhs.shape[2])
    total = int(sizes.sum())
    assert np.all(np.asarray(out)[total:] == 0)  # rows past the total are written as zeros
    if total:  # bf16 products are exact in float32: only the summation order differs
        assert rel_err(out, gmm_reference(*f32(lhs, rhs), sizes)) < 1e-5


@needs_transposes
@pytest.mark.parametrize("sizes,m", CASES[:2])
def test_tgmm_and_transposed_gmm_kernels_match_reference(sizes, m):
    lhs, rhs, grad = operands(m, len(sizes), seed=7)
    sizes = jnp.asarray(sizes, jnp.int32)
    d_rhs = tgmm_mosaic_gpu(
        lhs,
        grad,
        sizes,
        tiling=TILE,
        out_dtype=jnp.float32,
        num_groups=len(sizes),
        interpret=INTERPRET,
    )
    assert np.all(np.asarray(d_rhs)[np.asarray(sizes) == 0] == 0)  # empty groups: zero
    assert rel_err(d_rhs, tgmm_reference(*f32(lhs, grad), sizes)) < 1e-5
    out = gmm_mosaic_gpu(
        lhs,
        jnp.swapaxes(rhs, 1, 2),
        sizes,
        tiling=TILE,
        out_dtype=jnp.float32,
        interpret=INTERPRET,
        transpose_rhs=True,
    )
    assert rel_err(out, gmm_reference(*f32(lhs, rhs), sizes)) < 1e-5


@pytest.mark.parametrize("backend", ["mosaic_gpu"] + (["pallas_gpu"] if ON_GPU else []))
def test_gmm_bf16_and_its_gradient_through_the_public_api(backend):
    rng = np.random.default_rng(3)
    g, m = 6, 300
    sizes = rng.multinomial(260, rng.dirichlet(np.full(g, 0.3)))  # skewed, 40 rows past
    sizes[0] = 0
    sizes = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, _ = operands(m, g, k=128, n=192, seed=5)
    probe = jnp.asarray(rng.normal(size=(m, 192)), jnp.float32)
    kw = {"backend": backend, "interpret": INTERPRET}
    out = gmm(lhs, rhs, sizes, **kw)  # tiles from the table; bf16 output
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, gmm_reference(*f32(lhs, rhs), sizes)) < 1e-2

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.tanh(fn(a, b).astype(jnp.float32)) * probe)

    got = jax.jit(jax.grad(loss(lambda a, b: gmm(a, b, sizes, **kw)), argnums=(0, 1)))(lhs, rhs)
    want = jax.grad(loss(lambda a, b: gmm_reference(a, b, sizes)), argnums=(0, 1))(*f32(lhs, rhs))
    for got_i, want_i in zip(got, want):
        assert got_i.dtype == jnp.bfloat16 and rel_err(got_i, want_i) < 2e-2
    d_rhs = tgmm(lhs, jnp.asarray(probe, jnp.bfloat16), sizes, **kw)
    assert rel_err(d_rhs, tgmm_reference(*f32(lhs, probe.astype(jnp.bfloat16)), sizes)) < 1e-2


def test_mosaic_gpu_takes_16_bit_fitting_calls_and_hands_the_rest_on():
    def plan(dtype, k, n, op="gmm", tiling=None, transpose_rhs=False):
        opts = _Opts(jnp.dtype(dtype), tiling, "mosaic_gpu", False, transpose_rhs)
        return _plan(opts, dtype, 4096, k, n, 8, op)

    assert plan(jnp.bfloat16, 2048, 1408) == ("mosaic_gpu", (128, 64, 128))
    assert plan(jnp.float16, 2048, 1408, "tgmm") == ("mosaic_gpu", (64, 128, 128))
    assert plan(jnp.bfloat16, 2048, 1344) == ("mosaic_gpu", (128, 64, 64))  # 1344 = 21 x 64
    assert plan(jnp.float32, 2048, 1408)[0] == "pallas_gpu"  # no float32-accurate wgmma
    assert plan(jnp.bfloat16, 2000, 1408)[0] == "pallas_gpu"  # K not a multiple of 64
    assert plan(jnp.bfloat16, 2048, 1400, "tgmm")[0] == "pallas_gpu"
    fallback = plan(jnp.bfloat16, 2000, 1408, tiling=Tiling(192, 64, 128))
    assert fallback == ("pallas_gpu", (128, 64, 128))  # 192 is no Triton tile: the table's
    assert choose_tiling(200, 64, 64, 4, 2, "mosaic_gpu", interpret=True) == TILE
    assert choose_tiling(16384 * 6, 2048, 1408, 64, 2, "mosaic_gpu") == (192, 64, 128)
    with pytest.raises(ValueError, match="multiples of 64"):
        check_tiling((128, 32, 128), 2048, "mosaic_gpu")


def test_auto_picks_mosaic_gpu_on_hopper_only(monkeypatch):
    from pallas_kernels import backend

    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    for capability, want in [
        ("9.0", "mosaic_gpu"),
        ("8.0", "pallas_gpu"),
        ("10.0", "pallas_gpu"),
        ("gfx90a", "pallas_gpu"),
    ]:
        monkeypatch.setattr(backend, "compute_capability", lambda c=capability: c)
        assert backend.resolve_backend("auto") == want, capability
    with pytest.raises(ValueError, match="backend='mosaic_gpu' needs a Hopper GPU.*gfx90a"):
        backend.resolve_backend("mosaic_gpu")
    assert backend.resolve_backend("pallas_gpu") == "pallas_gpu"
