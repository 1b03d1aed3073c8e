"""Pruning (`moejax.compress.prune`): dropping experts no token was routed to leaves the
logits of those tokens unchanged (softmax top-k with renormalisation; DeepSeek-V3's
sigmoid_bias with its router_bias remapped), layers keeping different counts become
per-layer `model.layer_kinds`, and the selection keeps the most important experts (ties to
the lower id, equal counts per group under group-limited routing)."""

import jax
import numpy as np
import pytest
from compress_models import logits_and_routing, tiny_batch, tiny_model

from moejax.compress.calibrate import calibrate, capture_fn
from moejax.compress.prune import parse_keep, prune, top_experts
from moejax.config_section import ConfigError

TOL = dict(rtol=1e-5, atol=1e-5)


def test_pruning_never_used_experts_keeps_the_logits():
    model, variables = tiny_model(num_experts=16, seed=2)
    batch = tiny_batch(length=6)
    capture = capture_fn(model)  # one compile for the statistics and the reference logits
    cal = calibrate(model, variables, [batch], capture=capture)
    keep = {c.model_layer: np.flatnonzero(c.counts) for c in cal.layers}
    assert [len(k) for k in keep.values()] != [16, 16], "no expert unused: pick another seed"
    assert len({len(k) for k in keep.values()}) == 2  # the layers keep different counts
    pruned, new_vars = prune(model, variables, keep)
    kinds = [f"moe:e={len(keep[0])}:k=2", "dense", f"moe:e={len(keep[2])}:k=2"]
    assert pruned.model.layer_kinds == ",".join(kinds)
    want = np.asarray(jax.device_get(capture(variables, batch))[3])
    got = logits_and_routing(pruned, new_vars, batch)[0]
    assert np.allclose(got, want, **TOL)


def test_sigmoid_bias_pruning_remaps_the_router_bias():
    """Experts 5..7 get a selection bias of -100 (never chosen); the kept biases stay."""
    model, variables = tiny_model("moe,moe", selection="sigmoid_bias", num_experts=8)
    bias = np.asarray(variables["router_bias"]["moe_layers"]["moe"]["router"]["bias"]).copy()
    bias[:, :5] = np.array([0.1, -0.2, 0.3, 0.0, 0.05])
    bias[:, 5:] = -100.0
    variables["router_bias"]["moe_layers"]["moe"]["router"]["bias"] = bias
    pruned, new_vars = prune(model, variables, {0: np.arange(5), 1: np.arange(5)})
    assert (pruned.moe.num_experts, pruned.model.layer_kinds) == (5, "moe,moe")
    got_bias = new_vars["router_bias"]["moe_layers"]["moe"]["router"]["bias"]
    assert np.array_equal(got_bias, bias[:, :5])
    batch = tiny_batch(1)
    want = logits_and_routing(model, variables, batch)[0]
    assert np.allclose(logits_and_routing(pruned, new_vars, batch)[0], want, **TOL)
    kernel = variables["params"]["moe_layers"]["moe"]["router"]["kernel"]
    got = new_vars["params"]["moe_layers"]["moe"]["router"]["kernel"]
    assert np.array_equal(got, np.asarray(kernel)[..., :5])
    with pytest.raises(ConfigError, match="sigmoid_bias.*same number in every layer"):
        prune(model, variables, {0: np.arange(5), 1: np.arange(4)})


def test_selection_rules():
    assert top_experts(np.array([3.0, 1.0, 3.0, 2.0]), 2).tolist() == [0, 2]
    assert top_experts(np.array([1.0, 1.0, 1.0, 5.0]), 2).tolist() == [0, 3]  # tie: lower id
    grouped = top_experts(np.array([9.0, 8.0, 7.0, 1.0, 2.0, 3.0]), 2, n_group=2)
    assert grouped.tolist() == [0, 5]  # one per group of three
    with pytest.raises(ConfigError, match="multiple of 2"):
        top_experts(np.ones(6), 3, n_group=2)
    assert parse_keep("6", [8, 8]) == [6, 6]
    assert parse_keep("0.5", [8, 6]) == [4, 3]
    assert parse_keep("5,3", [8, 8]) == [5, 3]
    for bad in ("5,3,1", "x", "2.5"):
        with pytest.raises(ConfigError, match="--keep"):
            parse_keep(bad, [8, 8])
