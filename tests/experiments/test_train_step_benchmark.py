"""`experiments/benchmarks/train_step.py` times the trainer's step on the tiny config and
reports numbers that agree with each other and with moejax's own counts; the one-GPU config
it defaults to there builds (abstractly) at 1-2B parameters."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import load_config_module, load_experiment

from moejax.config.validation import validate
from moejax.models.flops import count_params, train_flops_per_token
from moejax.models.transformer import Transformer

# The docstring's test command (tests/test_readme_commands.py COVERED_BY): capacity factor
# E / k = 4 gives every expert room for every token, so capacity_einsum drops nothing and
# computes what the dropless plans do; `bogus` is a dispatcher that does not exist; remat
# "none" is the config's own policy, so no extra remat case (plan_cases is tested below).
ARGV = (
    "--json --batch 2 --seq-len 32 --warmup 1 --steps 2 --set moe.capacity_factor=4 "
    "--dispatchers ragged,capacity_einsum,bogus --remat none"
).split()


@pytest.fixture(scope="module")
def bench():
    return load_experiment("benchmarks/train_step")


@pytest.fixture(scope="module")
def report(bench):
    return bench.main(ARGV)


def test_train_step_benchmark_reports_consistent_numbers(report, capsys):
    res = report["results"]
    assert list(res) == ["dense", "ragged", "capacity_einsum", "bogus"]
    assert report["baseline"] == "dense" and report["tokens_per_step"] == 2 * 32
    c = load_config_module("deepseekmoe").get_config()
    c.data.update(global_batch_size=2, seq_len=32)
    s = validate(c, num_devices=1, num_processes=1)
    assert report["flops_per_token"] == train_flops_per_token(s.model, s.moe, 32)
    assert report["params_total"] == count_params(s.model, s.moe).total
    assert report["peak_tflops"] > 0 and "measured" in report["peak_source"]
    assert report["attention_kernel"] == "xla" and report["cuda"] is None  # CPU
    assert {"jax", "jaxlib", "python", "environment_info", "device_kind", "wall_s"} <= set(report)
    for name, r in res.items():
        if name == "bogus":
            continue
        assert 0 < r["ms_min"] <= r["ms"] and r["steps"] == 2 and r["compile_s"] > 0
        # Closed forms from the report's own fields.
        assert math.isclose(r["tokens_per_s"], 64 / (r["ms"] / 1e3), rel_tol=1e-4)
        flops = r["flops_per_token"] * r["tokens_per_s"] / report["num_devices"] / 1e12
        assert math.isclose(r["model_tflops_per_s"], flops, rel_tol=1e-4)
        assert math.isclose(r["mfu"], r["model_tflops_per_s"] / report["peak_tflops"], rel_tol=1e-4)
        mem = r["memory"]
        assert mem["argument_bytes"] > 0 and mem["alias_bytes"] > 0  # the donated state
        assert mem["process_peak_bytes_after"] is None  # CPU keeps no allocator stats
        if name != "dense":
            assert r["ratio_to_dense"] == pytest.approx(r["ms"] / res["dense"]["ms"], rel=1e-3)
            assert r["flops_per_token"] == report["flops_per_token"]
    # At init every dispatcher computes the same loss (up to float error: nothing dropped),
    # and the dense model's cross-entropy over random tokens is about ln(vocab).
    moe = [res[n]["loss_first"] for n in ("ragged", "capacity_einsum")]
    assert max(moe) - min(moe) < 1e-3, moe
    assert res["capacity_einsum"]["dropped_fraction"] == 0.0
    assert abs(res["dense"]["loss_first"] - math.log(s.model.vocab_size)) < 0.5
    assert res["dense"]["flops_per_token"] == pytest.approx(report["flops_per_token"], rel=0.05)
    # A failing case is recorded and the others still ran.
    assert res["bogus"]["error"].startswith("ConfigError: moe.dispatcher='bogus'")
    assert report["skipped"] == {}  # --dispatchers named only what runs on CPU


def test_cases_and_skips_per_platform(bench):
    c = load_config_module("deepseekmoe").get_config()  # remat "none"
    cases, skipped = bench.plan_cases(c, bench.parse_args([]), "cpu", 1)
    # hybrid, the plan auto runs on CPU, comes last: the same program as auto.
    assert list(cases) == [
        "dense",
        "auto",
        "auto/remat=full",
        "capacity_einsum",
        "ragged",
        "hybrid",
    ]
    assert cases["dense"]["model.d_ff"] == 4 * 128 + 128
    assert "interpret" in skipped["pallas"] and "dense_reference" in skipped
    assert skipped["expert_parallel"] == skipped["fssdp"] == "one device: no expert axis to split"
    cases, skipped = bench.plan_cases(c, bench.parse_args([]), "gpu", 1)
    assert list(cases)[:3] == ["dense", "auto", "auto/remat=full"] and "hybrid" in skipped
    assert {"pallas", "capacity_einsum", "ragged"} <= set(cases)
    assert list(cases)[-1] == bench.AUTO_PLAN["gpu"][0]  # the plan auto runs there
    cases, skipped = bench.plan_cases(c, bench.parse_args(["--skip", "ragged"]), "gpu", 8)
    assert cases["expert_parallel"]["mesh.expert"] == 8 and "fssdp" in cases
    assert skipped["ragged"] == "--skip" and "ragged" not in cases
    cases, _ = bench.plan_cases(c, bench.parse_args(["--remat", "dots,full"]), "cpu", 1)
    assert [n for n in cases if "remat" in n] == ["auto/remat=dots", "auto/remat=full"]
    args = bench.parse_args(["--dispatchers", "auto+fused,ragged+bad", "--remat", "none"])
    cases, skipped = bench.plan_cases(c, args, "cpu", 1)
    assert cases["auto+fused"] == {"moe.dispatcher": "auto", "moe.fuse_gate_up": True}
    assert "unknown variant +bad" in skipped["ragged+bad"] and "ragged+bad" not in cases


def test_gpu_size_builds_at_one_to_two_billion_parameters():
    s = validate(
        load_config_module("deepseekmoe").get_config("size=gpu"), num_devices=1, num_processes=1
    )
    assert (s.model.dtype, s.data.seq_len, s.model.num_moe_layers) == ("bfloat16", 4096, 15)
    model = Transformer(s.model, s.moe)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.int32))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract["params"])))
    counts = count_params(s.model, s.moe)
    assert n == counts.total and 1e9 < n < 2e9
    assert s.model.d_ff == (s.moe.top_k + s.moe.n_shared) * s.moe.d_expert
