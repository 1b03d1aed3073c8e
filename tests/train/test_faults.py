"""Numerical faults and damaged checkpoints: non-finite steps are skipped inside the jitted
step and counted; too many in a row stop the run with the last good checkpoint kept; a
corrupted checkpoint stops the run before training, names the step, and changes nothing."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config.validation import validate
from moejax.data import make_batches
from moejax.sharding.mesh import make_mesh
from moejax.train.checkpoint import Checkpointer, CorruptCheckpointError
from moejax.train.experiment import build_experiment
from moejax.train.faults import NAN_STEPS_ENV, BadStepGuard, FaultHooks, NonFiniteError
from moejax.train.loop import train
from moejax.train.writers import read_jsonl


def _rows(workdir) -> dict[int, dict]:
    return {
        r["step"]: r
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    }


def _committed(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_a_non_finite_step_leaves_params_and_optimizer_state_untouched(tiny_config):
    # warmup 0: the first real update has a non-zero learning rate (a skipped step does not
    # advance the optimizer's count, so the schedule continues where it was).
    config = tiny_config("dense", **{"train.warmup_steps": 0})
    s = validate(config, num_devices=1, num_processes=1)
    exp = build_experiment(s, make_mesh(s.mesh))
    batches = make_batches(s.data, "train")
    state = exp.init_fn(jax.random.PRNGKey(0))
    before = jax.device_get(state)
    poisoned = FaultHooks(nan_steps=(1,)).poison(1, next(batches))
    state, metrics = exp.step_fn(state, jax.tree.map(jnp.asarray, poisoned))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1  # the batch was consumed
    after = jax.device_get(state)
    for a, b in zip(
        jax.tree.leaves((after.params, after.opt_state)),
        jax.tree.leaves((before.params, before.opt_state)),
    ):
        np.testing.assert_array_equal(a, b)
    state, metrics = exp.step_fn(state, jax.tree.map(jnp.asarray, next(batches)))
    assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    moved = jax.device_get(state.params)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(after.params))
    )


def test_injected_nan_steps_are_skipped_then_a_streak_stops_the_run(
    tiny_config, tmp_path, monkeypatch, capsys
):
    # Steps 3 and 5 alone are skipped; 7, 8, 9 in a row reach train.max_bad_steps=3.
    monkeypatch.setenv(NAN_STEPS_ENV, "3,5,7,8,9")
    config = tiny_config(
        "dense", **{"train.steps": 12, "train.checkpoint_every": 2, "train.max_bad_steps": 3}
    )
    with pytest.raises(NonFiniteError) as info:
        train(config, str(tmp_path))
    out, message = capsys.readouterr().out, str(info.value)
    rows = _rows(tmp_path)
    assert [s for s, r in rows.items() if r["train/nonfinite_steps"]] == [3, 5, 7, 8]
    assert rows[3]["train/loss"] is None  # NaN is written as null
    # Skipped: the parameters after steps 3 and 5 are those after steps 2 and 4, bit for bit.
    assert rows[3]["train/param_norm"] == rows[2]["train/param_norm"]
    assert rows[5]["train/param_norm"] == rows[4]["train/param_norm"]
    assert rows[4]["train/param_norm"] != rows[3]["train/param_norm"]
    assert "skipped the update of 1 non-finite step(s) among steps 3-3" in out
    # The streak: stopped at step 9, naming the steps; step 8 was not checkpointed.
    assert "3 consecutive non-finite steps (7 to 9" in message
    assert "train.max_bad_steps=3" in message
    assert "last good checkpoint, step 6, is kept" in message
    assert "not checkpointing step 8" in out
    assert _committed(tmp_path) == [2, 4, 6] and max(rows) == 8


def test_bad_step_guard_counts_streaks_and_names_the_steps():
    guard = BadStepGuard(skip=True, abort=True, max_bad_steps=2)
    assert guard.observe_all([1, 2, 3], [0, 1, 0], [1.0, float("nan"), 1.0]) is None
    assert (guard.total, guard.streak) == (1, 0)
    assert guard.observe(3, True, 0.0) is None  # already observed: ignored
    reason = guard.observe_all([4, 5], [1, 1], [float("inf"), float("nan")])
    assert "2 consecutive non-finite steps (4 to 5" in reason
    assert "No checkpoint" in guard.stop_message(reason, None, "/w")
    never = BadStepGuard(skip=True, abort=False, max_bad_steps=1)
    assert never.observe_all([1, 2], [1, 1], [0.0, 0.0]) is None and never.total == 2
    strict = BadStepGuard(skip=False, abort=True, max_bad_steps=10)
    assert "skip_non_finite=False" in strict.observe(1, True, float("nan"))


def test_fault_hooks_parse_the_environment():
    hooks = FaultHooks.from_env({NAN_STEPS_ENV: "5, 3,3", "MOEJAX_FAULT_KILL_IN_SAVE": "8"})
    assert hooks.nan_steps == (3, 5) and hooks.kill_in_save_step == 8
    assert FaultHooks.from_env({}) == FaultHooks()
    with pytest.raises(ValueError, match="unset them for a normal run"):
        FaultHooks.from_env({NAN_STEPS_ENV: "three"})


def _truncate_arrays(step_dir: str) -> None:
    for path in glob.glob(f"{step_dir}/state/d/*"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _snapshot(root) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n))
        for d, _, names in os.walk(root)
        for n in names
    }


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_stops_naming_it_then_resumes_from_the_previous(
    tiny_config, tmp_path, capsys
):
    config = tiny_config("dense", **{"train.steps": 4, "train.checkpoint_every": 2})
    workdir = str(tmp_path / "run")
    train(config, workdir)
    losses = {s: r["train/loss"] for s, r in _rows(workdir).items()}
    _truncate_arrays(os.path.join(workdir, "checkpoints", "4"))
    before = _snapshot(os.path.join(workdir, "checkpoints"))

    with pytest.raises(CorruptCheckpointError) as info:
        train(config, workdir)
    message = str(info.value)
    assert "Checkpoint step 4" in message and "previous complete checkpoint, step 2" in message
    assert "nothing was changed on disk" in message
    assert _snapshot(os.path.join(workdir, "checkpoints")) == before  # nothing overwritten

    # The fix the message gives: move the damaged step aside, rerun the same command.
    aside = os.path.join(workdir, "corrupt-checkpoint-4")
    assert f"mv {os.path.join(workdir, 'checkpoints', '4')} {aside}" in message
    os.rename(os.path.join(workdir, "checkpoints", "4"), aside)
    capsys.readouterr()
    train(config, workdir)
    assert "resuming from step 2" in capsys.readouterr().out
    assert {s: r["train/loss"] for s, r in _rows(workdir).items()} == losses
    assert _committed(workdir) == [2, 4]


def test_an_interrupted_save_is_reported_and_skipped(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(2, state, data_state={"position": 2})
    # What a process killed while saving step 4 leaves behind (see test_preemption.py).
    os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "state")
    notes = []
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        assert ckpt.interrupted_steps() == [4]
        restored, data_state, start = ckpt.restore_or_init(
            lambda: pytest.fail("must resume"), jax.tree.map(jnp.zeros_like, state), notes.append
        )
        assert start == 2 and data_state == {"position": 2}
        np.testing.assert_array_equal(restored["w"], state["w"])
        assert ckpt.save(4, state)  # replaces the temporary directory
        assert ckpt.all_steps() == [2, 4] and ckpt.interrupted_steps() == []
    assert notes == [
        f"checkpoint step(s) [4] were not completely written (the run stopped "
        f"during the save): ignoring their temporary files in "
        f"{tmp_path / 'checkpoints'}, resuming from step 2."
    ]
