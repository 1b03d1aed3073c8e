"""`experiments/benchmarks/router_step.py` runs end to end at a tiny shape and reports sane JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "benchmarks" / "router_step.py"


def test_router_step_benchmark_reports_ratios_to_softmax_topk():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--cases", "softmax_topk,gru", "--batch", "2",
         "--seq-len", "16", "--repeats", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    res = report["results"]
    assert set(res) == {"softmax_topk", "gru"}
    assert res["softmax_topk"]["ratio_to_softmax_topk"] == 1.0
    for r in res.values():
        assert r["experts_per_token"] == 2.0  # top-2 for both: the GRU only changes the scores
        assert 0 < r["ms_min"] <= r["ms"]
        assert abs(r["tokens_per_s"] - 2 * 16 / r["ms"] * 1e3) < 0.1
        assert r["ratio_to_softmax_topk_paired"] > 0
    assert "compiled and ran one step" in proc.stderr
