"""experiments/sweep.py: the plan (grids, zips, seeds, --only, overrides), the device split,
running N at a time with a failing run recorded and the rest going on, skipping finished
runs and resuming the others, and the tables (mean ± std over seeds, against closed form).
The runs here are small Python scripts standing in for the trainer; one slow test trains."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from testing_utils import REPO

spec = importlib.util.spec_from_file_location("sweep_runner", REPO / "experiments" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep_runner"] = sweep  # dataclasses look their module up
spec.loader.exec_module(sweep)

GSHARD = str(REPO / "configs" / "gshard.py")

# A stand-in trainer: `fake.py WORKDIR SEED MODE [OTHER]` writes metrics.jsonl (eval/loss at
# steps 10 and 20, from the seed) and exits 0; MODE fail exits 3 after a message; MODE meet
# writes WORKDIR/started and waits (at most 60 s) for OTHER/started: only runs that overlap
# in time both finish.
FAKE = textwrap.dedent(
    """
    import json, os, sys, time
    workdir, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "calls"), "a") as f:
        f.write("x")
    if mode == "fail":
        print("moejax: error: ConfigError: something is wrong")
        sys.exit(3)
    if mode == "meet":
        open(os.path.join(workdir, "started"), "w").close()
        other = os.path.join(sys.argv[4], "started")
        deadline = time.time() + 60
        while not os.path.exists(other):
            if time.time() > deadline:
                sys.exit(9)
            time.sleep(0.05)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        for step, loss in ((10, 5.0 + seed), (20, 4.0 + seed / 2)):
            record = {"step": step, "eval/loss": loss, "train/moe/load_cv": [0.2, 0.4]}
            f.write(json.dumps(record) + "\\n")
    """
)


def fake_commands(tmp_path, runs, modes):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    return [
        [sys.executable, str(script), run.workdir, str(run.seed), *modes.get(run.name, ["ok"])]
        for run in runs
    ]


def test_plan_grid_zip_seeds_only_and_overrides(tmp_path):
    runs = sweep.plan(
        GSHARD,
        "capacity",
        str(tmp_path),
        seeds=[0, 1],
        overrides={"train.steps": "7"},
        grid_items=["moe.top_k=1,2"],
        only="capacity=1.*,dropless*",
    )
    names = sorted({r.variant for r in runs})
    assert names == [
        "capacity=1.0,top_k=1",
        "capacity=1.0,top_k=2",
        "capacity=1.25,top_k=1",
        "capacity=1.25,top_k=2",
        "dropless,top_k=1",
        "dropless,top_k=2",
    ]
    assert len(runs) == 12
    run = next(r for r in runs if r.variant == "capacity=1.25,top_k=2" and r.seed == 1)
    assert run.config.train.steps == 7 and run.config.moe.top_k == 2
    assert run.config.moe.capacity_factor == 1.25
    assert (run.config.train.seed, run.config.data.seed) == (1, 1)
    assert run.workdir == os.path.join(str(tmp_path), "capacity=1.25,top_k=2", "seed1")
    zipped = sweep.plan(
        GSHARD, None, str(tmp_path), zip_items=["moe.num_experts=4,8", "moe.top_k=1,2"]
    )
    assert [r.variant for r in zipped] == ["num_experts=4,top_k=1", "num_experts=8,top_k=2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(overrides={"moe.topk": "3"}), "did you mean moe.top_k"),
        (dict(only="nothing*"), "matches none of the variants"),
        (dict(grid_items=["moe.capacity_factor=1,2"]), "set by sweep variant"),
        (dict(zip_items=["moe.top_k=1,2", "moe.num_experts=8"]), "different lengths"),
    ],
)
def test_plan_errors_are_one_line_naming_the_fix(tmp_path, kwargs, message):
    with pytest.raises(sweep.SweepError, match=message) as e:
        sweep.plan(GSHARD, "capacity", str(tmp_path), **kwargs)
    assert "\n" not in str(e.value)


def test_seeds_argument():
    assert sweep.seeds_of("3") == [0, 1, 2] and sweep.seeds_of("0,5") == [0, 5]
    with pytest.raises(sweep.SweepError):
        sweep.seeds_of("0,0")


def test_devices_are_split_between_parallel_runs():
    gpu = sweep.device_slots("gpu", ["0", "1", "2", "3"], 2)
    assert [s.env for s in gpu] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert [s.num_devices for s in gpu] == [2, 2]
    tpu = sweep.device_slots("tpu", [str(i) for i in range(4)], 4)
    assert [s.env["TPU_VISIBLE_CHIPS"] for s in tpu] == ["0", "1", "2", "3"]
    assert {s.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] for s in tpu} == {"1,1,1"}
    assert len({s.env["TPU_MESH_CONTROLLER_PORT"] for s in tpu}) == 4
    assert (
        sweep.device_slots("tpu", [str(i) for i in range(8)], 2)[1].env[
            "TPU_CHIPS_PER_PROCESS_BOUNDS"
        ]
        == "2,2,1"
    )
    with pytest.raises(sweep.SweepError, match="runs of"):
        sweep.device_slots("tpu", [str(i) for i in range(6)], 2)
    with pytest.raises(sweep.SweepError, match="lower --parallel"):
        sweep.device_slots("gpu", ["0"], 2)
    cpu = sweep.device_slots("cpu", ["0", "1", "2", "3"], 2)
    assert [s.cpus for s in cpu] == [frozenset({0, 1}), frozenset({2, 3})]
    assert sweep.device_slots("cpu", ["0"], 2)[0].cpus is None  # too few cores: shared
    assert sweep.device_slots("gpu", ["0", "1"], 1)[0].env == {}


def test_cpu_runs_see_the_simulated_devices_of_xla_flags(tmp_path):
    """A CPU sweep validates each run against the host devices XLA_FLAGS simulates (the runs
    inherit it), so `sweep_straggler`'s mesh.expert=8 plans with 8 and is refused with 1."""
    assert sweep.simulated_cpu_devices("") == 1
    flags = "--xla_cpu_x=1 --xla_force_host_platform_device_count=8"
    assert sweep.simulated_cpu_devices(flags) == 8
    runs = sweep.plan(str(REPO / "configs" / "deepseekmoe.py"), "straggler", str(tmp_path))
    sweep.check_runs(runs, sweep.simulated_cpu_devices(flags))
    with pytest.raises(sweep.SweepError, match="do not validate"):
        sweep.check_runs(runs, 1)


