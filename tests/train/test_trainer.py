"""End-to-end training: the loss goes down, resume is exact, runs are protected."""

import json
import os
import shutil

import pytest
from testing_utils import write_mixture

from moejax.config_section import ConfigError
from moejax.train.loop import train
from moejax.train.writers import read_jsonl


def _losses(workdir):
    return {
        r["step"]: r["train/loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    }


def _resume_from(full: str, resumed: str, step: int) -> None:
    """`resumed` becomes a run that stopped after `step`: its checkpoint and config only."""
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(
        os.path.join(full, "checkpoints", str(step)),
        os.path.join(resumed, "checkpoints", str(step)),
    )
    shutil.copy(os.path.join(full, "config.json"), resumed)


def test_thirty_steps_lower_the_loss(tiny_config, tmp_path):
    config = tiny_config(
        "deepseekmoe", **{"train.steps": 30, "train.learning_rate": 1e-2, "train.eval_every": 30}
    )
    final = train(config, str(tmp_path))
    losses = _losses(str(tmp_path))
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    assert final["eval/loss"] < first
    # Logged MoE metrics: per-layer loads sum to one, and throughput is reported.
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    last_row = [r for r in rows if "train/loss" in r][-1]
    assert abs(sum(last_row["train/moe/load/layer0"]) - 1.0) < 1e-5
    assert last_row["perf/tokens_per_sec"] > 0 and 0 < last_row["perf/mfu"]
    for key in (
        "train/grad_norm",
        "train/aux/balance",
        "train/aux/z_loss",
        "train/moe/load_cv",
        "train/moe/router_entropy",
        "train/moe/dropped_fraction",
    ):
        assert key in last_row
    assert os.listdir(os.path.join(tmp_path, "tensorboard"))
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["20", "25", "30"]


def test_resume_continues_exactly(tiny_config, tmp_path):
    config = tiny_config("deepseekmoe", **{"train.steps": 8, "train.checkpoint_every": 4})
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(config, full)
    _resume_from(full, resumed, 4)  # a run that stopped after step 4
    train(config, resumed)
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert b[step] == a[step], (step, a[step], b[step])


def test_a_subword_mixture_resumes_exactly_and_evaluates_per_source(tiny_config, tmp_path):
    """The real-data path end to end: a SentencePiece tokenizer, parquet + jsonl.gz sources
    weighted 0.7 / 0.3, model.vocab_size from the tokenizer; killed after step 4 and resumed,
    it logs the uninterrupted run's losses, and evaluation reports each source."""
    (tmp_path / "data").mkdir()
    sources, tokenizer = write_mixture(tmp_path / "data")
    config = tiny_config(
        "deepseekmoe",
        **{
            "data.sources": sources,
            "data.tokenizer": tokenizer,
            "model.vocab_size": 0,
            "train.steps": 8,
            "train.checkpoint_every": 4,
            "train.eval_every": 4,
        },
    )
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(config, full)
    _resume_from(full, resumed, 4)
    train(config, resumed)
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8] and all(b[s] == a[s] for s in b)
    evals = [r for r in read_jsonl(os.path.join(full, "metrics.jsonl")) if "eval/loss" in r]
    last = evals[-1]
    for name in ("web", "code"):
        assert last[f"eval/loss/{name}"] > 0
        assert 0 < last[f"eval/tokens_per_byte/{name}"] < 1  # sub-words: < 1 token per byte
        assert last[f"eval/bits_per_byte/{name}"] > 0
    with open(os.path.join(full, "config.json")) as f:
        assert json.load(f)["model"]["vocab_size"] == 384  # 320 ids, rounded up to 128s


def test_resume_with_a_different_model_is_refused(tiny_config, tmp_path):
    train(tiny_config("dense", **{"train.steps": 5}), str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ConfigError, match=r"model.d_model=32.*new --workdir"):
        train(tiny_config("dense", **{"train.steps": 5, "model.d_model": 64}), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert json.load(open(tmp_path / "config.json"))["model"]["d_model"] == 32


def test_gshard_with_capacity_reports_drops(tiny_config, tmp_path, capsys):
    config = tiny_config(
        "gshard",
        **{"train.steps": 2, "moe.dispatcher": "capacity_einsum", "moe.capacity_factor": 0.5},
    )
    train(config, str(tmp_path))
    row = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "train/loss" in r][-1]
    # Capacity 0.5 of the balanced load: at least half of the assignments are dropped.
    assert row["train/moe/dropped_fraction"] >= 0.5
    # ... which the router health check reports once per layer (not again at step 2).
    out = capsys.readouterr().out
    assert out.count("router health @ step 1: MoE layer") == 2
    assert "train.max_dropped_fraction=0.2" in out and "@ step 2" not in out


def test_relative_workdir(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(
        tiny_config(
            "dense",
            **{"train.steps": 2, "train.checkpoint_every": 1, "train.async_checkpoint": True},
        ),
        "runs/rel",
    )
    assert sorted(os.listdir(tmp_path / "runs" / "rel" / "checkpoints")) == ["1", "2"]


def test_non_finite_loss_aborts_naming_the_steps(tiny_config, tmp_path):
    # Adam steps have size ~lr whatever the gradient: lr 1e12 overflows float32 activations.
    # Without skipping, the first non-finite step stops the run (tests/train/test_faults.py
    # covers the default, skipping).
    config = tiny_config(
        "dense",
        **{
            "train.steps": 6,
            "train.learning_rate": 1e12,
            "train.grad_clip": 0.0,
            "train.warmup_steps": 0,
            "train.log_every": 3,
            "train.checkpoint_every": 3,
            "train.skip_non_finite": False,
        },
    )
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss or gradients at step 2 .*No checkpoint was "
    ):
        train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing non-finite was saved


def test_non_finite_state_is_never_checkpointed(tiny_config, tmp_path):
    # Checkpoints every step, logs every 5: the loss is still checked before each save.
    config = tiny_config(
        "dense",
        **{
            "train.steps": 6,
            "train.learning_rate": 1e12,
            "train.grad_clip": 0.0,
            "train.warmup_steps": 0,
            "train.log_every": 5,
            "train.checkpoint_every": 1,
            "train.skip_non_finite": False,
        },
    )
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(config, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    losses = _losses(str(tmp_path))  # nothing logged before the abort
    assert not losses and steps and max(steps) < 5
