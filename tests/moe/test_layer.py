"""MoE layer: routers + experts + shared experts compose as the equations say."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.config import ModelConfig
from moejax.moe.config import MoEConfig
from moejax.moe.layer import MoELayer
from moejax.nn.mlp import DenseMLP

MODEL = ModelConfig(d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=32)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=8, n_shared=2, dispatcher="ragged", gmm_tile=4)


def test_shared_experts_add_exactly_their_mlp():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    layer = MoELayer(MOE, MODEL)
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)  # eagerly, each op compiles alone
    y = jax.jit(layer.apply)(variables, x).y
    params = nn.unbox(variables)["params"]
    routed_only = MoELayer(dataclasses.replace(MOE, n_shared=0), MODEL)
    y0 = jax.jit(routed_only.apply)(
        {"params": {k: v for k, v in params.items() if k != "shared"}}, x
    ).y
    shared = jax.jit(DenseMLP(MOE.n_shared * MOE.d_expert).apply)(
        {"params": params["shared"]}, x.reshape(10, 16)
    )
    np.testing.assert_allclose(y - y0, shared.reshape(2, 5, 16), atol=1e-5)
    assert params["shared"]["w_gate"].shape == (16, MOE.n_shared * MOE.d_expert)


def test_layer_matches_hand_written_moe():
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 16))
    cfg = dataclasses.replace(MOE, n_shared=0, renormalize=True)
    layer = MoELayer(cfg, MODEL)
    variables = jax.jit(layer.init)(jax.random.PRNGKey(3), x)
    out = jax.jit(layer.apply)(variables, x)
    y, aux, metrics = out.y, out.aux_losses, out.metrics
    p = nn.unbox(variables)["params"]
    xt = np.asarray(x[0], np.float64)
    logits = xt @ np.asarray(p["router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = np.zeros_like(xt)
    ex = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
    for t in range(6):
        top = np.argsort(-probs[t])[:2]
        g = probs[t, top] / probs[t, top].sum()
        for gi, e in zip(g, top):
            a = xt[t] @ ex["w_gate"][e]
            h = a / (1 + np.exp(-a)) * (xt[t] @ ex["w_up"][e])
            want[t] += gi * (h @ ex["w_down"][e])
    np.testing.assert_allclose(y[0], want, atol=1e-5, rtol=1e-4)
    assert set(aux) == {"balance", "z_loss"}
    assert float(aux["balance"]) == float(cfg.balance_coef * metrics["balance_loss"])
    assert float(jnp.sum(metrics["load"])) == np.float32(1.0)