def test_runs_in_parallel_record_failures_and_resume(tmp_path):
    runs = sweep.plan(GSHARD, "capacity", str(tmp_path), seeds=[0, 1], only="capacity=2.0,dropless")
    a, b = runs[0].workdir, runs[1].workdir  # capacity=2.0 seeds 0 and 1 must overlap
    modes = {runs[0].name: ["meet", b], runs[1].name: ["meet", a], runs[2].name: ["fail"]}
    commands = fake_commands(tmp_path, runs, modes)
    slots = sweep.device_slots("cpu", ["0", "1"], 2)
    lines = []
    outcome = sweep.run_all(runs, commands, slots, log=lines.append, poll=0.05)
    assert outcome == {
        runs[0].name: "done",
        runs[1].name: "done",
        runs[2].name: "failed",
        runs[3].name: "done",
    }
    failed = sweep.read_status(runs[2])
    assert failed["returncode"] == 3 and "something is wrong" in failed["error"]
    # Again: the finished runs are skipped, the failed one is retried (now succeeding), and
    # one whose status says nothing finished (the sweep was killed) runs again.
    commands[2] = commands[2][:-1] + ["ok"]
    os.remove(os.path.join(runs[3].workdir, "sweep_status.json"))
    lines.clear()
    outcome = sweep.run_all(runs, commands, slots, log=lines.append, poll=0.05)
    assert outcome[runs[0].name] == "skipped" and outcome[runs[1].name] == "skipped"
    assert outcome[runs[2].name] == "done" and outcome[runs[3].name] == "done"
    calls = [open(os.path.join(r.workdir, "calls")).read() for r in runs]
    assert calls == ["x", "x", "xx", "xx"]
    assert any("retrying" in line for line in lines)


def test_a_run_with_checkpoints_is_resumed(tmp_path):
    runs = sweep.plan(GSHARD, "capacity", str(tmp_path), only="dropless")
    os.makedirs(os.path.join(runs[0].workdir, "checkpoints"))
    lines = []
    sweep.run_all(
        runs,
        fake_commands(tmp_path, runs, {}),
        sweep.device_slots("cpu", ["0"], 1),
        log=lines.append,
        poll=0.05,
    )
    assert any(line.startswith("[1/1] resuming dropless/seed0") for line in lines)


