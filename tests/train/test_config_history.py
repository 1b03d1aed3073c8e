"""Resuming with a changed config (issue 23 item 4): the differences from the checkpointed
run's config are reported, `config.json` follows the new config and every start's config is
kept in `config_history/`, and `train.resume_lr` continues at the new schedule, a constant
rate or a new warmup (moejax/train/config_history.py, moejax/train/optimizer.py).

References: the warmup + cosine closed form, lr(t) = peak t / W for t < W, then
end + (peak - end) (1 + cos(pi (t - W) / (T - W))) / 2, evaluated by hand below; and the
values the trainer logs (`train/lr` is the rate of the logged step's update).
"""

import json
import math

import numpy as np
import pytest

from moejax.config.train import TrainConfig
from moejax.train import config_history
from moejax.train.loop import train
from moejax.train.optimizer import describe_schedule, learning_rate_schedule
from moejax.train.writers import read_jsonl

PEAK, END_RATIO, STEPS, WARMUP = 1e-3, 0.1, 10, 2


def _cosine(t, steps, warmup=WARMUP, peak=PEAK):
    """The closed form at update count t (update t + 1)."""
    if t < warmup:
        return peak * t / warmup
    frac = min(t - warmup, steps - warmup) / (steps - warmup)
    end = peak * END_RATIO
    return end + (peak - end) * (1 + math.cos(math.pi * frac)) / 2


