"""Router losses and statistics against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.config import MoEConfig
from moejax.moe.losses import (
    balance_statistics,
    coefficient_of_variation,
    device_balance_loss,
    expert_load,
    router_entropy,
    router_z_loss,
    routing_metrics,
    sequence_balance_loss,
    switch_balance_loss,
)
from moejax.moe.selection import sigmoid_bias, softmax_topk

PROBS = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]])
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


# ------------------------------------------------- DeepSeekMoE and DeepSeek-V3 balance losses

# E = 4 experts, top-1, T = 4 tokens (rows sum to 1).
DS_PROBS = jnp.array(
    [[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.3, 0.1, 0.5, 0.1], [0.5, 0.2, 0.1, 0.2]]
)
DS_IDS = jnp.array([[0], [1], [2], [0]])


def test_expert_level_loss_is_deepseekmoe_eq_12_to_14():
    # f'_i = E/(K T) * count_i = 4/4 * [2, 1, 1, 0]; P = mean probs = [1.3, 1.2, 1.0, 0.5] / 4
    # L_ExpBal / alpha1 = 2*0.325 + 1*0.3 + 1*0.25 + 0 = 1.2, the Switch loss (balance_coef).
    assert float(switch_balance_loss(DS_PROBS, DS_IDS)) == pytest.approx(1.2, rel=1e-6)
    cfg = MoEConfig(num_experts=4, top_k=1, balance_coef=0.5, z_loss_coef=0.0)
    logits = jnp.log(DS_PROBS)  # softmax(log p) = p; top-1 picks DS_IDS
    sel = softmax_topk(logits, None, cfg)
    np.testing.assert_array_equal(sel.expert_ids, DS_IDS)
    assert float(sel.aux_losses["balance"]) == pytest.approx(0.5 * 1.2, rel=1e-6)
    assert set(sel.aux_losses) == {"balance"}


def test_device_level_loss_is_deepseekmoe_eq_15_to_17():
    # D = 2 devices {e0, e1}, {e2, e3}: f'' = mean f' = [1.5, 0.5]; P' = sum P = [0.625,
    # 0.375]; L_DevBal / alpha2 = 1.5*0.625 + 0.5*0.375 = 1.125.
    f, p = balance_statistics(DS_PROBS, DS_IDS)
    assert float(device_balance_loss(f, p, 2)) == pytest.approx(1.125, rel=1e-6)
    # One expert per device is the expert-level loss; one device holding all is constant 1.
    assert float(device_balance_loss(f, p, 4)) == pytest.approx(1.2, rel=1e-6)
    assert float(device_balance_loss(f, p, 1)) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="moe.balance_devices"):
        device_balance_loss(f, p, 3)
    cfg = MoEConfig(
        num_experts=4,
        top_k=1,
        balance_coef=0.0,
        z_loss_coef=0.0,
        device_balance_coef=0.1,
        balance_devices=2,
    )
    sel = softmax_topk(jnp.log(DS_PROBS), None, cfg)
    assert float(sel.aux_losses["device_balance"]) == pytest.approx(0.1 * 1.125, rel=1e-6)
    assert set(sel.aux_losses) == {"device_balance"}


def _sigmoid_logits(scores):
    s = np.asarray(scores, np.float64)
    return jnp.asarray(np.log(s / (1 - s)), jnp.float32)


# Sigmoid scores of 4 tokens over 4 experts (2 sequences of 2): row sums 2, 1.5, 2, 2, so the
# normalised affinities s' = s / sum_j s_j are the rows below divided by those sums.
V3_SCORES = [
    [0.75, 0.25, 0.5, 0.5],  # s' = [3/8, 1/8, 1/4, 1/4], top-1 e0
    [0.25, 0.875, 0.125, 0.25],  # s' = [1/6, 7/12, 1/12, 1/6], top-1 e1
    [0.5, 0.5, 0.875, 0.125],  # s' = [1/4, 1/4, 7/16, 1/16], top-1 e2
    [0.25, 0.125, 0.875, 0.75],
]  # s' = [1/8, 1/16, 7/16, 3/8], top-1 e2


@pytest.mark.parametrize(
    "mask, want",
    [
        # Sequence A (t0, t1): f = E/(K L) counts = 2 * [1, 1, 0, 0]; P_0 = (3/8 + 1/6)/2 = 13/48,
        # P_1 = (1/8 + 7/12)/2 = 17/48 -> L_A = 2*13/48 + 2*17/48 = 1.25. Sequence B (t2, t3):
        # f = 2 * [0, 0, 2, 0]; P_2 = 7/16 -> L_B = 4 * 7/16 = 1.75. Mean over sequences: 1.5.
        (None, 1.5),
        # t1 padding: A is t0 alone, f = 4 * [1, 0, 0, 0], P_0 = 3/8 -> L_A = 1.5; mean 1.625.
        ([1, 0, 1, 1], 1.625),
        # B all padding: left out of the mean.
        ([1, 1, 0, 0], 1.25),
    ],
)
def test_sequence_wise_loss_is_deepseek_v3_eq_17_to_20(mask, want):
    cfg = MoEConfig(
        num_experts=4,
        top_k=1,
        selection="sigmoid_bias",
        balance_coef=0.0,
        z_loss_coef=0.0,
        seq_balance_coef=1e-4,
    )
    mask = None if mask is None else jnp.asarray(mask, bool)
    sel = sigmoid_bias(_sigmoid_logits(V3_SCORES), mask, cfg, seq_len=2)
    used = np.asarray(sel.expert_ids)[:, 0]
    np.testing.assert_array_equal(used, [0, 1, 2, 2])
    assert float(sel.aux_losses["seq_balance"]) == pytest.approx(1e-4 * want, rel=1e-5)
    assert set(sel.aux_losses) == {"seq_balance"}
    s = jnp.asarray(V3_SCORES)
    probs = s / s.sum(-1, keepdims=True)
    assert float(sequence_balance_loss(probs, sel.expert_ids, 2, mask)) == pytest.approx(
        want, rel=1e-5
    )


def test_sigmoid_bias_expert_and_device_losses_use_normalised_affinities():
    # All 4 tokens: f' = 4/4 * [1, 1, 2, 0]; P = mean s' = [11/48, 49/192, 29/96, 41/192];
    # expert-level: 11/48 + 49/192 + 2 * 29/96 = 209/192. Devices {e0, e1}, {e2, e3}:
    # f'' = [1, 1], P' = [93/192, 99/192] -> 1.0.
    cfg = MoEConfig(
        num_experts=4,
        top_k=1,
        selection="sigmoid_bias",
        balance_coef=1.0,
        z_loss_coef=0.0,
        device_balance_coef=1.0,
        balance_devices=2,
    )
    sel = sigmoid_bias(_sigmoid_logits(V3_SCORES), None, cfg)
    assert float(sel.aux_losses["balance"]) == pytest.approx(209 / 192, rel=1e-5)
    assert float(sel.aux_losses["device_balance"]) == pytest.approx(1.0, rel=1e-5)
    # The whole batch as one sequence: the sequence-wise loss is the expert-level one.
    whole = sigmoid_bias(
        _sigmoid_logits(V3_SCORES),
        None,
        MoEConfig(
            num_experts=4,
            top_k=1,
            selection="sigmoid_bias",
            balance_coef=0.0,
            z_loss_coef=0.0,
            seq_balance_coef=1.0,
        ),
    )
    assert float(whole.aux_losses["seq_balance"]) == pytest.approx(209 / 192, rel=1e-5)
