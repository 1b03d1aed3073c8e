"""Decoding-time routing through the `router_delta` collection: a neutral delta decodes
exactly as plain `generate`, a rank delta routes as the rule's k-th choice in every MoE
layer of a per-layer layout, and SCMoE's contrast equals a hand computation and its cached
two-pass decoding the uncached recomputation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import PROMPT, tiny_decoder

from moejax.generate import generate
from moejax.generate.routing import (
    layer_mask,
    moe_layer_leaves,
    rank_delta,
    with_delta,
    zero_delta,
)
from moejax.generate.scmoe import contrast_logits, scmoe_generate


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


def test_contrast_equals_the_hand_computation():
    strong = np.array([[2.0, 1.0, 0.0, -3.0], [0.5, 0.5, 0.4, 0.0]])
    weak = np.array([[0.0, 2.0, 1.0, -1.0], [1.0, -1.0, 0.0, 0.0]])
    alpha, beta = 0.3, 0.5
    got = np.asarray(contrast_logits(jnp.asarray(strong), jnp.asarray(weak), alpha, beta))
    for row in range(2):
        ls = strong[row] - np.log(np.exp(strong[row]).sum())
        lw = weak[row] - np.log(np.exp(weak[row]).sum())
        p = np.exp(ls)
        keep = p >= alpha * p.max()
        want = np.where(keep, 1.5 * ls - 0.5 * lw, -np.inf)
        np.testing.assert_allclose(got[row], want, rtol=1e-6)
    # Row 0: p = (.665, .245, .090, .004); alpha * max = .1995 keeps tokens 0 and 1 only, and
    # the weak pass's preference for token 1 leaves token 0 the argmax.
    assert np.isinf(got[0, 2:]).all() and got[0].argmax() == 0
    assert math.isfinite(got[1, 3])  # row 1's token 3: p = .18 >= .3 * .29


def test_delta_tree_orders_layers_and_a_neutral_delta_decodes_exactly(tiny):
    model, variables = tiny
    delta = zero_delta(model, variables)
    assert [(k[0], i) for k, i in moe_layer_leaves(delta)] == [("runs_0", 0), ("runs_1", 0)]
    assert delta["runs_1"]["moe"]["router"]["logits"].shape == (1, 6)
    mask = layer_mask(delta, [-1])
    np.testing.assert_array_equal(mask["runs_0"]["moe"]["router"]["logits"], np.zeros((1, 4)))
    np.testing.assert_array_equal(mask["runs_1"]["moe"]["router"]["logits"], np.ones((1, 6)))
    plain = np.asarray(generate(model, variables, PROMPT, 5))
    neutral = np.asarray(generate(model, with_delta(variables, delta), PROMPT, 5))
    np.testing.assert_array_equal(neutral, plain)
    # SCMoE with beta = 0 is plain greedy decoding.
    np.testing.assert_array_equal(scmoe_generate(model, variables, PROMPT, 5, beta=0.0), plain)
    # A rank delta is the rule's k-th choice alone in every MoE layer.
    weak = with_delta(variables, rank_delta(delta, (2,)))
    apply = jax.jit(model.apply)
    strong_ids = apply(variables, jnp.asarray(PROMPT))[1]["routing"]["expert_ids"]
    routing = apply(weak, jnp.asarray(PROMPT))[1]["routing"]
    ids, w = routing["expert_ids"], routing["combine_weights"]
    # The first MoE layer sees the same input in both passes (the second one does not).
    np.testing.assert_array_equal(ids[0, ..., 0], strong_ids[0, ..., 1])
    np.testing.assert_allclose(w[..., 0], 1.0)  # renormalised over the one kept slot
    np.testing.assert_array_equal(w[..., 1:], 0.0)


def test_cached_scmoe_equals_the_uncached_recomputation(tiny):
    model, variables = tiny
    n, alpha, beta = 4, 0.1, 0.5
    tokens = np.asarray(scmoe_generate(model, variables, PROMPT, n, rank=2, alpha=alpha, beta=beta))
    assert tokens.shape == (2, 3 + n)
    weak = with_delta(variables, rank_delta(zero_delta(model, variables), (2,)))
    apply = jax.jit(model.apply)
    # The whole sequence through both passes per token, in one zero-padded buffer (causal
    # attention and per-token routing: the padding changes no earlier position).
    seq = np.zeros((2, 3 + n), np.int64)
    seq[:, :3] = PROMPT
    for t in range(3, 3 + n):
        strong_logits = apply(variables, jnp.asarray(seq))[0][:, t - 1]
        weak_logits = apply(weak, jnp.asarray(seq))[0][:, t - 1]
        seq[:, t] = np.asarray(contrast_logits(strong_logits, weak_logits, alpha, beta).argmax(-1))
    np.testing.assert_array_equal(tokens, seq)
