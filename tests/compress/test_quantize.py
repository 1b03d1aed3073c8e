"""Weight-only PTQ through qwix (`moejax.compress.quantize`) against a NumPy absmax
round-to-nearest reference, the router and every float leaf kept bit for bit, MC#'s bit
allocation (`moejax.compress.bit_allocation`) against brute force, and the `quantize` CLI on
a tiny run that reloads and evaluates."""

import itertools
import json

import numpy as np
import pytest
from compress_models import tiny_model
from testing_utils import make_tiny_config, random_run

from moejax.compress import __main__ as cli
from moejax.compress.bit_allocation import allocate_bits
from moejax.compress.quantize import (
    QuantPolicy,
    contracted_axes,
    fake_quantize,
    quantize_variables,
)
from moejax.config_section import ConfigError
from moejax.eval import evaluate
from moejax.train.checkpoint import Checkpointer
from moejax.train.run_loader import load_run


def reference(w, bits, contract):
    """Symmetric absmax round-to-nearest: scale = absmax / (2^(b-1) - 1/2) per output
    channel, integers clipped to [-2^(b-1), 2^(b-1) - 1]."""
    w = w.astype(np.float64)
    qmax = 2.0 ** (bits - 1)
    scale = np.max(np.abs(w), axis=contract, keepdims=True) / (qmax - 0.5)
    q = np.clip(np.round(w / scale), -qmax, qmax - 1)
    return q * scale, scale


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("name", ["w_up", "wo"])
def test_round_trip_matches_absmax_reference_within_half_a_step(bits, name):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(3, 4, 6, 5)).astype(np.float32)
    contract = contracted_axes(name, w.ndim, stacked=True)
    got, size = fake_quantize(w, bits, contract)
    want, scale = reference(w, bits, contract)
    ratio = w / scale  # a tie at x.5 (the channel's absmax lies at 2^(b-1) - 1/2) may go
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4  # either way in float32
    assert np.abs(got - want)[~tie].max() < 1e-5 * np.abs(w).max()
    assert np.all(np.abs(got - want)[tie] < scale.max() * (1 + 1e-5))
    assert np.all(np.abs(got - w) <= scale / 2 * (1 + 1e-5) + 1e-7)
    assert size == (w.size * bits + 7) // 8 + scale.size * 4
    assert len(np.unique(np.round(got / scale))) <= 2**bits


def test_quantize_variables_keeps_router_and_float_leaves_bit_identical():
    import jax

    model, variables = tiny_model()
    policy = QuantPolicy(bits={"attn": 8, "shared": 4, "experts": 4})
    expert_bits = {0: np.array([2, 8, 4, 4, 4, 4, 4, 8]), 2: np.full(8, 3)}
    new, report = quantize_variables(model, variables, policy, expert_bits)
    old_leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    new_leaves = dict(jax.tree_util.tree_leaves_with_path(new["params"]))
    quantized = 0
    for path, old in old_leaves:
        key = jax.tree_util.keystr(path)
        got = np.asarray(new_leaves[path])
        if any(k in key for k in ("'attn'", "'shared'", "'experts'")) and "'w" in key:
            assert not np.array_equal(got, old), key
            quantized += got.nbytes
        else:  # router, norms, embedding, lm_head, the dense layer's mlp
            assert np.array_equal(got, np.asarray(old)), key
    assert report["float_bytes"] == quantized
    experts = new["params"]["runs_0"]["moe"]["experts"]["w_up"][0]
    old = np.asarray(variables["params"]["runs_0"]["moe"]["experts"]["w_up"][0])
    for e, b in enumerate(expert_bits[0]):
        want, scale = reference(old[e], int(b), (0,))
        assert np.all(np.abs(experts[e] - want) <= scale * (1 + 1e-5)), e
        assert np.all(np.abs(experts[e] - old[e]) <= scale / 2 * (1 + 1e-5) + 1e-7), e
    # 2 layers x 8 experts x 3 weights of 128 values (16 b bytes at b bits); float32
    # scales, one per output channel: 8 + 8 + 16 per expert
    widths = sum(int(b) for b in expert_bits[0]) + sum(int(b) for b in expert_bits[2])
    expert_bytes = 3 * 16 * widths + 2 * 8 * (8 + 8 + 16) * 4
    shared = 2 * (3 * 128 * 4 // 8 + (8 + 8 + 16) * 4)
    attn = 3 * (4 * 256 + (16 + 16 + 16 + 16) * 4)
    assert report["bytes"] == expert_bytes + shared + attn
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables["params"]))
    assert report["model_bytes"] == total - quantized + report["bytes"]


