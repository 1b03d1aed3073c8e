"""Router health warnings: dead experts over K logged intervals, dropped fraction, load CV."""

import numpy as np

from moejax.train.router_health import RouterHealth


def _interval(load, dropped=0.0, cv=0.2, nonfinite=0.0):
    load = np.asarray(load, np.float32)
    return [
        {
            "moe/load": load,
            "moe/dropped_fraction": np.full(load.shape[0], dropped),
            "moe/load_cv": np.full(load.shape[0], cv),
            "nonfinite": nonfinite,
        }
    ]


def _health(**kw):
    return RouterHealth(
        **{"dead_expert_logs": 2, "max_dropped_fraction": 0.2, "max_load_cv": 1.0, **kw}
    )


def test_dead_expert_warns_after_k_logged_intervals_once_per_episode():
    health = _health()
    dead = [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]  # layer 0: experts 2, 3 idle
    assert health.observe(10, _interval(dead)) == []
    warnings = health.observe(20, _interval(dead))
    assert len(warnings) == 1
    assert "step 20: MoE layer 0: expert(s) [2, 3] received no tokens" in warnings[0]
    assert health.observe(30, _interval(dead)) == []  # still dead: not repeated
    assert health.observe(40, _interval([[0.25] * 4, [0.25] * 4])) == []  # recovered
    health.observe(50, _interval(dead))
    assert len(health.observe(60, _interval(dead))) == 1  # a new episode warns again
    assert health.counts["dead"] == 2


def test_dropped_fraction_and_load_cv_thresholds():
    health = _health(dead_expert_logs=0)
    balanced = [[0.25] * 4]
    assert health.observe(1, _interval(balanced, dropped=0.1, cv=0.3)) == []
    [dropped] = health.observe(2, _interval(balanced, dropped=0.5))
    assert "50.0% of the expert assignments were dropped" in dropped
    assert "moe.capacity_factor" in dropped
    [cv] = health.observe(3, _interval(balanced, cv=2.5))
    assert "load CV 2.5" in cv and "train.max_load_cv=1.0" in cv
    assert health.observe(4, _interval(balanced, cv=float("nan"))) == []  # same episode
    assert health.observe(5, _interval(balanced)) == []  # cleared
    [nan] = health.observe(6, _interval(balanced, cv=float("nan")))
    assert "load CV nan" in nan


def test_skipped_steps_and_dense_models_are_ignored():
    health = _health(dead_expert_logs=1)
    assert health.observe(1, _interval([[0.0, 1.0]], nonfinite=1.0)) == []
    assert health.observe(2, [{"loss": 1.0, "nonfinite": 0.0}]) == []


def test_the_remedy_follows_the_balancing():
    """An aux-loss-free run (sigmoid_bias) was told to raise moe.balance_coef, a loss it
    does not use (issue 23 item 5)."""
    dead = [[0.5, 0.5, 0.0, 0.0]]
    loss = _health(dead_expert_logs=1)
    bias = _health(dead_expert_logs=1, bias_balanced=True)
    [by_loss, cv_loss] = loss.observe(1, _interval(dead, cv=2.0))
    [by_bias, cv_bias] = bias.observe(1, _interval(dead, cv=2.0))
    assert "Raise moe.balance_coef" in by_loss and "Raise moe.balance_coef" in cv_loss
    for warning in (by_bias, cv_bias):
        assert "Raise moe.bias_update_rate" in warning and "moe.balance_coef" not in warning


def test_padded_experts_of_a_smaller_layer_are_not_dead():
    """model.layer_kinds with E 2 then 4: layer 0's load row is zero-padded to 4 experts."""
    load = [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]
    health = _health(layer_experts=[2, 4])
    health.observe(10, _interval(load))
    warnings = health.observe(20, _interval(load))
    assert len(warnings) == 1 and "MoE layer 1: expert(s) [2, 3]" in warnings[0]
