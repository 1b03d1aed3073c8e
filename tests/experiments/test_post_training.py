"""`experiments/post_training.py` on the tiny run, and `experiments/tiny_hf_moe.py`'s
checkpoint: the uncompressed row is `moejax.eval.evaluate`'s own report, each variant is the
compress command's run scored the same way, and the table holds the rows' means; the HF
checkpoint imports with transformers' logits."""

import json

import numpy as np
import pytest
from hf_models import hf_logits
from testing_utils import load_experiment

from moejax.eval import evaluate
from moejax.hf import from_pretrained

torch = pytest.importorskip("torch", reason="needs torch (the hf extra)")
transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
post_training = load_experiment("post_training")
tiny_hf_moe = load_experiment("tiny_hf_moe")


@pytest.mark.slow  # fast representatives: tests/compress/ (each command on the tiny run)
def test_rows_are_the_eval_reports_of_the_compressed_runs(tiny_moe_run, tmp_path, capsys):
    only = "prune_frequency_0.5,merge_0.5_rank1.0,int8"
    argv = [f"--runs={tiny_moe_run}", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"]
    argv += ["--tasks=rev", "--decoding=greedy,scmoe_beta0.5", f"--only={only}", "--export"]
    assert post_training.main([*argv, "--max_batches=2"]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "o" / "results.json").read_text())}
    assert list(rows) == [
        "uncompressed",
        "greedy",
        "scmoe_beta0.5",
        "prune_frequency_0.5",
        "merge_0.5_rank1.0",
        "int8",
    ]
    base = rows["uncompressed"]
    report = evaluate(tiny_moe_run, tasks="rev", max_batches=2)
    assert base["loss"] == report["loss"] and base["accuracy"] == report["tasks"]["mean"]
    # The greedy decoder is the evaluation's own decoding.
    assert rows["greedy"]["tasks"] == report["tasks"]
    assert 0.0 <= rows["scmoe_beta0.5"]["accuracy"] <= 1.0
    for name in ("prune_frequency_0.5", "merge_0.5_rank1.0", "int8"):
        row = rows[name]
        out = str(tmp_path / "w" / row["run"] / name)
        assert row["loss"] == evaluate(out, max_batches=2)["loss"]
        assert "accuracy" in row
        # No HF architecture has DeepSeekMoE's ungated shared expert with softmax top-k:
        # the row says so (an imported model's export is checked in tests/compress/).
        assert row["export_error"].startswith("no Hugging Face architecture expresses")
        assert row["delta_loss"] == row["loss"] - base["loss"]
        assert row["size"] == row["bytes"] / base["bytes"] < 1.0
    # Half the experts of each MoE layer: the float bytes of the other half are gone.
    assert rows["prune_frequency_0.5"]["bytes"] == rows["merge_0.5_rank1.0"]["bytes"]
    assert abs(rows["int8"]["delta_loss"]) < 0.05  # int8 weights barely move a tiny model
    table = (tmp_path / "o" / "results.md").read_text()
    assert f"| quantize | int8 | {rows['int8']['size']:.3f} ± 0.000 |" in table
    assert "| decode | greedy | 1.000 ± 0.000 | (the run's) | - | - |" in table
    assert "| none | uncompressed | 1.000 ± 0.000 |" in table
    assert "int8" in capsys.readouterr().out


@pytest.mark.slow  # the HF parity tests of tests/hf/ import every architecture by default
def test_tiny_hf_moe_imports_with_the_transformers_logits(tmp_path):
    out = str(tmp_path / "hf")
    assert tiny_hf_moe.main(["--arch=mixtral", "--vocab=96", "--seed=3", f"--out={out}"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.num_local_experts == 8 and hf.config.vocab_size == 96
    model, variables = from_pretrained(out)
    ids = np.random.default_rng(0).integers(0, 96, (2, 7))
    logits, _ = model.apply(variables, ids)
    with torch.no_grad():
        want = hf_logits(hf, ids)
    np.testing.assert_allclose(np.asarray(logits), want, atol=2e-4)
