"""Rewiring experts on the fly (`moejax.generate.rewire`): one SGD step on the routing-logit
delta equals a step along the central finite-difference gradient of the sequence loss, only
the selected layer moves, and cached decoding with periodic updates equals the uncached
reference (the whole sequence through the model per token, the same update schedule)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_decoder import PROMPT, tiny_decoder

from moejax.generate.rewire import rewire_generate, sequence_nll, update_delta
from moejax.generate.routing import layer_mask, with_delta, zero_delta


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


def statics(model):
    return dict(model_cfg=model.model, moe_cfg=model.moe, adapters=model.adapters)


def test_one_update_is_a_finite_difference_gradient_step(tiny):
    model, variables = tiny
    delta = zero_delta(model, variables)
    mask = layer_mask(delta, [-1])  # the last MoE layer's router only
    tokens = jnp.asarray([[3, 7, 1, 4, 0, 0], [5, 2, 9, 8, 0, 0]], jnp.int32)
    length, lr = jnp.int32(4), 0.5
    opt_state = optax.sgd(lr).init(delta)
    new, _, loss = update_delta(
        variables, delta, opt_state, mask, tokens, length, steps=1, optimizer="sgd", lr=lr,
        **statics(model),
    )  # fmt: skip
    nll = jax.jit(lambda d: sequence_nll(model, variables, d, tokens, length))
    np.testing.assert_allclose(loss, nll(delta), rtol=1e-6)
    eps, leaf = 1e-3, delta["runs_1"]["moe"]["router"]["logits"]
    fd = np.zeros(leaf.shape[-1])
    for e in range(leaf.shape[-1]):
        bump = np.zeros(leaf.shape)
        bump[0, e] = eps
        up = jax.tree.map(lambda x: x, delta)
        up["runs_1"]["moe"]["router"]["logits"] = leaf + bump
        down = jax.tree.map(lambda x: x, delta)
        down["runs_1"]["moe"]["router"]["logits"] = leaf - bump
        fd[e] = (float(nll(up)) - float(nll(down))) / (2 * eps)
    assert np.abs(fd).max() > 1e-3  # the loss does depend on this router
    moved = np.asarray(new["runs_1"]["moe"]["router"]["logits"])[0]
    np.testing.assert_allclose(moved, -lr * fd, rtol=1e-2, atol=3e-4)
    np.testing.assert_array_equal(new["runs_0"]["moe"]["router"]["logits"], 0.0)
    np.testing.assert_array_equal(new["runs_1"]["moe"]["router"]["ranks"], 1.0)


def test_decoding_with_updates_equals_the_uncached_reference(tiny):
    model, variables = tiny
    n, every, lr = 5, 2, 2.0
    tokens, delta, losses = rewire_generate(
        model, variables, PROMPT, n, every=every, steps=1, lr=lr, optimizer="adam"
    )
    assert len(losses) == 3  # at the prefill, after 2 and after 4 new tokens
    assert np.abs(np.asarray(delta["runs_0"]["moe"]["router"]["logits"])).max() > 0
    # The reference: the same updates, then the whole zero-padded sequence per token.
    ref_delta = zero_delta(model, variables)
    mask = layer_mask(ref_delta, None)
    opt_state = optax.adam(lr).init(ref_delta)
    apply = jax.jit(model.apply)
    seq = np.zeros((2, 3 + n), np.int32)
    seq[:, :3] = PROMPT
    for t in range(3, 3 + n):
        if (t - 3) % every == 0:
            ref_delta, opt_state, _ = update_delta(
                variables, ref_delta, opt_state, mask, jnp.asarray(seq), jnp.int32(t),
                steps=1, optimizer="adam", lr=lr, **statics(model),
            )  # fmt: skip
        logits = apply(with_delta(variables, ref_delta), jnp.asarray(seq))[0]
        seq[:, t] = np.asarray(logits[:, t - 1].argmax(-1))
    np.testing.assert_array_equal(tokens, seq)
