"""Both notebooks of experiments/notebooks run top to bottom (nbclient) on a tiny run made
here: routing_analysis.ipynb on traces of its two checkpoints, compare_runs.ipynb on a sweep
directory whose runs hold that run's curves; every code cell runs without an error and the
plotting cells draw."""

import importlib.util
import json
import os
import shutil
import sys

import nbformat
from testing_utils import REPO

from moejax.analysis import trace

NOTEBOOKS = REPO / "experiments" / "notebooks"

spec = importlib.util.spec_from_file_location("notebook_runner", NOTEBOOKS / "execute.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
spec = importlib.util.spec_from_file_location("sweep_runner", REPO / "experiments" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep_runner"] = sweep
spec.loader.exec_module(sweep)


def execute(name: str) -> nbformat.NotebookNode:
    """The notebook as in the repository, run from scratch (its saved outputs cleared)."""
    return runner.execute(str(NOTEBOOKS / name), timeout=600)


def outputs(nb, kind):
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == kind or kind in o.get("data", {})
    ]


def test_routing_analysis_notebook_runs_on_a_tiny_run(tiny_moe_run, tmp_path, monkeypatch):
    path = tmp_path / "tiny.parquet"
    trace.write_trace(tiny_moe_run, path, tokens=300, steps=[2, 4], log=lambda s: None)
    # Two "seeds" of one group (the same trace twice): plotted once, averaged in the summary.
    monkeypatch.setenv("MOEJAX_TRACES", f"tiny/seed0={path},tiny/seed1={path}")
    nb = execute("routing_analysis.ipynb")
    assert not outputs(nb, "error")
    assert len(outputs(nb, "image/png")) >= 9  # every plotting section draws
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    per_trace, summary = (o["data"]["text/plain"] for o in nb.cells[-1].outputs)
    assert "tiny/seed1" in per_trace and "± 0.0000" in summary
    html = "".join(o["data"]["text/html"] for o in outputs(nb, "text/html"))
    assert 'title="expert ' in html  # the coloured text sample


def test_compare_runs_notebook_runs_on_a_sweep(tiny_moe_run, tmp_path, monkeypatch):
    runs = sweep.plan(
        str(REPO / "configs" / "gshard.py"),
        "capacity",
        str(tmp_path),
        seeds=[0, 1],
        only="capacity=1.0,dropless",
    )
    records = [json.loads(line) for line in open(os.path.join(tiny_moe_run, "metrics.jsonl"))]
    for i, run in enumerate(runs):  # the tiny run's curves, shifted per run: a seed spread
        os.makedirs(run.workdir)
        with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
            for r in records:
                shifted = {
                    k: v + 0.01 * i if k in ("train/loss", "eval/loss") else v for k, v in r.items()
                }
                f.write(json.dumps(shifted) + "\n")
        sweep._write_status(run, {"status": "done" if i != 3 else "failed", "error": "boom"})
    shutil.copy(os.path.join(tiny_moe_run, "config.json"), tmp_path / "config.json")
    commands = [sweep.train_command(r, "configs/gshard.py") for r in runs]
    sweep.write_results(str(tmp_path), runs, commands, ["eval/loss", "train/loss"])
    monkeypatch.setenv("MOEJAX_SWEEPS", str(tmp_path))
    nb = execute("compare_runs.ipynb")
    assert not outputs(nb, "error")
    assert len(outputs(nb, "image/png")) >= 3
    text = "".join(
        o["data"].get("text/plain", "") for o in outputs(nb, "execute_result")
    ) + "".join(o["data"].get("text/plain", "") for o in outputs(nb, "display_data"))
    assert "boom" in text  # the failed run is listed
