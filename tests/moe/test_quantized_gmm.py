"""The grouped matmul on integer expert weights (`moejax.moe.quantized_gmm`) equals
dequantize-then-matmul in float64 NumPy, and the `ragged` dispatcher runs a SwiGLU expert
function on them like on the dequantized float weights; other dispatchers refuse."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config_section import ConfigError
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import dispatch
from moejax.moe.experts import swiglu_expert_fn
from moejax.moe.quantized_gmm import quantize_experts, quantized_gmm
from moejax.moe.routing import Routing


def dequantized64(qa):
    q = np.asarray(qa.qvalue, np.float64)
    s = np.asarray(qa.scale, np.float64)
    return q * np.repeat(s, q.shape[1] // s.shape[1], axis=1)


def reference(x, w, sizes):
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, n in enumerate(sizes):
        out[start : start + n] = x[start : start + n] @ w[g]
        start += n
    return out


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 4), (3, 0)])
@pytest.mark.parametrize("impl", ["tile_loop", "ragged_dot"])
def test_quantized_gmm_equals_float64_dequantize_then_matmul(bits, group, impl):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(4, 8, 6)).astype(np.float32)
    qa = quantize_experts(jnp.asarray(w), bits, group)
    assert qa.qvalue.shape == w.shape and qa.scale.shape == (4, 8 // group if group else 1, 6)
    w64 = dequantized64(qa)
    assert np.abs(w64 - w).max() <= np.abs(w).max() / (2 ** (bits - 1) - 0.5)
    sizes = np.array([5, 0, 3, 4])
    x = rng.normal(size=(14, 8)).astype(np.float32)  # 2 rows past sum(sizes) stay zero
    got = np.asarray(quantized_gmm(jnp.asarray(x), qa, jnp.asarray(sizes), impl=impl, tile=4))
    want = reference(x[:12], w64, sizes)
    assert np.abs(got[:12] - want).max() < 1e-5 * np.abs(want).max()
    assert np.all(got[12:] == 0)


def test_ragged_dispatch_on_quantized_experts_equals_dequantized_float():
    rng = np.random.default_rng(0)
    e, d, f, t, k = 4, 8, 12, 10, 2
    ws = [rng.normal(size=s).astype(np.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    qs = [quantize_experts(jnp.asarray(w), 4) for w in ws]
    floats = [jnp.asarray(dequantized64(q), jnp.float32) for q in qs]
    ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1, (t, k)), jnp.float32)
    routing = Routing(expert_ids=ids, combine_weights=weights, aux_losses={}, metrics={})
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    cfg = MoEConfig(num_experts=e, top_k=k, d_expert=f, dispatcher="ragged", gmm_tile=4)
    got, _ = jax.jit(lambda x, qs: dispatch(x, routing, swiglu_expert_fn(*qs), cfg))(x, qs)
    want, _ = dispatch(x, routing, swiglu_expert_fn(*floats), cfg)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-5
    for name, value in (("dispatcher", "hybrid"), ("gmm_impl", "pallas")):
        bad = dataclasses.replace(cfg, **{name: value})
        with pytest.raises(ConfigError, match=f"moe.{name}={value!r}"):
            dispatch(x, routing, swiglu_expert_fn(*qs), bad)
