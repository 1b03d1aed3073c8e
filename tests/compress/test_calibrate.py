"""`moejax.compress.calibrate`: counts and gate mass are a NumPy recount of the routing the
model returns; the recorded FFN inputs are the MoE layers' real inputs (the router's own
choice is recomputed from them); the output norms and EASY-EP scores equal a float64
per-token loop over those inputs (RUCAIBox/EASYEP's expert_selection.py formula)."""

import jax
import numpy as np
from compress_models import tiny_batch, tiny_model

from moejax.compress.calibrate import calibrate, capture_fn
from moejax.compress.layers import unstack
from moejax.hf.layout import layer_slot


def silu(a):
    return a / (1 + np.exp(-a))


def test_calibration_equals_a_numpy_recount():
    model, variables = tiny_model()
    batch = tiny_batch()
    capture = capture_fn(model)  # one compile: the routing is the model's own output
    cal = calibrate(model, variables, [batch], max_inputs=5, capture=capture)
    sown, ids, weights, _ = jax.device_get(capture(variables, batch))
    layers, _ = unstack(variables["params"], model.model)
    real = batch["segment_ids"] > 0
    assert [c.model_layer for c in cal.layers] == [0, 2]
    for n, c in enumerate(cal.layers):
        p = layers[c.model_layer]
        path, index = layer_slot(model.model, c.model_layer)
        node = sown
        for key in path.split("/"):
            node = node[key]
        x = np.asarray(node["ffn_norm"]["residual"][index], np.float64)[real]
        h = np.asarray(node["ffn_norm"]["moe_input"][index], np.float64)[real]
        scale = np.asarray(p["ffn_norm"]["scale"], np.float64)
        rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + model.model.norm_eps)
        assert np.allclose(h, x / rms * scale, atol=1e-5)  # h is ffn_norm(x)
        probs = h @ np.asarray(p["moe"]["router"]["kernel"], np.float64)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
        assert np.array_equal(np.sort(top, -1), np.sort(ids[n][real], -1))  # the router's input
        w = {k: np.asarray(v, np.float64) for k, v in p["moe"]["experts"].items()}
        want = {k: np.zeros(8) for k in ("counts", "gate", "norm", "wnorm", "easy")}
        for t, (ts, gs) in enumerate(zip(ids[n][real], weights[n][real])):
            outs = [
                (silu(h[t] @ w["w_gate"][e]) * (h[t] @ w["w_up"][e])) @ w["w_down"][e] for e in ts
            ]
            routed = sum(g * o for g, o in zip(gs, outs))
            cos = x[t] @ (x[t] + routed) / np.linalg.norm(x[t]) / np.linalg.norm(x[t] + routed)
            for e, g, o in zip(ts, gs, outs):
                want["counts"][e] += 1
                want["gate"][e] += g
                want["norm"][e] += np.linalg.norm(o)
                want["wnorm"][e] += g * np.linalg.norm(o)
                want["easy"][e] += g * np.linalg.norm(o) * max(1 - cos, 0)
        assert c.counts.tolist() == want["counts"].astype(int).tolist() and c.tokens == real.sum()
        assert np.allclose(c.gate_mass, want["gate"], rtol=1e-5)
        assert np.allclose(c.output_norm, want["norm"], rtol=1e-4)
        assert np.allclose(c.weighted_norm, want["wnorm"], rtol=1e-4)
        assert np.allclose(c.easy_ep, want["easy"], rtol=1e-3, atol=1e-12)
        assert want["easy"].sum() > 0
        assert np.allclose(c.inputs, h[:5], atol=1e-6)