def test_bad_policy_names_the_field():
    with pytest.raises(ConfigError, match="--kinds: 'router'"):
        QuantPolicy(bits={"router": 8})
    with pytest.raises(ConfigError, match="bits=9"):
        QuantPolicy(bits={"experts": 9})


def test_milp_allocation_equals_brute_force():
    rng = np.random.default_rng(0)
    bits = [2, 3, 4, 8]
    for trial in range(6):
        num = 5
        importance = rng.uniform(0, 1, num)
        errors = np.sort(rng.uniform(0, 1, (num, len(bits))), axis=1)[:, ::-1]
        sizes = rng.integers(1, 4, num).astype(float)
        avg = float(rng.uniform(2.2, 6))
        got = allocate_bits(importance, errors, bits, avg, sizes)
        best, best_cost = None, np.inf
        for choice in itertools.product(range(len(bits)), repeat=num):
            widths = np.array([bits[c] for c in choice])
            if widths @ sizes > avg * sizes.sum() + 1e-9:
                continue
            cost = sum(importance[i] * errors[i, c] for i, c in enumerate(choice))
            if cost < best_cost - 1e-12:
                best, best_cost = widths, cost
        index = [bits.index(b) for b in got]
        got_cost = sum(importance[i] * errors[i, c] for i, c in enumerate(index))
        assert got @ sizes <= avg * sizes.sum() + 1e-9, trial
        assert abs(got_cost - best_cost) < 1e-9 * max(1.0, best_cost), (trial, got, best)
    with pytest.raises(ConfigError, match="--avg_bits=1.5"):
        allocate_bits(np.ones(2), np.ones((2, 2)), [2, 4], 1.5)


def test_quantize_cli_mixed_writes_a_run_that_reloads_and_evaluates(
    tiny_corpus_dir, tmp_path, capsys
):
    config = make_tiny_config(tiny_corpus_dir, "deepseekmoe", **{"model.first_k_dense": 0})
    workdir = str(tmp_path / "run")
    _, variables, _ = random_run(workdir, config)
    out = str(tmp_path / "mixed")
    argv = ["quantize", f"--workdir={workdir}", f"--out={out}", "--policy=mixed"]
    argv += ["--avg_bits=3", "--candidate_bits=2,4", "--calibration_batches=1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    with Checkpointer(out, async_save=False) as ckpt:
        record = ckpt.read_extra(0)["compression"]
    assert record["expert_bits"] == summary["expert_bits"]
    _, new, s, _ = load_run(out)
    old_moe = variables["params"]["moe_layers"]["moe"]
    new_moe = new["params"]["moe_layers"]["moe"]
    assert np.array_equal(new_moe["router"]["kernel"], np.asarray(old_moe["router"]["kernel"]))
    for layer, widths in enumerate(record["expert_bits"].values()):
        assert np.mean(widths) <= 3 and set(widths) <= {2, 4}
        old = np.asarray(old_moe["experts"]["w_gate"][layer])
        for e, b in enumerate(widths):
            got = new_moe["experts"]["w_gate"][layer][e]
            want, scale = reference(old[e], b, (0,))
            assert np.all(np.abs(got - old[e]) <= scale / 2 * (1 + 1e-5) + 1e-7)
            assert np.mean(np.abs(got - want) < 1e-6) > 0.9  # all but absmax ties
    assert record["model_bytes"] < record["float_model_bytes"]
    report = evaluate(out, "corpus", max_batches=1)
    assert np.isfinite(report["loss"]) and report["step"] == 0
    bad = ["quantize", f"--workdir={workdir}", f"--out={tmp_path / 'bad'}", "--policy=mixed"]
    assert cli.main(bad + ["--kinds=attn"]) == 1
    assert "add experts to --kinds" in capsys.readouterr().err
