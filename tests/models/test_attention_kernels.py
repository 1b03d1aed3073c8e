"""The blockwise attention implementations against the materialised-scores XLA path, on CPU.

The splash kernel (TPU) runs in Pallas interpret mode and the plain-JAX blockwise kernel
natively; both must equal `jax.nn.dot_product_attention` with the causal, per-segment mask
to float32 tolerance, forward and backward, for grouped-query heads, packed segments,
lengths that are not multiples of the tile, and MLA's head dims (q/k 192, v 128). The GQA
and MLA modules with `model.attention_impl="flash"` must equal their `"xla"` selves.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy_model_reference as ref
import pytest

from moejax.models.attention import Attention
from moejax.models.attention_kernels import (
    attention_mask,
    blockwise_attention,
    causal_attention,
    resolve_impl,
    splash_attention,
)
from moejax.models.config import ModelConfig
from moejax.models.mla import MLAttention


def _segments(b, length):
    """The last row: three packed segments and two padding tokens (id 0); others one sequence."""
    seg = np.ones((b, length), np.int32)
    seg[-1, length // 3 :] = 2
    seg[-1, 2 * length // 3 :] = 3
    seg[-1, -2:] = 0
    return jnp.asarray(seg)


def _qkv(b, length, h, kvh, dqk, dv, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    # scale 1.5: scores of O(1)-O(10), so a wrong mask or head mapping is far outside tolerance
    q = 1.5 * jax.random.normal(kq, (b, length, h, dqk))
    k = 1.5 * jax.random.normal(kk, (b, length, kvh, dqk))
    v = jax.random.normal(kv, (b, length, kvh, dv))
    cotangent = jax.random.normal(kc, (b, length, h, dv))
    return q, k, v, cotangent


def _reference(q, k, v, seg):
    """float64 NumPy: softmax over visible keys, kv heads repeated per query group."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(attention_mask(seg)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, v)


def _value_and_grads(fn, q, k, v, seg, cotangent):
    def loss(q, k, v):
        out = fn(q, k, v, seg)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CASES = {
    # name: (b, length, heads, kv heads, d_qk, d_v)
    "gqa_packed_ragged_length": (1, 300, 4, 2, 64, 64),  # 300 -> 384 = 3 splash tiles of 128
    "mla_dims": (1, 128, 2, 2, 192, 128),
    "mqa": (1, 256, 4, 1, 128, 128),
}


@pytest.mark.parametrize("kernel", ["splash", "blockwise"])
@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_kernels_equal_the_materialised_scores(kernel, case):
    b, length, h, kvh, dqk, dv = CASES[case]
    q, k, v, cotangent = _qkv(b, length, h, kvh, dqk, dv)
    seg = _segments(b, length)
    if kernel == "splash":
        fn = lambda *a: splash_attention(*a, interpret=True)  # noqa: E731
    else:
        fn = lambda *a: blockwise_attention(*a, block=128)  # noqa: E731  several key blocks
    out, grads = _value_and_grads(fn, q, k, v, seg, cotangent)
    xla_out, xla_grads = _value_and_grads(
        lambda *a: causal_attention(*a, impl="xla"), q, k, v, seg, cotangent
    )
    assert out.shape == (b, length, h, dv)
    np.testing.assert_allclose(out, _reference(q, k, v, seg), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(out, xla_out, rtol=1e-5, atol=2e-5)
    for got, want in zip(grads, xla_grads):
        assert got.shape == want.shape
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_on_cpu_auto_is_xla_and_flash_is_the_plain_jax_kernel():
    assert resolve_impl("auto") == "xla"
    assert resolve_impl("xla") == "xla"
    assert resolve_impl("flash") == "blockwise"
    with pytest.raises(ValueError, match="attention impl 'cudnn2' is unknown"):
        resolve_impl("cudnn2")


def test_blockwise_keeps_bfloat16_and_matches_float32_to_its_precision():
    q, k, v, _ = _qkv(1, 256, 4, 2, 64, 64, seed=3)
    seg = _segments(1, 256)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = jax.jit(blockwise_attention)(*bf, seg)
    assert out.dtype == jnp.bfloat16
    want = _reference(*(x.astype(jnp.float32) for x in bf), seg)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


GQA = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, init_std=0.3)
MLA = dataclasses.replace(
    GQA,
    attention="mla",
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
)


@pytest.mark.parametrize("module, cfg", [(Attention, GQA), (MLAttention, MLA)], ids=["gqa", "mla"])
def test_modules_with_flash_equal_their_xla_selves(module, cfg):
    b, length = 2, 40
    x = jax.random.normal(jax.random.PRNGKey(0), (b, length, cfg.d_model))
    seg = _segments(b, length)
    pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), (b, 1))
    params = ref.fast_jit(module(cfg).init)(jax.random.PRNGKey(1), x, seg, pos)

    def run(impl):
        m = module(dataclasses.replace(cfg, attention_impl=impl))

        def loss(params, x):
            y = m.apply(params, x, seg, pos)
            return jnp.sum(jnp.where(seg[..., None] > 0, y, 0.0) ** 2), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, y_xla), g_xla = run("xla")
    (_, y_flash), g_flash = run("flash")
    assert float(jnp.std(y_xla)) > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(y_flash, y_xla, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))
