"""Kill-and-resume: a run killed by SIGKILL (at a chosen step, or while a checkpoint is being
written) or stopped by SIGTERM, then restarted with the same command, logs exactly the per-step
losses of an uninterrupted run, and loses no step past its latest complete checkpoint.

Every run is a `python -m moejax.train` process. They share a JAX persistent compilation cache,
so only the first one compiles (the cached executable is the one a fresh compile produces;
the reference run compiles it, and the equality checks would catch any difference)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from testing_utils import REPO, cli_flags, make_tiny_config

from moejax.train.faults import KILL_IN_SAVE_ENV
from moejax.train.preemption import Preempted, PreemptionWatcher
from moejax.train.writers import read_jsonl

STEPS, EVERY = 12, 3
SETTINGS = {"train.steps": STEPS, "train.checkpoint_every": EVERY, "train.async_checkpoint": True}


def _losses(workdir) -> dict[int, float]:
    """The last logged loss of each step (a resumed run re-logs the steps it redid)."""
    path = os.path.join(workdir, "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in read_jsonl(path) if "train/loss" in r}


def _committed(workdir) -> list[int]:
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _last_logged(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f.read().split("\n")[:-1] if '"train/loss"' in line]
    return int(lines[-1].split('"step": ')[1].split(",")[0]) if lines else 0


def _start(config, workdir, cache_dir, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moejax.train", *cli_flags(config), f"--workdir={workdir}"]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        **(env or {}),
    }
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _run(config, workdir, cache_dir) -> str:
    """Runs to the end; returns stdout."""
    proc = _start(config, workdir, cache_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def _signal_after(proc, workdir, step: int, signum: int, timeout: float = 240) -> None:
    """Sends `signum` once `step` is logged (the run may be a step or two further by then)."""
    deadline = time.monotonic() + timeout
    while _last_logged(workdir) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.01)
    proc.send_signal(signum)


@pytest.fixture(scope="module")
def config(tiny_corpus_dir):
    return make_tiny_config(tiny_corpus_dir, **SETTINGS)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(config, cache_dir, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    _run(config, workdir, cache_dir)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _resume_and_compare(config, workdir, cache_dir, reference) -> str:
    """Reruns the same command; returns its console output after checking the losses."""
    out = _run(config, workdir, cache_dir)
    assert _losses(workdir) == reference  # bit-identical floats, every step
    assert _committed(workdir)[-1] == STEPS
    return out


def test_sigkill_after_a_chosen_step_then_rerun_is_bit_identical(
    config, reference, tmp_path, cache_dir
):
    workdir = str(tmp_path)
    proc = _start(config, workdir, cache_dir)
    _signal_after(proc, workdir, 8, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # Async saves take a few steps to commit: step 3 is complete by now, 6 may be in flight.
    killed_at, complete = _last_logged(workdir), _committed(workdir)
    assert killed_at < STEPS and complete, (killed_at, complete)
    out = _resume_and_compare(config, workdir, cache_dir, reference)
    # Nothing lost beyond the last complete checkpoint: the rerun starts from it.
    assert f"resuming from step {complete[-1]}" in out


def test_sigterm_saves_the_current_step_and_exits_143(config, reference, tmp_path, cache_dir):
    workdir = str(tmp_path)
    proc = _start(config, workdir, cache_dir)
    _signal_after(proc, workdir, 4, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = _last_logged(workdir)
    assert "preemption notice" in stderr and f"after step {stopped_at}" in stderr
    # The step it stopped at is checkpointed (not a multiple of checkpoint_every in general).
    assert _committed(workdir)[-1] == stopped_at < STEPS
    out = _resume_and_compare(config, workdir, cache_dir, reference)
    assert f"resuming from step {stopped_at}" in out  # no step lost at all


def test_sigkill_during_an_async_save_resumes_from_the_previous_step(
    config, reference, tmp_path, cache_dir
):
    workdir = str(tmp_path)
    proc = _start(config, workdir, cache_dir, env={KILL_IN_SAVE_ENV: str(2 * EVERY)})
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    # The save of step 6 was cut short: only orbax's temporary directory exists for it.
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert _committed(workdir) == [EVERY]
    assert any(n.startswith(f"{2 * EVERY}.") for n in names), names
    out = _resume_and_compare(config, workdir, cache_dir, reference)
    assert f"checkpoint step(s) [{2 * EVERY}] were not completely written" in out
    assert f"resuming from step {EVERY}" in out


def test_watcher_records_sigterm_and_restores_the_previous_handler():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert watcher.watching and not watcher.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        assert watcher.should_stop(2) and watcher.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous
    assert Preempted(2, signal.SIGTERM, "saved").exit_code == 143
