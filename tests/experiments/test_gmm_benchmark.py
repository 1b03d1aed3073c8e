"""`experiments/benchmarks/gmm.py` runs end to end at a tiny scale and reports sane JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "benchmarks" / "gmm.py"


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [
        "--json",
        "--scale",
        "64",
        "--repeats",
        "1",
        "--groups",
        "skewed",
        "--skip",
        "megablox,tokamax",
        "--interpret-max-gflop",
        "0.2",
    ]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_case_is_timed_against_dense_and_ragged_dot(report):
    assert {"device", "jax", "shapes", "results", "skipped"} <= set(report)
    ds = report["shapes"]["deepseek"]
    assert (ds["k"], ds["n"], ds["g"], ds["top_k"]) == (512, 352, 64, 6)
    assert ds["m"] == ds["tokens"] * 6
    for name in ("deepseek", "mixtral"):
        for op in ("gmm", "tgmm"):
            entries = report["results"][name]["skewed"][op]
            assert {"dense", "ragged_dot", "tile_loop"} <= set(entries)
            dense = entries["dense"]
            for impl, e in entries.items():
                assert math.isfinite(e["ms"]) and 0 < e["ms_min"] <= e["ms"]
                assert e["ratio_to_dense"] == pytest.approx(e["ms"] / dense["ms"], rel=0.02)
                if impl != "dense":
                    assert e["max_rel_err"] < 1e-5  # float32: every impl agrees with ragged_dot
    # On CPU the Pallas kernel runs in interpret mode, named so, on the small shape only.
    assert "pallas_interpret" in report["results"]["deepseek"]["skewed"]["gmm"]
    assert any(k.startswith("gmm/pallas_interpret@") for k in report["skipped"])
    assert report["skipped"]["gmm/megablox_interpret"] == "--skip"
