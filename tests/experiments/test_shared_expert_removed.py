"""experiments/shared_expert_removed.py: a run scores as the trainer scored it, and removing
the shared expert is the same model as the trained one with the shared expert's output
projection zeroed (checked with no extra routed expert, where the two must agree)."""

import json
import os

import jax
import numpy as np
import pytest
from testing_utils import load_experiment

from moejax.train.run_loader import load_run

ser = load_experiment("shared_expert_removed")


def zero_shared_output(params):
    if not isinstance(params, dict):
        return params
    return {
        k: (
            {**v, "w_down": jax.numpy.zeros_like(v["w_down"])}
            if k == "shared"
            else zero_shared_output(v)
        )
        for k, v in params.items()
    }


def test_removing_the_shared_expert_is_zeroing_its_output(tiny_moe_run):
    _, variables, s, _ = load_run(tiny_moe_run)
    as_trained = ser.eval_loss(s, variables)["eval/loss"]
    records = [json.loads(line) for line in open(os.path.join(tiny_moe_run, "metrics.jsonl"))]
    logged = [r["eval/loss"] for r in records if "eval/loss" in r][-1]
    assert as_trained == pytest.approx(logged, rel=1e-6)
    zeroed = ser.eval_loss(s, {**variables, "params": zero_shared_output(variables["params"])})
    removed = ser.eval_loss(
        ser.shared_removed_sections(s, extra_routed=0),
        {**variables, "params": ser.without_shared(variables["params"])},
    )
    assert removed["eval/loss"] == pytest.approx(zeroed["eval/loss"], rel=1e-6)
    assert not np.isclose(removed["eval/loss"], as_trained, rtol=1e-6)
    assert "shared" not in json.dumps(jax.tree.map(lambda x: 0, ser.without_shared(variables)))


def test_a_run_without_a_shared_expert_is_refused(tiny_moe_run):
    _, _, s, _ = load_run(tiny_moe_run)
    with pytest.raises(ValueError, match="exceed"):
        ser.shared_removed_sections(s, extra_routed=10)
    none = ser.shared_removed_sections(s, 1)
    assert (none.moe.n_shared, none.moe.top_k) == (0, s.moe.top_k + 1)
    with pytest.raises(ValueError, match="no shared expert"):
        ser.shared_removed_sections(none, 1)


@pytest.mark.slow
def test_the_cli_prints_both_losses(tiny_moe_run, capsys):
    assert ser.main([f"--workdirs={tiny_moe_run}"]) == 0
    out = capsys.readouterr().out
    assert "(shared + top-2) -> " in out and "(no shared, top-3)" in out