def test_tables_hold_mean_and_std_over_seeds(tmp_path):
    runs = sweep.plan(
        GSHARD, "capacity", str(tmp_path), seeds=[0, 1, 2], only="capacity=1.0,dropless"
    )
    modes = {runs[5].name: ["fail"]}
    commands = fake_commands(tmp_path, runs, modes)
    sweep.run_all(
        runs, commands, sweep.device_slots("cpu", ["0"], 1), log=lambda s: None, poll=0.05
    )
    # A resumed run logged step 20 twice: the later record is the one kept.
    with open(os.path.join(runs[0].workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 20, "eval/loss": 3.0}) + "\n")
    text = sweep.write_results(
        str(tmp_path),
        runs,
        commands,
        ["eval/loss", "train/moe/load_cv", "not/logged"],
        baseline="dropless",
    )
    finals = [3.0, 4.5, 5.0]  # seed 0's rewritten step 20, then 4 + s / 2
    mean, std = np.mean(finals), np.std(finals, ddof=1)
    assert f"| capacity=1.0 | 3/3 | {mean:.4f} ± {std:.4f} | {mean:.4f} ± {std:.4f} |" in text
    dropless_final = [4.0, 4.5]  # seed 2 failed
    m2, s2 = np.mean(dropless_final), np.std(dropless_final, ddof=1)
    assert f"| dropless | 2/3 (1 failed) | {m2:.4f} ± {s2:.4f}" in text
    assert "0.3000 ± 0.0000" in text  # per-layer [0.2, 0.4] averaged
    assert "dropless/seed2: moejax: error: ConfigError: something is wrong" in text
    # Paired by seed against dropless (seeds 0 and 1: its seed 2 failed): 3.0 - 4.0, 4.5 - 4.5.
    d = [-1.0, 0.0]
    assert f"| capacity=1.0 | 2 | {np.mean(d):+.4f} ± {np.std(d, ddof=1):.4f} |" in text
    assert text.splitlines()[-5].endswith("| - |")  # a metric never logged: no difference
    with pytest.raises(sweep.SweepError, match="no finished run"):
        sweep.paired_table(sweep.summarize(runs, ["eval/loss"]), ["eval/loss"], "nope")
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done"] * 5 + ["failed"]
    assert float(rows[1]["best:eval/loss"]) == 4.5 and rows[5]["final:eval/loss"] == ""
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    first = [
        (c["step"], c["value"])
        for c in curves
        if c["variant"] == "capacity=1.0" and c["seed"] == "0" and c["metric"] == "eval/loss"
    ]
    assert first == [("10", "5.0"), ("20", "3.0")]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_dry_run_of_a_pod_config_prints_the_commands(tmp_path):
    out = run_cli(
        "--config=configs/gshard.py:size=pod",
        "--sweep=capacity",
        f"--workdir={tmp_path}",
        "--dry-run",
        "--seeds=2",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 8 and all(
        ln.startswith("python -m moejax.train --config=") for ln in lines
    )
    assert "--config.moe.capacity_factor=1.25 --config.train.seed=1" in out.stdout
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_cli_help_and_a_misspelled_override(tmp_path):
    out = run_cli("--help")
    assert out.returncode == 0 and "--parallel" in out.stdout and "--dry_run" in out.stdout
    out = run_cli(
        "--config=configs/gshard.py",
        "--sweep=capacity",
        f"--workdir={tmp_path}",
        "--config.moe.topk=3",
        "--dry_run",
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("sweep: error: override 'moe.topk'")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_real_sweep_trains_and_tabulates(tmp_path, tiny_corpus_dir):
    out = run_cli(
        "--config=configs/gshard.py",
        "--sweep=capacity",
        f"--workdir={tmp_path}",
        "--only=capacity=1.0,dropless",
        "--parallel=2",
        "--metrics=eval/loss,train/moe/dropped_fraction",
        f"--config.data.data_dir={tiny_corpus_dir}",
        "--config.data.max_bytes_per_domain=200000",
        "--config.model.d_model=32",
        "--config.model.num_layers=2",
        "--config.data.seq_len=32",
        "--config.data.global_batch_size=4",
        "--config.train.steps=2",
        "--config.train.eval_every=2",
        "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=2",
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert float(rows[1]["final:train/moe/dropped_fraction"]) == 0.0  # dropless
    again = run_cli(*out.args[3:], timeout=600)
    assert "2 run(s) already done, skipped" in again.stdout


def test_a_remote_workdir_logs_on_this_machine(tmp_path):
    runs = sweep.plan(GSHARD, "capacity", "gs://bucket/sweep", only="dropless")
    assert runs[0].workdir == "gs://bucket/sweep/dropless/seed0"
    assert sweep.log_path(runs[0]) == os.path.join(
        "sweep_logs", "bucket/sweep/dropless/seed0", "train.log"
    )
    local = sweep.plan(GSHARD, "capacity", str(tmp_path), only="dropless")[0]
    assert sweep.log_path(local) == os.path.join(local.workdir, "train.log")