@pytest.mark.parametrize("mode", ["schedule", "constant", "rewarm"])
def test_resume_lr_curves_after_the_schedule_start(mode):
    cfg = TrainConfig(
        steps=STEPS,
        warmup_steps=WARMUP,
        learning_rate=PEAK,
        min_lr_ratio=END_RATIO,
        resume_lr=mode,
    )
    start = 6
    lr = learning_rate_schedule(cfg, schedule_start=start)
    got = np.array([float(lr(t)) for t in range(STEPS + 1)])
    want = [_cosine(t, STEPS) for t in range(start)]  # before the resume: unchanged
    if mode == "schedule":
        want += [_cosine(t, STEPS) for t in range(start, STEPS + 1)]
    elif mode == "constant":
        want += [PEAK] * (STEPS + 1 - start)
    else:  # a new warmup of 2 steps, cosine over the 4 steps left
        want += [_cosine(t - start, STEPS - start) for t in range(start, STEPS + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    # A fresh run (start 0) is the plain curve whatever the mode.
    plain = learning_rate_schedule(cfg, schedule_start=0)
    np.testing.assert_allclose(
        [float(plain(t)) for t in range(STEPS)],
        [_cosine(t, STEPS) for t in range(STEPS)],
        rtol=1e-6,
    )


def test_describe_schedule_says_what_step_one_runs_at():
    cfg = TrainConfig(steps=300, warmup_steps=30, learning_rate=3e-3)
    assert describe_schedule(cfg) == (
        "learning rate: warmup 0 -> 0.003 over steps 1-30, cosine to 0.0003 at step 300; "
        "step 1 runs at 0"
    )
    cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3)
    assert describe_schedule(cfg) == (
        "learning rate: 0.001 at step 1, cosine to 0.0001 at step 10; step 1 runs at 0.001"
    )
    cfg = TrainConfig(steps=600, warmup_steps=30, learning_rate=1e-3, resume_lr="constant")
    assert describe_schedule(cfg, 300, 301) == (
        "learning rate (train.resume_lr=constant since step 300): 0.001 from step 301 on; "
        "step 301 runs at 0.001"
    )


def test_config_changes_compare_json_forms():
    old = {"train": {"steps": 4, "learning_rate": 3e-3}, "mesh": {"rules": [["a", None]]}}
    new = {"train": {"steps": 6, "learning_rate": 3e-3}, "mesh": {"rules": (("a", None),)}}
    new["data"] = {"seed": 1}
    assert config_history.config_changes(old, new) == {
        "data.seed": [None, 1],
        "train.steps": [4, 6],
    }


class _Checkpoints:
    """What plan_resume reads of a Checkpointer: the latest step and its `extra` config."""

    def __init__(self, step, config):
        self.step, self.config = step, config

    def latest_step(self):
        return self.step

    def read_extra(self, step):
        assert step == self.step
        return {"config": self.config}


def _config(steps=STEPS, lr=PEAK, resume_lr="rewarm", seed=0):
    return {
        "train": {"steps": steps, "learning_rate": lr, "resume_lr": resume_lr, "seed": seed},
        "model": {"d_model": 8},
    }


def _train(config):
    t = config["train"]
    return TrainConfig(steps=t["steps"], learning_rate=t["learning_rate"], resume_lr=t["resume_lr"])


def test_a_second_resume_with_the_same_flags_keeps_the_schedule_start(tmp_path):
    """Fresh run to step 4; resumed at 4 with more steps and resume_lr=rewarm (the segment
    starts at 4); resumed again at 8 with the same flags: still the segment of step 4, so
    it does not warm up a second time; resumed at 12 with a new peak: a new segment."""
    logs = []
    a, b = _config(steps=8, resume_lr="schedule"), _config(steps=16)
    fresh = config_history.plan_resume(tmp_path, a, _train(a), _Checkpoints(None, None))
    assert fresh.schedule_start == 0 and fresh.changes == {}
    fresh.record(0, logs.append)
    (tmp_path / "config.json").write_text(json.dumps(a))  # as the trainer writes it

    first = config_history.plan_resume(tmp_path, b, _train(b), _Checkpoints(4, a))
    assert first.schedule_start == 4
    assert first.changes == {"train.resume_lr": ["schedule", "rewarm"], "train.steps": [8, 16]}
    first.record(4, logs.append)
    assert json.loads((tmp_path / "config.json").read_text()) == b
    assert "config changed since the checkpointed run (checkpoint step 4): " in logs[-2]

    again = config_history.plan_resume(tmp_path, b, _train(b), _Checkpoints(8, b))
    assert (again.changes, again.schedule_start) == ({}, 4)
    assert again.record(8, logs.append) is None  # nothing changed: nothing written

    c = _config(steps=16, lr=5e-4)
    third = config_history.plan_resume(tmp_path, c, _train(c), _Checkpoints(12, b))
    assert third.schedule_start == 12
    third.record(12, logs.append)
    entries = config_history.history(tmp_path)
    assert [(e["step"], e["schedule_start"]) for e in entries] == [(0, 0), (4, 4), (12, 12)]
    assert entries[0]["config"] == a and entries[2]["changed"] == {
        "train.learning_rate": [PEAK, 5e-4]
    }
    # A change outside the schedule fields keeps the segment.
    d = _config(steps=16, lr=5e-4, seed=3)
    assert (
        config_history.plan_resume(tmp_path, d, _train(d), _Checkpoints(14, c)).schedule_start == 12
    )


def test_resuming_with_a_new_learning_rate_reports_it_and_holds_it(tiny_config, tmp_path, capsys):
    """The issue's case: a run resumed with learning_rate 1e-3 ran at 2e-4 without a word.
    Here: 4 steps at peak 3e-3, then resumed to 6 steps at 1e-3 with resume_lr=constant."""
    overrides = {"train.warmup_steps": 2, "train.checkpoint_every": 2}
    train(tiny_config(**overrides, **{"train.steps": 4}), str(tmp_path))
    capsys.readouterr()
    resumed = {
        "train.steps": 6,
        "train.learning_rate": 1e-3,
        "train.resume_lr": "constant",
    }
    train(tiny_config(**overrides, **resumed), str(tmp_path))
    out = capsys.readouterr().out
    assert (
        "config changed since the checkpointed run (checkpoint step 4): train.learning_rate "
        "0.003 -> 0.001, train.resume_lr 'schedule' -> 'constant', train.steps 4 -> 6"
    ) in out
    assert "step 5 runs at 0.001" in out
    rows = {r["step"]: r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/lr" in r}
    np.testing.assert_allclose([rows[5]["train/lr"], rows[6]["train/lr"]], 1e-3, rtol=1e-6)
    assert rows[4]["train/lr"] == pytest.approx(_cosine(3, 4, peak=3e-3), rel=1e-5)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["train"]["learning_rate"], saved["train"]["steps"]) == (1e-3, 6)
    entries = config_history.history(tmp_path)
    assert [e["step"] for e in entries] == [0, 4]
    assert entries[0]["config"]["train"]["learning_rate"] == 3e-3
    assert entries[1]["changed"]["train.steps"] == [4, 6]
