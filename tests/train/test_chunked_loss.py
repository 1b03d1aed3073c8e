"""Chunked cross-entropy (`train.loss_chunk`, moejax/train/chunked_loss.py): the same per-token
losses and gradients as the whole-logits path (tied and untied heads, chunks that do and do
not divide the tokens), the same train step, and a compiled gradient whose temporaries stay
below the size of the float32 logits that the whole-logits gradient exceeds."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config.validation import validate
from moejax.data import make_batches
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.projection import project
from moejax.sharding.mesh import make_mesh
from moejax.train.chunked_loss import chunked_token_cross_entropy, token_cross_entropy
from moejax.train.experiment import build_experiment
from moejax.train.step import token_losses


def _whole(hidden, head, targets):
    return token_cross_entropy(project(hidden, head), targets)


def _numpy_ce(hidden, head, targets):
    z = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 5, 7, 21, 64])  # 21 tokens: 5 and 64 pad, 7 and 21 not
def test_chunked_values_and_gradients_equal_the_whole_logits(chunk):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(k1, (3, 7, 8))
    head = jax.random.normal(k2, (8, 50))
    targets = jax.random.randint(k3, (3, 7), 0, 50)
    weights = jax.random.uniform(k4, (3, 7))  # a cotangent that tells the tokens apart

    got = jax.jit(chunked_token_cross_entropy, static_argnums=3)(hidden, head, targets, chunk)
    np.testing.assert_allclose(got, _numpy_ce(hidden, head, targets), rtol=1e-5, atol=1e-5)

    def grad(fn):
        return jax.jit(jax.grad(lambda h, w: jnp.sum(fn(h, w) * weights), argnums=(0, 1)))

    want = grad(lambda h, w: _whole(h, w, targets))(hidden, head)
    grads = grad(lambda h, w: chunked_token_cross_entropy(h, w, targets, chunk))(hidden, head)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_non_positive_chunk_or_mismatched_shapes_are_errors():
    hidden, head, targets = jnp.zeros((2, 3, 4)), jnp.zeros((4, 9)), jnp.zeros((2, 3), int)
    with pytest.raises(ValueError, match="chunk=0 must be positive"):
        chunked_token_cross_entropy(hidden, head, targets, 0)
    with pytest.raises(ValueError, match=r"must be targets' shape \(2, 4\)"):
        chunked_token_cross_entropy(hidden, head, jnp.zeros((2, 4), int), 2)


MODEL = ModelConfig(
    vocab_size=40, d_model=16, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=32, moe_every=0
)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_the_model_loss_and_gradients_match_with_chunks(tied):
    model = Transformer(dataclasses.replace(MODEL, tie_embeddings=tied), MoEConfig())
    b, length = 2, 11  # 22 tokens; chunks of 6 pad them to 24
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    batch = {
        "inputs": jax.random.randint(keys[0], (b, length), 0, 40),
        "targets": jax.random.randint(keys[1], (b, length), 0, 40),
        "segment_ids": jnp.ones((b, length), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(length), (b, length)),
        "loss_mask": (jax.random.uniform(keys[2], (b, length)) > 0.3).astype(jnp.int32),
    }
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"])["params"])
    assert ("lm_head" in params) != tied

    def loss(p, chunk):
        ce, extras = token_losses(model, p, batch, loss_chunk=chunk)
        return jnp.sum(ce * batch["loss_mask"]) + extras["aux_loss"]

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (want, want_g), (got, got_g) = (value_and_grad(params, chunk) for chunk in (0, 6))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(want) > 0
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)

    # The default call still returns the whole float32 logits.
    @jax.jit
    def outputs(p):
        logits, _ = model.apply({"params": p}, batch["inputs"])
        (hidden, head), _ = model.apply({"params": p}, batch["inputs"], return_hidden=True)
        return logits, hidden, head

    logits, hidden, head = outputs(params)
    assert logits.shape == (b, length, 40) and logits.dtype == jnp.float32
    assert head.shape == (16, 40)
    want_head = params["embedding"].T if tied else params["lm_head"]
    np.testing.assert_array_equal(head, want_head)
    np.testing.assert_allclose(logits, project(hidden, head), rtol=1e-5, atol=1e-7)


def test_a_train_step_with_loss_chunk_equals_the_whole_logits_step(tiny_config):
    results = []
    for chunk in (0, 24):  # 4 x 32 = 128 tokens: 6 chunks of 22, padded
        s = validate(tiny_config("dense", **{"train.loss_chunk": chunk}), num_devices=1)
        batch = jax.tree.map(jnp.asarray, next(make_batches(s.data, "train")))
        exp = build_experiment(s, make_mesh(s.mesh))
        results.append(exp.step_fn(exp.init_fn(jax.random.PRNGKey(0)), batch))
    (want_state, want), (got_state, got) = results
    for name in ("loss", "ce_loss", "grad_norm"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_chunks_keep_the_compiled_gradient_below_the_float32_logits():
    tokens, vocab, d = 4096, 32768, 64
    logits_bytes = tokens * vocab * 4  # 512 MiB: what the whole-logits path holds (twice)
    shapes = (
        jax.ShapeDtypeStruct((2, tokens // 2, d), jnp.float32),
        jax.ShapeDtypeStruct((d, vocab), jnp.float32),
        jax.ShapeDtypeStruct((2, tokens // 2), jnp.int32),
    )

    def temp_bytes(ce_fn):
        grad_fn = jax.grad(lambda h, w, y: jnp.sum(ce_fn(h, w, y)), argnums=(0, 1))
        return jax.jit(grad_fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(_whole)
    chunked = temp_bytes(lambda h, w, y: chunked_token_cross_entropy(h, w, y, 512))
    assert whole > logits_bytes
    assert chunked < logits_bytes // 2  # about two [512, vocab] chunks plus the head's grad
