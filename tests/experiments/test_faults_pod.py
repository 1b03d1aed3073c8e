"""`experiments/faults.py` on a pod's faults, in reduced form (one trial each):

- multi-host (2 processes x 2 CPU devices, jax.distributed over gloo), in `make test`:
  SIGKILL one process (the survivor stops within --heartbeat_timeout + a margin and the
  rerun resumes bit-identically), SIGTERM one process (both save the same step and exit
  143, the rerun loses nothing), and a process that cannot reach the coordinator (one
  message naming the address and the flag);
- the corrupt and interrupted-save scenarios with every workdir in gs://test-bucket on a
  local GCS emulator (`--gcs`; slow: tests/train/test_gcs_workdir.py covers both checks in
  the default run).
"""

import os
import subprocess
import sys

import pytest
from testing_utils import REPO, cli_flags, make_tiny_config, run_faults

SCRIPT = REPO / "experiments" / "faults.py"


def _faults(tmp_path, *args: str) -> dict:
    _, report = run_faults(tmp_path, *args)
    return {row["scenario"]: row for row in report["scenarios"]}


def _assert_recovered(rows: dict, names: list[str]) -> None:
    for name in names:
        row = rows[name]
        got = {k: row[k] for k in ("trials", "recovered", "steps_lost", "identical")}
        assert got == {"trials": 1, "recovered": 1, "steps_lost": 0, "identical": 1}, row


def test_unreachable_coordinator_names_the_address_and_the_flag(tiny_corpus_dir, tmp_path):
    config = make_tiny_config(tiny_corpus_dir, "dense")
    cmd = [sys.executable, "-m", "moejax.train", *cli_flags(config, "dense")]
    cmd += [f"--workdir={tmp_path / 'run'}", "--coordinator=127.0.0.1:9", "--num_processes=2"]
    cmd += ["--process_id=1", "--init_timeout=2"]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("moejax: error:")]
    assert "CoordinatorUnreachable: process 1 could not reach the coordinator at " in line
    assert "--coordinator=127.0.0.1:9 within --init_timeout=2 s" in line
    assert not (tmp_path / "run").exists()  # nothing was started


def test_multi_host_kill_and_preemption_recover(tmp_path):
    """Five 2-process jobs (the reference, then each fault and its rerun) sharing one JAX
    compilation cache, about 95 s: in the default run, where it stands for the one-process
    SIGTERM and SIGKILL cases of tests/train/test_preemption.py (slow) too."""
    rows = _faults(tmp_path, "--scenarios=mh_sigterm,mh_sigkill", "--jobs=1")
    _assert_recovered(rows, ["mh_sigterm", "mh_sigkill"])


@pytest.mark.slow
def test_corrupt_and_interrupted_save_in_a_bucket(tmp_path):
    rows = _faults(tmp_path, "--gcs", "--scenarios=corrupt,kill_during_save")
    _assert_recovered(rows, ["corrupt", "kill_during_save"])
