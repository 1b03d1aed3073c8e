"""Fault injection, end to end: kill, preempt, poison and corrupt tiny training runs, rerun the
same command, and check that nothing is lost and the loss trajectory is the one an
uninterrupted run logs.

    python experiments/faults.py                 # 3 trials per scenario, a table
    python experiments/faults.py --trials 1      # under two minutes on a 2-core CPU
    python experiments/faults.py --trials 1 --json
    python experiments/faults.py --scenarios sigkill,corrupt --trials 5 --jobs 1
    python experiments/faults.py --data=$DIR      # on experiments/mixture_data.py's mixture
    python experiments/faults.py --gcs --scenarios corrupt,kill_during_save  # in a bucket
    python experiments/faults.py --scenarios mh_sigkill,mh_sigterm,mh_unreachable --jobs 1

stdout is the table (or the JSON) alone; stderr gets a progress line for the reference run
and for each trial as it finishes.

Every run is `python -m moejax.train` on configs/deepseekmoe.py shrunk to seconds (d_model 32,
2 layers, 4 experts top-2, 16 steps of 4 x 32 tokens, asynchronous checkpoints every 4 steps,
losses logged every step) over the offline corpus, built into the work directory. The runs
share a JAX persistent compilation cache, so only the first one compiles, and `--jobs` (2)
trials run at a time. Trial t of a scenario draws its random steps from (--seed, scenario, t),
so a seed reproduces its trials. Scenarios:

  sigkill           SIGKILL at a random step after the second checkpoint interval (from
                    outside, while it trains), rerun
  sigterm           SIGTERM (preemption notice) at a random step: it must save that step and
                    exit with status 143; rerun
  kill_during_save  SIGKILL while the asynchronous save of a random checkpoint step is being
                    written (testing hook MOEJAX_FAULT_KILL_IN_SAVE): the half-written step
                    must be ignored and reported; rerun
  nan_skip          NaN batches at two random steps (MOEJAX_FAULT_NAN_STEPS): their updates
                    are skipped and counted, the run finishes
  nan_stop          train.max_bad_steps (3) NaN batches in a row: the run must stop with a
                    message, keeping its last good checkpoint; rerun without the fault
  corrupt           a finished run's latest checkpoint is damaged (truncated arrays, deleted
                    manifest or truncated tree metadata, in turn): the rerun must refuse it
                    naming the step and change nothing; then apply the fix the message gives
                    (move the step aside: `mv`, or `gcloud storage mv` in a bucket) and rerun

With --gcs every workdir is in gs://test-bucket on a local GCS emulator
(tests/storage_emulator.py, the `test` extra): checkpoints, metrics and the damage all go
through the bucket; a save cut short there is a step directory without orbax's
`commit_success.txt`.

Multi-host scenarios: one job is PROCESSES (2) `python -m moejax.train` processes x DEVICES
(2) CPU devices under jax.distributed (gloo), configs/dense.py shrunk the same way, 8 rows a
step split over the 4 devices, MH_STEPS (64) steps with checkpoints every MH_EVERY (8),
compared with an uninterrupted job of the same shape:

  mh_sigkill        SIGKILL process 1 at a random step: process 0 must stop by itself within
                    --heartbeat_timeout (HEARTBEAT, 10 s) + STOP_MARGIN (60 s), with JAX's
                    "another task died" message; rerun both processes
  mh_sigterm        SIGTERM to process 1 only: both must checkpoint the same step (JAX's
                    preemption sync point) and exit 143; rerun
  mh_unreachable    process 1 alone, with a --coordinator nobody listens on: exit 1 within
                    --init_timeout (5 s) with one message naming the address and the flag,
                    nothing written ("identical" counts an untouched workdir)

Columns, per scenario over its trials:

  recovered    trials in which every check above held and the final rerun reached the last
               step with its checkpoint
  steps lost   the largest, over trials, of (newest intact checkpoint on disk after the
               fault) - (step the rerun resumed from): work lost beyond what the last complete
               checkpoint guarantees (nan_skip, which is not restarted: steps missing from
               its final checkpoint). 0 is the goal. The steps redone since that checkpoint
               are in the `redone` column (async saves take a few steps to complete, so a
               SIGKILL typically redoes up to 2 checkpoint intervals)
  identical    trials whose per-step losses (the last logged value of each step) equal the
               uninterrupted run's bit for bit. For nan_skip, where the poisoned updates are
               meant to be missing: the losses before the first NaN step are equal and the
               parameter norm is unchanged across each skipped step
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moejax.paths import as_path, glob_files, is_remote, join, resolve  # noqa: E402
from moejax.train.faults import CHECKPOINT_CORRUPTIONS  # noqa: E402

STEPS, EVERY, MAX_BAD = 16, 4, 3
# Multi-host jobs run longer: JAX acts on a SIGTERM at a preemption sync point the processes
# agree on once the notice has reached them, 2 to 16 steps of ~30 ms later here, so a 16-step
# job can finish before it (it did); SIGTERM comes within the first eighth.
MH_STEPS, MH_EVERY = 64, 8
CORPUS_BYTES = 200_000
# Multi-host jobs: processes x CPU devices each, and the timeouts they run with.
PROCESSES, DEVICES = 2, 2
HEARTBEAT = 10  # s: --heartbeat_timeout, after which a lost process stops the job
INIT_TIMEOUT = 120  # s: --init_timeout (process 0 may start slowly on a loaded machine)
UNREACHABLE_TIMEOUT = 5  # s: --init_timeout of the unreachable-coordinator scenario
STOP_MARGIN = 60  # s: allowed past HEARTBEAT for a survivor to stop after a SIGKILL
RUN_TIMEOUT = 1800  # s: a run (or job) still going after this is killed and counts as failed


def tiny_flags(data_dir: str, mixture: str | None = None, multi_host: bool = False) -> list[str]:
    """The tiny run's flags; with `mixture`, a directory written by experiments/
    mixture_data.py, it reads that parquet + jsonl mixture with its SentencePiece model.
    `multi_host`: 8 rows a batch, split over the data axis of all PROCESSES x DEVICES."""
    sets = {
        "model.d_model": 32,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.d_ff": 64,
        "model.num_layers": 2,
        "moe.num_experts": 4,
        "moe.top_k": 2,
        "moe.d_expert": 16,
        "moe.gmm_tile": 16,
        "data.data_dir": data_dir,
        "data.max_bytes_per_domain": CORPUS_BYTES,
        "data.seq_len": 32,
        "data.global_batch_size": 4,
        "train.steps": MH_STEPS if multi_host else STEPS,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.checkpoint_every": MH_EVERY if multi_host else EVERY,
        "train.async_checkpoint": True,
        "train.max_bad_steps": MAX_BAD,
        "train.peak_tflops": 1.0,
    }
    config = "deepseekmoe.py"
    if multi_host:  # the dense config compiles fastest; what is tested is the processes
        sets.update({"data.global_batch_size": 8, "mesh.data": -1, "model.num_layers": 1})
        config = "dense.py"
    if mixture:
        sets["data.sources"] = (
            f"parquet:{mixture}/web-*.parquet@0.7,jsonl:{mixture}/code-*.jsonl#content@0.3"
        )
        sets["data.tokenizer"] = f"sentencepiece:{mixture}/sp.model"
        sets["model.vocab_size"] = 0  # the tokenizer's size
    return [f"--config={os.path.join(REPO, 'configs', config)}"] + [
        f"--config.{k}={v}" for k, v in sets.items()
    ]


class Runner:
    """Starts `python -m moejax.train` runs of the tiny config in fresh workdirs, under
    `root` (a local directory) or `runs_root` (e.g. `gs://test-bucket/faults` with --gcs)."""

    def __init__(self, root: str, mixture: str | None = None, runs_root: str | None = None):
        self.root = root
        self.runs_root = runs_root or root
        self.mixture = mixture
        self.data_dir = os.path.join(root, "data")
        self.cache_dir = os.path.join(root, "jax_cache")

    def workdir(self, name: str) -> str:
        return join(self.runs_root, name)

    def _env(self, env: dict | None, devices: int = 1) -> dict:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MOEJAX_FAULT_")}
        return {
            **inherited,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": self.cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            **(env or {}),
        }

    def command(self, workdir: str, extra: list[str] = ()) -> list[str]:
        flags = tiny_flags(self.data_dir, self.mixture, multi_host=bool(extra))
        return [sys.executable, "-m", "moejax.train", *flags, f"--workdir={workdir}", *extra]

    def start(self, workdir: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(workdir),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(env),
        )

    def run(self, workdir: str, env: dict | None = None) -> tuple[int, str, str]:
        proc = self.start(workdir, env)
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return proc.returncode, out, err

    # --- multi-host: PROCESSES processes x DEVICES CPU devices, jax.distributed over gloo --

    def start_job(
        self,
        workdir: str,
        coordinator: str | None = None,
        only: int | None = None,
        init_timeout: int = INIT_TIMEOUT,
    ) -> list[subprocess.Popen]:
        """The PROCESSES processes of one job (or process `only` alone), each with its own
        `--process_id`, logging to files beside the workdir's name in `root`."""
        coordinator = coordinator or f"127.0.0.1:{free_port()}"
        procs = []
        for i in range(PROCESSES) if only is None else [only]:
            extra = [
                f"--coordinator={coordinator}",
                f"--num_processes={PROCESSES}",
                f"--process_id={i}",
                f"--heartbeat_timeout={HEARTBEAT}",
                f"--init_timeout={init_timeout}",
            ]
            log = self.log_path(workdir, i)
            procs.append(
                subprocess.Popen(
                    self.command(workdir, extra),
                    cwd=REPO,
                    stdout=open(log + ".out", "w"),
                    stderr=open(log + ".err", "w"),
                    env=self._env(None, DEVICES),
                )
            )
        return procs

    def log_path(self, workdir: str, process: int) -> str:
        return os.path.join(self.root, f"{workdir.rstrip('/').split('/')[-1]}.p{process}")

    def output(self, workdir: str, process: int) -> tuple[str, str]:
        log = self.log_path(workdir, process)
        return tuple(open(log + suffix).read() for suffix in (".out", ".err"))

    def run_job(self, workdir: str) -> list[int]:
        """Runs one job to its end; the exit status of each process."""
        procs = self.start_job(workdir)
        return [wait(p) for p in procs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> int:
    """The exit status of `proc`, killed (-9) if it runs past `timeout` s."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# --- Reading a workdir -------------------------------------------------------------------


def losses(workdir: str) -> dict[int, float | None]:
    """The last logged loss of each step."""
    return {r["step"]: r["train/loss"] for r in records(workdir)}


def records(workdir: str) -> list[dict]:
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if "train/loss" in record:
            out.append(record)
    return out


def last_logged(workdir: str) -> int:
    rows = records(workdir)
    return rows[-1]["step"] if rows else 0


def committed(workdir: str) -> list[int]:
    """Complete checkpoint steps (in a bucket, those with orbax's commit file)."""
    root = as_path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.name.isdigit()]
    if is_remote(workdir):
        steps = [p for p in steps if (p / "commit_success.txt").exists()]
    return sorted(int(p.name) for p in steps)


def resumed_from(stdout: str) -> int:
    match = re.search(r"resuming from step (\d+)", stdout)
    return int(match.group(1)) if match else 0


def signal_after(proc: subprocess.Popen, workdir: str, step: int, signum: int, target=None) -> None:
    """Sends `signum` to `target` (default `proc`, the process that logs) once `step` is
    logged (the run may be a step further by then)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while last_logged(workdir) < step:
        if proc.poll() is not None:
            err = proc.communicate()[1] or ""  # the stderr of a pipe (multi-host: a file)
            raise RuntimeError(f"run ended before step {step}: {err[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"run did not reach step {step}")
        time.sleep(0.005)
    (target or proc).send_signal(signum)


# --- Scenarios: each returns one trial's result -------------------------------------------


def _rerun(runner, workdir, reference, intact: int, env=None) -> dict:
    """The recovery: the same command again; checks it finished and compares losses."""
    rc, out, err = runner.run(workdir, env)
    start = resumed_from(out)
    return {
        "rerun_ok": rc == 0 and committed(workdir)[-1:] == [STEPS],
        "steps_lost": intact - start,
        "resumed_from": start,
        "identical": losses(workdir) == reference,
        "rerun_out": out,
        "rerun_err": err,
    }


def scenario_sigkill(runner, reference, rng, name: str, reference_dir: str, trial: int) -> dict:
    workdir = runner.workdir(name)
    step = rng.randint(2 * EVERY + 1, STEPS - 2)  # a step-4 save has completed by then
    proc = runner.start(workdir)
    signal_after(proc, workdir, step, signal.SIGKILL)
    proc.communicate()
    killed_at, intact = last_logged(workdir), (committed(workdir) or [0])[-1]
    r = _rerun(runner, workdir, reference, intact)
    return {
        "recovered": proc.returncode == -signal.SIGKILL and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": killed_at - r["resumed_from"],
        "identical": r["identical"],
        "detail": f"killed after step {killed_at}",
    }


def scenario_sigterm(runner, reference, rng, name: str, reference_dir: str, trial: int) -> dict:
    workdir = runner.workdir(name)
    step = rng.randint(2, STEPS - 2)
    proc = runner.start(workdir)
    signal_after(proc, workdir, step, signal.SIGTERM)
    _, err = proc.communicate()
    stopped_at = last_logged(workdir)
    saved = committed(workdir)[-1:] == [stopped_at] and "preemption notice" in err
    r = _rerun(runner, workdir, reference, stopped_at)
    return {
        "recovered": proc.returncode == 143 and saved and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": stopped_at - r["resumed_from"],
        "identical": r["identical"],
        "detail": f"SIGTERM after step {stopped_at}, exit {proc.returncode}",
    }


def scenario_kill_during_save(
    runner, reference, rng, name: str, reference_dir: str, trial: int
) -> dict:
    workdir = runner.workdir(name)
    step = EVERY * rng.randint(2, STEPS // EVERY - 1)
    proc = runner.start(workdir, {"MOEJAX_FAULT_KILL_IN_SAVE": str(step)})
    proc.communicate()
    names = [p.name for p in (as_path(workdir) / "checkpoints").iterdir()]
    # On disk a temporary directory (created before save() returns); in a bucket the step
    # directory without its commit file, unless the kill came before its first object.
    left = any(n.startswith(f"{step}.orbax-checkpoint-tmp") or n == str(step) for n in names)
    half_written = step not in committed(workdir) and (left or is_remote(workdir))
    intact = (committed(workdir) or [0])[-1]
    r = _rerun(runner, workdir, reference, intact)
    reported = f"checkpoint step(s) [{step}] were not completely written" in r["rerun_out"]
    reported = reported or not left
    return {
        "recovered": proc.returncode == -signal.SIGKILL
        and half_written
        and reported
        and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": step - r["resumed_from"],  # killed right after logging `step`
        "identical": r["identical"],
        "detail": f"killed saving step {step} ({'partly written' if left else 'nothing written'})"
        f"; resumed from {r['resumed_from']}",
    }


def scenario_nan_skip(runner, reference, rng, name: str, reference_dir: str, trial: int) -> dict:
    workdir = runner.workdir(name)
    bad = sorted(rng.sample(range(2, STEPS + 1), 2))
    rc, out, err = runner.run(workdir, {"MOEJAX_FAULT_NAN_STEPS": ",".join(map(str, bad))})
    rows = {r["step"]: r for r in records(workdir)}
    flagged = [s for s, r in rows.items() if r.get("train/nonfinite_steps")]
    unchanged = all(rows[s]["train/param_norm"] == rows[s - 1]["train/param_norm"] for s in bad)
    before = {s: v for s, v in losses(workdir).items() if s < bad[0]}
    identical = unchanged and before == {s: reference[s] for s in before}
    return {
        "recovered": rc == 0 and flagged == bad and committed(workdir)[-1:] == [STEPS],
        "steps_lost": STEPS - (committed(workdir) or [0])[-1],
        "redone": 0,
        "identical": identical,
        "detail": f"NaN at steps {bad}: skipped {flagged}",
    }


def scenario_nan_stop(runner, reference, rng, name: str, reference_dir: str, trial: int) -> dict:
    workdir = runner.workdir(name)
    first = rng.randint(EVERY + 1, STEPS - MAX_BAD)
    bad = list(range(first, first + MAX_BAD))
    rc, _, err = runner.run(workdir, {"MOEJAX_FAULT_NAN_STEPS": ",".join(map(str, bad))})
    good = [s for s in committed(workdir) if s < first]
    kept = committed(workdir) == good and bool(good)
    message = (
        f"{MAX_BAD} consecutive non-finite steps ({first} to {bad[-1]}" in err
        and f"last good checkpoint, step {good[-1] if good else None}, is kept" in err
    )
    r = _rerun(runner, workdir, reference, good[-1] if good else 0)  # the fault has passed
    return {
        "recovered": rc == 1 and kept and message and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": bad[-1] - r["resumed_from"],
        "identical": r["identical"],
        "detail": f"NaN at steps {bad}: stopped, kept step {good[-1] if good else None}",
    }


# The fault table's rotation: the state corruptions (not the data-iterator one).
CORRUPTIONS = {
    name: CHECKPOINT_CORRUPTIONS[name]
    for name in ("truncated arrays", "deleted manifest", "truncated tree metadata")
}


def _snapshot(root: str) -> dict[str, int]:
    """{file: size} under `root` (a local directory or a gs:// URL)."""
    files = glob_files(join(root, "**", "*"))
    return {f[len(resolve(root)) :]: as_path(f).stat().length for f in files}


def _copy_tree(source: str, target: str) -> None:
    for f in glob_files(join(source, "**", "*")):
        destination = as_path(target + f[len(resolve(source)) :])
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(as_path(f).read_bytes())  # one upload, empty files too


def scenario_corrupt(runner, reference, rng, name: str, reference_dir: str, trial: int) -> dict:
    workdir = runner.workdir(name)
    _copy_tree(reference_dir, workdir)
    kind = list(CORRUPTIONS)[trial % len(CORRUPTIONS)]
    step = committed(workdir)[-1]
    CORRUPTIONS[kind](join(workdir, "checkpoints", str(step)))
    before = _snapshot(join(workdir, "checkpoints"))
    rc, _, err = runner.run(workdir)
    named = f"Checkpoint step {step} ({workdir}/checkpoints/{step})" in err
    named = named and "nothing was changed on disk" in err
    untouched = _snapshot(join(workdir, "checkpoints")) == before
    move = re.search(r"`(?:mv|gcloud storage mv) (\S+) (\S+)`", err)  # the fix it gives
    if move:
        as_path(move.group(1)).rename(move.group(2))  # what that command does
    intact = (committed(workdir) or [0])[-1]
    r = _rerun(runner, workdir, reference, intact)
    return {
        "recovered": rc == 1 and named and untouched and bool(move) and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": step - r["resumed_from"],
        "identical": r["identical"],
        "detail": f"{kind} at step {step}",
    }


# --- Multi-host scenarios: PROCESSES processes x DEVICES CPU devices under jax.distributed ---


def _rerun_job(runner, workdir, reference, intact: int) -> dict:
    """The recovery of a job: the same commands again, on every process."""
    codes = runner.run_job(workdir)
    out, err = runner.output(workdir, 0)
    start = resumed_from(out)
    return {
        "rerun_ok": codes == [0] * PROCESSES and committed(workdir)[-1:] == [MH_STEPS],
        "steps_lost": intact - start,
        "resumed_from": start,
        "identical": losses(workdir) == reference,
        "rerun_err": err,
    }


def scenario_mh_sigkill(runner, reference, rng, name: str, reference_dir: str, trial: int):
    """SIGKILL process 1 mid-step: process 0 must stop by itself (JAX's heartbeat, set by
    --heartbeat_timeout) within HEARTBEAT + STOP_MARGIN s; the rerun resumes."""
    workdir = runner.workdir(name)
    step = rng.randint(2 * MH_EVERY + 1, MH_STEPS - 2)
    procs = runner.start_job(workdir)
    signal_after(procs[0], workdir, step, signal.SIGKILL, target=procs[1])
    killed_at = time.monotonic()
    wait(procs[1])
    code = wait(procs[0], timeout=HEARTBEAT + STOP_MARGIN)
    seconds = time.monotonic() - killed_at
    _, err = runner.output(workdir, 0)
    told = "another task died" in err or "detected fatal errors" in err
    stopped = code not in (0, -signal.SIGKILL) and seconds < HEARTBEAT + STOP_MARGIN
    logged, intact = last_logged(workdir), (committed(workdir) or [0])[-1]
    r = _rerun_job(runner, workdir, reference, intact)
    return {
        "recovered": stopped and told and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": logged - r["resumed_from"],
        "identical": r["identical"],
        "detail": f"process 1 killed after step {logged}: process 0 exited {code} after "
        f"{seconds:.1f} s; resumed from {r['resumed_from']}",
    }


def scenario_mh_sigterm(runner, reference, rng, name: str, reference_dir: str, trial: int):
    """SIGTERM to process 1 only: JAX's preemption sync point makes both processes save the
    same step and exit 143; the rerun loses nothing."""
    workdir = runner.workdir(name)
    step = rng.randint(2, MH_STEPS // 8)
    procs = runner.start_job(workdir)
    signal_after(procs[0], workdir, step, signal.SIGTERM, target=procs[1])
    codes = [wait(p) for p in procs]
    stopped_at = last_logged(workdir)
    _, err = runner.output(workdir, 0)
    saved = committed(workdir)[-1:] == [stopped_at] and "preemption notice" in err
    r = _rerun_job(runner, workdir, reference, stopped_at)
    return {
        "recovered": codes == [143] * PROCESSES and saved and r["rerun_ok"],
        "steps_lost": r["steps_lost"],
        "redone": stopped_at - r["resumed_from"],
        "identical": r["identical"],
        "detail": f"SIGTERM to process 1 after step {step}: both saved step {stopped_at}, "
        f"exit {codes}",
    }


def scenario_mh_unreachable(runner, reference, rng, name: str, reference_dir: str, trial: int):
    """Process 1 started with a coordinator nobody listens on: exit 1 with one message
    naming the address and the flag, within --init_timeout, having written nothing."""
    workdir = runner.workdir(name)
    coordinator = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    [proc] = runner.start_job(workdir, coordinator, only=1, init_timeout=UNREACHABLE_TIMEOUT)
    code = wait(proc)  # the time is mostly Python's and JAX's start-up: reported, not bounded
    seconds = time.monotonic() - t0
    _, err = runner.output(workdir, 1)
    named = f"--coordinator={coordinator} within --init_timeout={UNREACHABLE_TIMEOUT}" in err
    untouched = not as_path(workdir).exists()
    return {
        "recovered": code == 1 and named and "CoordinatorUnreachable" in err,
        "steps_lost": 0,
        "redone": 0,
        "identical": untouched,  # nothing was started, nothing written
        "detail": f"exit {code} after {seconds:.1f} s: {err.strip().splitlines()[-1][:160]}",
    }


SCENARIOS = ["sigkill", "sigterm", "kill_during_save", "nan_skip", "nan_stop", "corrupt"]
MULTI_HOST = ["mh_sigkill", "mh_sigterm", "mh_unreachable"]


def progress(message: str) -> None:
    """One progress line on stderr (stdout is the table or the JSON alone)."""
    print(f"faults: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=3, help="trials per scenario")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0, help="seed of the random steps")
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--jobs", type=int, default=2, help="trials run at a time")
    p.add_argument(
        "--data",
        default=None,
        help="a directory written by experiments/mixture_data.py: train on its parquet + "
        "jsonl mixture with its SentencePiece tokenizer instead of the byte corpus",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS + MULTI_HOST),
        help=f"comma-separated subset of {SCENARIOS + MULTI_HOST}",
    )
    p.add_argument(
        "--gcs",
        action="store_true",
        help="run every workdir in gs://test-bucket on a local GCS emulator "
        "(tests/storage_emulator.py; needs the test extra)",
    )
    args = p.parse_args(argv)
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(chosen) - set(SCENARIOS + MULTI_HOST))
    if unknown or args.trials < 1:
        p.error(
            f"unknown scenario(s) {unknown}; choose from {SCENARIOS + MULTI_HOST}"
            if unknown
            else "--trials must be >= 1"
        )
    with contextlib.ExitStack() as stack:
        runs_root = None
        if args.gcs:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from storage_emulator import BUCKET, storage_emulator

            stack.enter_context(storage_emulator())  # its variables reach every run
            runs_root = f"gs://{BUCKET}/faults"
        return _main(args, chosen, runs_root)


def _main(args, chosen: list[str], runs_root: str | None) -> int:
    root = args.workdir or tempfile.mkdtemp(prefix="moejax-faults-")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    progress(
        f"{len(chosen)} scenario(s) x {args.trials} trial(s), {args.jobs} at a time; "
        "a line per trial as it finishes"
    )
    from moejax.data import build_corpus  # the one corpus every run reads

    runner = Runner(root, os.path.abspath(args.data) if args.data else None, runs_root)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table or the JSON alone
        build_corpus(runner.data_dir, max_bytes_per_domain=CORPUS_BYTES)

    references = {}  # single-host and multi-host: (workdir, per-step losses)
    if any(name in SCENARIOS for name in chosen):
        reference_dir = runner.workdir("reference")
        progress(f"the uninterrupted reference run ({STEPS} steps; compiles once) in {root}")
        rc, _, err = runner.run(reference_dir)  # compiles once, filling the cache
        if rc != 0:
            print(err[-4000:], file=sys.stderr)
            return 1
        references["single"] = (reference_dir, losses(reference_dir))
        progress(f"reference done at {time.perf_counter() - t0:.0f} s")
    if any(name in MULTI_HOST[:2] for name in chosen):
        reference_dir = runner.workdir("mh-reference")
        progress(f"the uninterrupted {PROCESSES}-process reference job in {root}")
        codes = runner.run_job(reference_dir)
        if codes != [0] * PROCESSES:
            print(runner.output(reference_dir, 0)[1][-4000:], file=sys.stderr)
            return 1
        references["multi"] = (reference_dir, losses(reference_dir))
        progress(f"multi-host reference done at {time.perf_counter() - t0:.0f} s")

    jobs = [(name, trial) for name in chosen for trial in range(args.trials)]
    finished = []  # trials done so far (threads append; the GIL keeps it whole)

    def one(name: str, trial: int) -> dict:
        rng = random.Random(f"{args.seed}/{name}/{trial}")
        fn = globals()[f"scenario_{name}"]
        reference_dir, reference = references.get(
            "multi" if name in MULTI_HOST else "single", (None, {})
        )
        started = time.perf_counter()
        result = fn(runner, reference, rng, f"{name}-{trial}", reference_dir, trial)
        finished.append((name, trial))
        progress(
            f"[{len(finished)}/{len(jobs)}] {name} trial {trial}: "
            + ("recovered" if result["recovered"] else "NOT recovered")
            + f", {'identical' if result['identical'] else 'losses differ'}, "
            f"{result['steps_lost']} step(s) lost, {result['redone']} redone "
            f"({time.perf_counter() - started:.0f} s)"
        )
        return result

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = dict(zip(jobs, pool.map(lambda job: one(*job), jobs)))
    results = []
    for name in chosen:
        trials = [done[(name, t)] for t in range(args.trials)]
        results.append(
            {
                "scenario": name,
                "trials": len(trials),
                "recovered": sum(t["recovered"] for t in trials),
                "steps_lost": max(t["steps_lost"] for t in trials),
                "identical": sum(t["identical"] for t in trials),
                "redone": max(t["redone"] for t in trials),
                "details": [t["detail"] for t in trials],
            }
        )
    seconds = time.perf_counter() - t0
    if not args.keep and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)

    ok = all(
        r["recovered"] == r["trials"] == r["identical"] and r["steps_lost"] == 0 for r in results
    )
    if args.json:
        print(
            json.dumps(
                {
                    "scenarios": results,
                    "steps": STEPS,
                    "checkpoint_every": EVERY,
                    "multi_host_steps": MH_STEPS,
                    "multi_host_checkpoint_every": MH_EVERY,
                    "seconds": round(seconds, 1),
                    "all_recovered": ok,
                },
                indent=2,
            )
        )
    else:
        print("| scenario | trials | recovered | steps lost | identical | redone (max) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(
                f"| {r['scenario']} | {r['trials']} | {r['recovered']}/{r['trials']} | "
                f"{r['steps_lost']} | {r['identical']}/{r['trials']} | {r['redone']} |"
            )
        print(
            f"\n{STEPS} steps, checkpoints every {EVERY} (multi-host: {MH_STEPS}, every "
            f"{MH_EVERY}); {seconds:.0f} s; "
            + ("every scenario recovered, nothing lost." if ok else "FAILURES above.")
        )
        for r in results:
            for d in r["details"]:
                print(f"  {r['scenario']}: {d}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
