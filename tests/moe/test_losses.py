"""Router losses and statistics against hand-computed values."""
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.losses import (
    coefficient_of_variation,
    expert_load,
    router_entropy,
    router_z_loss,
    routing_metrics,
    switch_balance_loss,
)

PROBS = jnp.array([[0.7, 0.2, 0.1],
                   [0.1, 0.6, 0.3],
                   [0.5, 0.1, 0.4],
                   [0.2, 0.2, 0.6]])
IDS = jnp.array([[0], [1], [0], [2]])  # top-1


def test_switch_balance_loss_hand_computed():
    # f = [2/4, 1/4, 1/4]; P = mean probs = [1.5/4, 1.1/4, 1.4/4]
    # L = 3 * (0.5*0.375 + 0.25*0.275 + 0.25*0.35) = 3 * 0.34375 = 1.03125
    assert float(switch_balance_loss(PROBS, IDS)) == pytest.approx(1.03125, rel=1e-6)


def test_switch_balance_loss_top2_and_mask():
    ids = jnp.array([[0, 1], [1, 2], [0, 2], [2, 0]])
    mask = jnp.array([1, 1, 1, 0])
    # Masked token 3 is ignored: counts over 6 assignments: e0=2, e1=2, e2=2 -> f = 1/3 each
    # P = mean of the first three rows = [1.3/3, 0.9/3, 0.8/3]; L = 3 * sum(f * P) = 1.0
    assert float(switch_balance_loss(PROBS, ids, mask)) == pytest.approx(1.0, rel=1e-6)


def test_balance_loss_is_one_when_uniform():
    probs = jnp.full((6, 3), 1 / 3)
    ids = jnp.array([[0], [1], [2], [0], [1], [2]])
    assert float(switch_balance_loss(probs, ids)) == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares
    want = (np.log(2.0) ** 2 + np.log(4.0) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(want, rel=1e-6)
    assert float(router_z_loss(logits, jnp.array([1, 0]))) == pytest.approx(np.log(2.0) ** 2)


def test_entropy_load_and_cv():
    probs = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    assert float(router_entropy(probs)) == pytest.approx(np.log(2) / 2, rel=1e-6)
    load = expert_load(jnp.array([[0], [0], [0], [1]]), 2)
    np.testing.assert_allclose(load, [0.75, 0.25])
    assert float(coefficient_of_variation(load)) == pytest.approx(0.25 / 0.5)


def test_routing_metrics_counts_only_nonzero_weights():
    ids = jnp.array([[0, 1], [1, 0]])
    w = jnp.array([[1.0, 0.0], [0.6, 0.4]])
    m = routing_metrics(PROBS[:2], ids, w)
    # Nonzero slots: (t0, e0), (t1, e1), (t1, e0) -> expert 0 has 2 of 3.
    np.testing.assert_allclose(m["load"], [2 / 3, 1 / 3, 0.0], rtol=1e-6)
    assert float(m["experts_per_token"]) == pytest.approx(1.5)
