"""`experiments/benchmarks/router_step.py` runs end to end at a tiny shape and reports sane JSON,
from random init and from a checkpointed run (`--runs`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from moejax.sharding.mesh import make_mesh
from moejax.train.checkpoint import Checkpointer
from moejax.train.experiment import build_experiment

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "benchmarks" / "router_step.py"
TINY = ["--batch", "2", "--seq-len", "16", "--repeats", "2"]


def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", *TINY, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def test_router_step_benchmark_reports_ratios_to_softmax_topk():
    report, err = _run("--cases", "softmax_topk,gru")
    res = report["results"]
    assert set(res) == {"softmax_topk", "gru"}
    assert res["softmax_topk"]["ratio_to_softmax_topk"] == 1.0
    for r in res.values():
        assert r["experts_per_token"] == 2.0  # top-2 for both: the GRU only changes the scores
        assert r["restored_step"] == 0
        assert 0 < r["ms_min"] <= r["ms"]
        assert abs(r["tokens_per_s"] - 2 * 16 / r["ms"] * 1e3) < 0.1
        assert r["ratio_to_softmax_topk_paired"] > 0
    assert "compiled and ran one step" in err


@pytest.mark.slow
def test_router_step_benchmark_restores_trained_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("router_step_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = bench.make_config("top_p", 2, 16)
    exp = build_experiment(s, make_mesh(s.mesh))
    ckpt = Checkpointer(str(tmp_path / "top_p"), keep=2, save_every=1, async_save=False)
    ckpt.save(7, exp.init_fn(jax.random.PRNGKey(3)), force=True)
    ckpt.close()
    report, err = _run("--cases", "top_p", "--runs", str(tmp_path))
    assert report["results"]["top_p"]["restored_step"] == 7
    assert "restored step 7" in err
    assert os.listdir(tmp_path / "top_p" / "checkpoints") == ["7"]  # nothing pruned or added
