"""Router metrics in evaluation and training logs: routing stability, experts per token per
layer and per data domain, for the RMoE and top-p configs."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from moejax.config.validation import validate
from moejax.data import DOMAINS
from moejax.sharding.mesh import make_mesh
from moejax.train.evaluation import evaluate
from moejax.train.experiment import build_experiment
from moejax.train.loop import train
from moejax.train.routing_stability import RoutingStability
from moejax.train.writers import read_jsonl


def test_routing_stability_closed_form():
    stab = RoutingStability()
    first = np.array([[0, 1, 2, 3, -1], [1, 1, 1, 1, -1]])
    assert stab.update(first) == {}
    got = stab.update(np.array([[0, 1, 3, 3, 2], [0, 0, 1, 1, -1]]))
    np.testing.assert_allclose(got["moe/top1_changed"], [1 / 4, 2 / 4])  # -1: not a loss token
    assert stab.update(np.zeros((2, 3), int)) == {}  # another evaluation set: no comparison


def test_stability_is_zero_for_the_same_params_and_sees_a_moved_router(tiny_config):
    s = validate(tiny_config("rmoe", **{"moe.gru_dim": 16}))
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    params = exp.init_fn(jax.random.PRNGKey(0)).params
    stab = RoutingStability()
    first = evaluate(exp.eval_fn, params, s, mesh, stab)
    assert "eval/moe/top1_changed" not in first
    present = [d for d in DOMAINS if f"eval/loss/{d}" in first]
    assert present
    for d in present:  # softmax top-2: exactly two experts for every token of every domain
        assert first[f"eval/moe/experts_per_token/{d}"] == pytest.approx(2.0, abs=1e-6)
    again = evaluate(exp.eval_fn, params, s, mesh, stab)
    assert again["eval/moe/top1_changed"] == 0.0
    assert again["eval/moe/top1_changed/layer0"] == 0.0
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.5 * jax.random.normal(jax.random.PRNGKey(1), a.shape)
            if "router" in jax.tree_util.keystr(path)
            else a
        ),
        nn.unbox(params),
    )
    changed = evaluate(exp.eval_fn, moved, s, mesh, stab)["eval/moe/top1_changed"]
    assert 0.05 < changed <= 1.0


def test_top_p_run_logs_experts_per_token_by_layer_and_domain(tiny_config, tmp_path):
    config = tiny_config("top_p", **{"train.steps": 4, "train.eval_every": 2})
    train(config, str(tmp_path))
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert "eval/moe/top1_changed" not in evals[0]
    assert 0.0 <= evals[1]["eval/moe/top1_changed"] <= 1.0
    k = config.moe.top_k
    for r in evals:
        present = [d for d in DOMAINS if f"eval/loss/{d}" in r]
        assert present and all(
            f"eval/moe/experts_per_token/{d}" not in r for d in DOMAINS if d not in present
        )
        for d in present:
            assert 1.0 <= r[f"eval/moe/experts_per_token/{d}"] <= k
        assert 1.0 <= r["eval/moe/experts_per_token/layer0"] <= k
    train_row = [r for r in rows if "train/loss" in r][-1]
    hist = np.asarray(train_row["train/moe/experts_per_token_hist/layer0"])
    assert hist.shape == (k + 1,) and hist[0] == 0.0 and abs(hist.sum() - 1.0) < 1e-5
    mean = np.dot(np.arange(k + 1), hist)
    assert mean == pytest.approx(train_row["train/moe/experts_per_token/layer0"], rel=1e-5)
    assert "train/aux/entropy" in train_row and "train/aux/z_loss" not in train_row
