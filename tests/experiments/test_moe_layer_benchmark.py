"""`experiments/benchmarks/moe_layer.py` runs end to end at a tiny shape and reports sane JSON."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax.moe.dispatch import DISPATCHERS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "benchmarks" / "moe_layer.py"
TINY = [
    "--tokens",
    "256",
    "--batch",
    "2",
    "--d-model",
    "32",
    "--experts",
    "8",
    "--d-expert",
    "16",
    "--top-k",
    "2",
    "--shared",
    "1",
    "--gmm-tile",
    "16",
    "--repeats",
    "1",
]
HF_INSTALLED = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


@pytest.fixture(scope="module")
def run():
    """One run of the CLI: every dispatcher, a `+fused` variant, the breakdown and a profile
    request (the HF peer is tested apart)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cases = ",".join([*DISPATCHERS, "pallas+fused"])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", *TINY, "--skip", "hf"]
        + ["--dispatchers", cases, "--profile", "dense_mlp"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr  # the whole stdout is one JSON object


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_layer_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def assert_timing(entry):
    for key in ("ms", "ms_min"):
        assert math.isfinite(entry[key]) and entry[key] > 0, entry
    assert entry["ms_min"] <= entry["ms"]


def test_every_dispatcher_is_timed_against_the_fastest_dense_swiglu(run):
    report, stderr = run
    assert {"device", "jax", "shape", "results", "routing", "hf", "baseline"} <= set(report)
    assert report["shape"]["tokens"] == 256 and report["shape"]["dense_width"] == 48
    results = report["results"]
    baselines = ("dense_mlp", "dense_swiglu_2d", "dense_swiglu_2d_fused")
    assert set(DISPATCHERS) | set(baselines) <= set(results)
    dense = results[report["baseline"]]
    assert dense["ms"] == min(results[n]["ms"] for n in baselines)
    assert_timing(dense)
    for name in DISPATCHERS:
        entry = results[name]
        assert_timing(entry)
        assert entry["ratio_to_dense"] == pytest.approx(entry["ms"] / dense["ms"], rel=1e-3)
        assert entry["ratio_to_dense_paired"] > 0 and entry["compile_s"] > 0
        if name != "capacity_einsum":
            assert entry["dropped_fraction"] == 0.0
        if name != "dense_reference":
            assert 0 < entry["fwd_ms"]
    assert results["ragged"]["experts_ms"] > 0 and results["ragged"]["gmm_impl"]
    # the pallas plan's own grouped matmuls are timed alone, fused apart from unfused
    assert results["pallas"]["gmm_impl"] == "pallas" and results["pallas"]["experts_ms"] > 0
    fused = results["pallas+fused"]
    assert_timing(fused)
    assert fused["experts_ms"] > 0 and fused["dropped_fraction"] == 0.0
    assert "experts/pallas+fused" in stderr and "experts/pallas:" in stderr
    # CPU: the profile request is answered with why there is nothing to trace
    assert report["profile"] == {
        "dense_mlp": {"available": False, "reason": "no device plane (CPU run)"}
    }
    for name in ("hybrid", "auto"):  # auto is the hybrid plan on CPU
        entry = results[name]
        assert 0.0 <= entry["overflow_fraction"] <= 1.0
        # the floor: its batched matmuls alone on full buffers, plus the shared experts alone
        assert entry["experts_ms"] > 0 and entry["shared_ms"] > 0
        assert entry["floor_ms"] == pytest.approx(entry["experts_ms"] + entry["shared_ms"])
        floor = entry["floor_ms"] / dense["ms"]
        assert entry["floor_ratio_to_dense"] == pytest.approx(floor, rel=1e-3)
    assert "experts/batched:" in stderr and "shared_experts:" in stderr
    assert results["ragged"]["floor_ms"] > results["ragged"]["experts_ms"]
    routing = report["routing"]
    assert 1.0 <= routing["max_over_mean"] < 8.0 and 0.0 <= routing["min_over_mean"] <= 1.0
    assert "repeat 1/1" in stderr  # progress goes to stderr, not into the JSON


def test_report_ratios_including_the_hf_peer(bench):
    """`assemble` on made-up timings: every ratio is the quotient of the reported times."""
    e = 8
    shape = bench.Shape(tokens=64, batch=1, experts=e, top_k=2, shared=1)
    metrics = {"dropped_fraction": np.float32(0.0), "load": np.full((e,), 1.0 / e)}
    times = {
        "dense_mlp": [2.0, 4.0, 3.0],
        "dense_swiglu_2d": [5.0, 6.0, 7.0],  # slower: not the baseline
        "auto": [4.0, 5.0, 3.0],
        "auto/fwd": [1.0] * 3,
        "experts/batched": [2.0, 2.5, 1.5],  # auto is the hybrid plan on CPU
        "shared_experts": [0.5, 1.0, 1.5],
        "hf_deepseek_v3_moe": [8.0, 9.0, 10.0],
        "torch_dense_mlp": [2.0, 3.0, 4.0],
    }
    report = bench.assemble(
        shape,
        times,
        {"dense_mlp": 1.0, "auto": 2.0},
        {"hf_deepseek_v3_moe": 0.5},
        {"auto": metrics},
        {"available": True},
        3,
    )
    res = report["results"]
    assert report["baseline"] == "dense_mlp"
    assert res["auto"]["ms"] == 4.0 and res["auto"]["ms_min"] == 3.0
    assert res["auto"]["vs_hf"] == pytest.approx(4.0 / 9.0, rel=1e-3)
    assert res["auto"]["ratio_to_dense"] == pytest.approx(4.0 / 3.0, rel=1e-3)
    assert res["auto"]["ratio_to_dense_min"] == 1.5
    assert res["auto"]["ratio_to_dense_paired"] == 1.25
    assert res["auto"]["fwd_ms"] == 1.0 and res["auto"]["experts_ms"] == 2.0
    assert res["auto"]["experts_share"] == 0.5  # of the layer's 4.0
    assert res["auto"]["floor_ms"] == 3.0 and res["auto"]["floor_ratio_to_dense"] == 1.0
    assert res["hf_deepseek_v3_moe"]["ratio_to_own_dense"] == 3.0
    assert report["auto_vs_hf"] == pytest.approx(4.0 / 9.0, rel=1e-3)
    assert report["auto_vs_hf_min"] == 0.375 and report["auto_vs_hf_paired"] == 0.5
    assert report["routing"]["max_over_mean"] == 1.0


@pytest.mark.skipif(not HF_INSTALLED, reason="needs the hf extra (torch, transformers)")
def test_hf_peer_steps_run(bench):
    from experiments.benchmarks import hf_peer  # noqa: F401  (the path moe_layer uses)

    shape = bench.Shape(tokens=64, batch=2, d_model=16, experts=4, d_expert=8, top_k=2, shared=1)
    steps, info = hf_peer.build_steps(shape, threads=1)
    assert set(steps) == {"hf_deepseek_v3_moe", "torch_dense_mlp"}
    for step in steps.values():
        step()
    assert info["expert_load"]["max_over_mean"] >= 1.0 and info["torch"]


def test_hf_peer_is_optional(bench):
    module, reason = bench.load_hf_peer()
    assert (module is not None) == HF_INSTALLED
    assert HF_INSTALLED or "No module named" in reason


def test_dense_reference_is_skipped_past_its_budget(bench):
    shape = bench.Shape()  # 64 experts, top-6 + 2 shared: 8.25x the dense MLP's FLOPs
    assert bench.reference_skip_reason(shape, 1.0, 5, 57.0).startswith("predicted 58s")
    assert bench.reference_skip_reason(shape, 1.0, 5, 60.0) is None
    assert bench.reference_skip_reason(shape, 0.1, 5, 60.0) is None
    assert bench.reference_skip_reason(shape, 9.9, 5, math.inf) is None


def test_pallas_is_skipped_past_its_interpret_budget_on_cpu(bench):
    shape = bench.Shape()  # 8192 tokens x top-6 = 49152 rows
    reason = bench.pallas_skip_reason(shape, 4096)
    if bench.jax.default_backend() == "cpu":
        assert reason.startswith("interpret mode on CPU") and "49152 rows" in reason
        assert bench.pallas_skip_reason(shape, 49152) is None
    else:
        assert reason is None


def test_flags_are_validated(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--dispatchers", "ragged,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--skip", "everything"])
    assert bench.parse_args(["--skip", "hf,dense_reference,breakdown"]).skip
    with pytest.raises(ValueError, match="multiple of --batch"):
        bench.Shape(tokens=10, batch=4)
    shape = bench.Shape()
    assert shape.dense_width == (shape.top_k + shape.shared) * shape.d_expert


def test_kernel_profile_sums_device_ops_per_call():
    """`kernel_profile.summarize`: per-call totals by name, heaviest first, shares of the sum."""
    sys.path.insert(0, str(REPO))
    from experiments.benchmarks.kernel_profile import summarize

    events = [("gmm", 2.0), ("sort", 0.5), ("gmm", 2.0), ("cast", 0.25), ("sort", 0.5)] * 2
    out = summarize(events, calls=2, top=2)
    assert out["device_ms_per_call"] == 5.25 and out["ops"] == 3
    assert out["top"] == [
        {"name": "gmm", "ms_per_call": 4.0, "share": round(8 / 10.5, 4), "count": 2},
        {"name": "sort", "ms_per_call": 1.0, "share": round(2 / 10.5, 4), "count": 2},
    ]


def test_the_fused_dense_baseline_computes_the_same_swiglu(bench):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = {
        "w_gate": jax.random.normal(k[0], (16, 24)),
        "w_up": jax.random.normal(k[1], (16, 24)),
        "w_down": jax.random.normal(k[2], (24, 16)),
    }
    x = jax.random.normal(k[3], (2, 8, 16))
    plain, fused = (bench.fwd_bwd(bench.plain_dense_loss("float32", f)) for f in (False, True))
    (loss, _), grads = plain(w, x)
    (loss_f, _), grads_f = fused(w, x)
    np.testing.assert_allclose(loss_f, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
