"""A run whose workdir is `gs://test-bucket/run`, on a local GCS emulator
(`tests/storage_emulator.py`): it trains, is killed while saving a checkpoint, and the same
command resumes bit-identically, with config, checkpoints, metrics and TensorBoard events in
the bucket; a step without orbax's commit file is reported and skipped, and a damaged one is
refused naming its gs:// path and the command that moves it aside. The path helpers
(`moejax.paths`) behave alike on disk and in the bucket."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from testing_utils import REPO, cli_flags

from moejax.config.validation import validate
from moejax.paths import as_path, glob_files, is_remote, join, resolve, write_text
from moejax.sharding.mesh import make_mesh
from moejax.train.checkpoint import Checkpointer, CorruptCheckpointError
from moejax.train.experiment import build_experiment
from moejax.train.faults import CHECKPOINT_CORRUPTIONS
from moejax.train.loop import train
from moejax.train.preflight import WorkdirError, check_workdir
from moejax.train.writers import JsonlWriter, read_jsonl

STEPS, EVERY, KILL_AT = 8, 3, 6


def test_path_helpers_on_disk_and_in_the_bucket(gcs, tmp_path):
    assert is_remote("gs://test-bucket/x") and not is_remote(str(tmp_path))
    assert resolve("gs://test-bucket/run/") == "gs://test-bucket/run"
    assert resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    for root in (str(tmp_path), "gs://test-bucket/paths"):
        for name in ("a/web-0.parquet", "a/b/web-1.parquet", "a/b/c/code-0.jsonl", "web-2.txt"):
            write_text(join(root, name), name)
        assert as_path(join(root, "a/b/web-1.parquet")).read_text() == "a/b/web-1.parquet"
        rel = lambda paths: [p[len(root) + 1 :] for p in paths]  # noqa: E731
        assert rel(glob_files(join(root, "a/**/*.parquet"))) == [
            "a/b/web-1.parquet",
            "a/web-0.parquet",
        ]
        assert rel(glob_files(join(root, "a/*/*"))) == ["a/b/web-1.parquet"]
        assert rel(glob_files(join(root, "**/code-?.jsonl"))) == ["a/b/c/code-0.jsonl"]
        assert rel(glob_files(join(root, "web-2.txt"))) == ["web-2.txt"]


def test_bucket_listings_see_what_other_processes_wrote(gcs):
    """gcsfs caches listings by default; another host's (or a rerun's) checkpoint would stay
    invisible to this process. moejax.paths turns that cache off."""
    run = epath.Path("gs://test-bucket/listing")
    write_text(join(str(run), "3", "commit_success.txt"), "")
    assert [p.name for p in run.iterdir()] == ["3"]
    other = "from moejax.paths import join, write_text; write_text(join(%r, '6', 'x'), '')"
    subprocess.run([sys.executable, "-c", other % str(run)], cwd=REPO, check=True, timeout=300)
    assert sorted(p.name for p in run.iterdir()) == ["3", "6"]
    assert (run / "6" / "x").exists()


def test_jsonl_metrics_in_a_bucket_append_across_writers(gcs):
    path = "gs://test-bucket/metrics/metrics.jsonl"
    writer = JsonlWriter(path, upload_every_secs=3600)
    writer.write(1, {"loss": 2.5})
    assert not epath.Path(path).exists()  # buffered until a flush (the trainer's checkpoints)
    writer.flush()
    writer.write(2, {"loss": np.float32(2.25)})
    writer.close()
    resumed = JsonlWriter(path)  # a resumed run keeps the earlier lines
    resumed.write(3, {"loss": float("nan")})
    resumed.close()
    rows = read_jsonl(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.25), (3, None)]


def test_unwritable_bucket_workdir_names_the_url_and_the_fix(gcs):
    with pytest.raises(WorkdirError, match=r"gs://no-such-bucket/run.*gcloud storage ls"):
        check_workdir("gs://no-such-bucket/run")


def _run(config, workdir, env, extra_env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moejax.train", *cli_flags(config), f"--workdir={workdir}"],
        cwd=REPO,
        env={**os.environ, **env, "JAX_PLATFORMS": "cpu", **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(join(workdir, "metrics.jsonl"))}


@pytest.fixture(scope="module")
def bucket_run(gcs, tiny_corpus_dir, tmp_path_factory):
    """The reference run on local disk, and the bucket run: killed while saving step 6, then
    rerun with the same command."""
    from testing_utils import make_tiny_config

    config = make_tiny_config(
        tiny_corpus_dir,
        **{
            "train.steps": STEPS,
            "train.checkpoint_every": EVERY,
            "train.async_checkpoint": True,
            "model.num_layers": 1,
        },
    )
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    env = {
        **gcs,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    workdir = "gs://test-bucket/run"
    killed = _run(config, workdir, env, {"MOEJAX_FAULT_KILL_IN_SAVE": str(KILL_AT)})
    names = sorted(p.name for p in epath.Path(workdir, "checkpoints").iterdir())
    rerun = _run(config, workdir, env)
    reference = str(tmp_path_factory.mktemp("reference"))
    train(config, reference)
    return config, workdir, reference, killed, names, rerun


def test_bucket_run_killed_in_a_save_resumes_bit_identically(bucket_run):
    config, workdir, reference, killed, names, rerun = bucket_run
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Orbax writes a bucket step in place and marks it complete last; the kill may come
    # before any object of step 6 exists. Either way step 6 is not a checkpoint.
    assert names in (["3"], ["3", "6"])
    assert "resuming from step 3" in rerun.stdout
    if names == ["3", "6"]:
        assert "checkpoint step(s) [6] were not completely written" in rerun.stdout
    want = _losses(reference)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert _losses(workdir) == want  # the last logged loss of each step, bit for bit
    saved = json.loads(epath.Path(workdir, "config.json").read_text())
    assert saved["train"]["steps"] == STEPS
    ckpt = Checkpointer(workdir, async_save=False)
    assert ckpt.all_steps() == [3, 6, 8] and ckpt.interrupted_steps() == []
    ckpt.close()
    assert glob_files(f"{workdir}/tensorboard/events.out.tfevents.*")


def test_interrupted_and_corrupt_bucket_checkpoints(bucket_run):
    """A step without orbax's commit file (what a save cut short leaves in a bucket) is
    reported and skipped; a damaged complete step is refused naming its gs:// path and the
    `gcloud storage mv` that sets it aside, and after that move the run resumes before it."""
    config, workdir, *_ = bucket_run
    s = validate(config, num_devices=1, num_processes=1)
    exp = build_experiment(s, make_mesh(s.mesh))
    (epath.Path(workdir) / "checkpoints" / "8" / "commit_success.txt").unlink()
    ckpt = Checkpointer(workdir, async_save=False)
    assert (ckpt.all_steps(), ckpt.interrupted_steps()) == ([3, 6], [8])
    CHECKPOINT_CORRUPTIONS["deleted manifest"](f"{workdir}/checkpoints/6")
    notes = []
    with pytest.raises(CorruptCheckpointError) as err:
        ckpt.restore_or_init(lambda: None, exp.abstract_state, log=notes.append)
    assert notes == [
        f"checkpoint step(s) [8] were not completely written (the run stopped during the "
        f"save): ignoring their temporary files in {workdir}/checkpoints, resuming from step 6."
    ]
    message = str(err.value)
    assert f"Checkpoint step 6 ({workdir}/checkpoints/6) is unreadable" in message
    move = re.search(r"`gcloud storage mv (\S+) (\S+)`", message)
    assert move.groups() == (f"{workdir}/checkpoints/6", f"{workdir}/corrupt-checkpoint-6")
    epath.Path(move.group(1)).rename(move.group(2))  # what the command does
    ckpt.close()
    rerun = Checkpointer(workdir, async_save=False)  # the rerun: a new process
    _, _, step = rerun.restore_or_init(lambda: None, exp.abstract_state)
    assert step == 3
    rerun.close()
