"""DeepSeek-V3's auxiliary-loss-free bias in training: after every optimizer step each bias
moves by exactly +-gamma towards the mean load, it lives in the TrainState, is logged, is
used by evaluation, and a resumed run restores it and continues exactly."""

import os
import shutil

import numpy as np

from moejax.config.validation import validate
from moejax.sharding.mesh import make_mesh
from moejax.train.checkpoint import Checkpointer
from moejax.train.experiment import build_experiment
from moejax.train.loop import train
from moejax.train.writers import read_jsonl

GAMMA = 0.01


def _rows(workdir):
    return {
        r["step"]: r
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    }


def test_bias_moves_by_gamma_each_step_and_resumes_exactly(tiny_config, tmp_path):
    config = tiny_config(
        "deepseek_v3",
        **{
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "train.eval_every": 4,
            "moe.bias_update_rate": GAMMA,
        },
    )
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    final = train(config, full)
    assert np.isfinite(final["eval/loss"])  # evaluation ran with the state's bias

    # Every step: b <- b + gamma * sign(mean load - load), from the step's logged load.
    a = _rows(full)
    bias = np.zeros(config.moe.num_experts, np.float32)
    for step in (1, 2, 3, 4):
        load = np.asarray(a[step]["train/moe/load/layer0"], np.float32)  # real tokens only
        direction = np.sign(load.mean() - load)
        assert np.abs(direction).sum() > 0  # a random init is not exactly balanced
        bias = bias + np.float32(GAMMA) * direction.astype(np.float32)
        np.testing.assert_array_equal(
            np.asarray(a[step]["train/moe/router_bias/layer0"], np.float32), bias
        )
        assert a[step]["train/moe/router_bias_abs_mean"] == np.abs(bias).mean()

    # Resume from step 2: the bias comes back from the checkpoint, the run continues exactly.
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(
        os.path.join(full, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2")
    )
    shutil.copy(os.path.join(full, "config.json"), resumed)
    train(config, resumed)
    b = _rows(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["train/loss"] == a[step]["train/loss"], step
        assert b[step]["train/moe/router_bias/layer0"] == a[step]["train/moe/router_bias/layer0"]
    s = validate(config, num_devices=1, num_processes=1)
    target = build_experiment(s, make_mesh(s.mesh)).abstract_state
    for workdir in (full, resumed):
        with Checkpointer(workdir, async_save=False) as ckpt:
            state, _, _ = ckpt.restore(4, target=target)
        np.testing.assert_array_equal(
            state.collections["router_bias"]["moe_layers"]["moe"]["router"]["bias"], bias[None]
        )
