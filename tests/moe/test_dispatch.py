"""Every dispatcher equals `dense_reference` in values and gradients; capacity drops exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import DISPATCHERS, capacity, dispatch
from moejax.moe.experts import swiglu_expert_fn
from moejax.moe.routing import Routing

E, K, D, F, T = 6, 2, 8, 5, 40


def swiglu_params(rng, e, d, f, scale=1.0):
    """Random stacked SwiGLU weights (W_gate, W_up: [e, d, f], W_down: [e, f, d])."""
    return tuple(
        jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
        for s in [(e, d, f), (e, d, f), (e, f, d)]
    )


def make_inputs(seed=0, weights=None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    params = swiglu_params(rng, E, D, F, scale=0.3)
    logits = rng.normal(size=(T, E))
    ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)
    ids[:10] = [0, 1]  # make expert 0/1 hot so groups are uneven; expert 5 may be empty
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(T, K)), jnp.float32) if weights is None else weights
    return x, params, jnp.asarray(ids), w


def run(name, x, params, ids, w, **cfg_overrides):
    cfg = MoEConfig(
        num_experts=E, top_k=K, d_expert=F, dispatcher=name, gmm_tile=4, **cfg_overrides
    )
    routing = Routing(expert_ids=ids, combine_weights=w, aux_losses={}, metrics={})
    return dispatch(x, routing, swiglu_expert_fn(*params), cfg)


# expert_parallel and fssdp run here without a context mesh (their local plan); the 8-device
# sharded plan is tests/moe/test_expert_parallel.py.
DROPLESS = ["ragged", "hybrid", "pallas", "auto", "capacity_einsum", "expert_parallel", "fssdp"]


@pytest.mark.parametrize("name", DROPLESS)
def test_dispatchers_match_dense_reference(name):
    x, params, ids, w = make_inputs()
    extra = {"capacity_factor": float(E)} if name == "capacity_einsum" else {}
    want, _ = run("dense_reference", x, params, ids, w)
    got, metrics = jax.jit(lambda *a: run(name, *a, **extra))(x, params, ids, w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(metrics["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("name", DROPLESS)
def test_dispatcher_gradients_match_dense_reference(name):
    x, params, ids, w = make_inputs(seed=3)
    extra = {"capacity_factor": float(E)} if name == "capacity_einsum" else {}
    probe = jnp.asarray(np.random.default_rng(9).normal(size=(T, D)), jnp.float32)

    def loss(dispatcher, **kw):
        return lambda x, p, w: jnp.sum(run(dispatcher, x, p, ids, w, **kw)[0] * probe)

    want = jax.grad(loss("dense_reference"), argnums=(0, 1, 2))(x, params, w)
    got = jax.jit(jax.grad(loss(name, **extra), argnums=(0, 1, 2)))(x, params, w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_registry_is_fully_tested():
    assert set(DISPATCHERS) == set(DROPLESS) | {"dense_reference"}


def test_capacity_drops_counted_exactly():
    # 8 tokens, top-2 of 4 experts, capacity factor 0.5 -> C = ceil(0.5 * 8 * 2 / 4) = 2.
    # First choices: expert 0 for tokens 0-4 (5 of them), expert 1 for tokens 5-7.
    # Second choices: expert 2 for all 8 tokens.
    # Priority is choice-major: expert 0 keeps tokens 0,1 (drops 2,3,4), expert 1 keeps 5,6
    # (drops 7), expert 2 keeps tokens 0,1 of the second choices (drops 6 more).
    t, e = 8, 4
    cfg = MoEConfig(
        num_experts=e, top_k=2, d_expert=3, capacity_factor=0.5, dispatcher="capacity_einsum"
    )
    assert capacity(t, cfg) == 2
    first = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    ids = jnp.asarray(np.stack([first, np.full(t, 2)], axis=1), jnp.int32)
    w = jnp.full((t, 2), 0.5, jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(t, 4)), jnp.float32)
    params = swiglu_params(rng, e, 4, 3)
    routing = Routing(expert_ids=ids, combine_weights=w, aux_losses={}, metrics={})
    y, metrics = dispatch(x, routing, swiglu_expert_fn(*params), cfg)
    assert float(metrics["dropped_fraction"]) == pytest.approx(10 / 16)
    # The surviving assignments give exactly the dense result with dropped weights zeroed.
    kept = np.zeros((t, 2), bool)
    kept[[0, 1, 5, 6], 0] = True
    kept[[0, 1], 1] = True
    ref_routing = dataclasses.replace(routing, combine_weights=w * kept)
    want, _ = dispatch(
        x,
        ref_routing,
        swiglu_expert_fn(*params),
        dataclasses.replace(cfg, dispatcher="dense_reference"),
    )
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert np.all(np.asarray(y)[[2, 3, 4]] == 0)  # both choices dropped -> zero output


def test_zero_weight_slots_are_not_counted_as_drops():
    t, e = 4, 2
    cfg = MoEConfig(
        num_experts=e, top_k=2, d_expert=3, capacity_factor=0.5, dispatcher="capacity_einsum"
    )
    ids = jnp.asarray([[0, 1]] * t, jnp.int32)
    w = jnp.asarray([[1.0, 0.0]] * t, jnp.float32)  # second slot unused (top-p padding)
    x = jnp.ones((t, 4), jnp.float32)
    params = tuple(jnp.ones(s, jnp.float32) for s in [(e, 4, 3), (e, 4, 3), (e, 3, 4)])
    routing = Routing(expert_ids=ids, combine_weights=w, aux_losses={}, metrics={})
    _, metrics = dispatch(x, routing, swiglu_expert_fn(*params), cfg)
    # C = ceil(0.5 * 4 * 2 / 2) = 2: expert 0 keeps 2 of 4 real assignments.
    assert float(metrics["dropped_fraction"]) == pytest.approx(0.5)


def test_zero_weight_slots_take_no_capacity():
    # Tokens 0 and 1 are padding (all-zero weights); without care they would fill expert 0's
    # capacity of 2 before the real tokens 2 and 3 arrive.
    t, e = 4, 2
    cfg = MoEConfig(
        num_experts=e, top_k=2, d_expert=3, capacity_factor=0.5, dispatcher="capacity_einsum"
    )
    ids = jnp.asarray([[0, 1]] * t, jnp.int32)
    w = jnp.asarray([[0.0, 0.0], [0.0, 0.0], [0.7, 0.3], [0.6, 0.4]], jnp.float32)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(t, 4)), jnp.float32)
    params = swiglu_params(rng, e, 4, 3)
    routing = Routing(expert_ids=ids, combine_weights=w, aux_losses={}, metrics={})
    y, metrics = dispatch(x, routing, swiglu_expert_fn(*params), cfg)
    want, _ = dispatch(
        x,
        routing,
        swiglu_expert_fn(*params),
        dataclasses.replace(cfg, dispatcher="dense_reference"),
    )
    assert float(metrics["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("name", ["ragged", "pallas", "capacity_einsum"])
def test_fused_gate_up_matches_two_products_with_gradients(name):
    """`fuse_gate_up` (one grouped matmul on [W_gate | W_up]) computes the same SwiGLU, in
    values and in the gradients of x and of the three weights; LoRA on the gate keeps its
    own low-rank path."""
    x, params, ids, w = make_inputs(seed=3)
    rng = np.random.default_rng(4)
    lora = {"w_gate": (rng.normal(size=(E, D, 2)) * 0.3, rng.normal(size=(E, 2, F)) * 0.3, 0.5)}
    lora = {
        n: (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), s)
        for n, (a, b, s) in lora.items()
    }
    cfg = MoEConfig(
        num_experts=E, top_k=K, d_expert=F, dispatcher=name, gmm_tile=4, capacity_factor=float(E)
    )
    routing = Routing(expert_ids=ids, combine_weights=w, aux_losses={}, metrics={})

    def loss(x, params, fuse):
        fn = swiglu_expert_fn(*params, lora=lora, fuse_gate_up=fuse)
        return jnp.sum(dispatch(x, routing, fn, cfg)[0] ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (want, want_g), (got, got_g) = grad(x, params, False), grad(x, params, True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
