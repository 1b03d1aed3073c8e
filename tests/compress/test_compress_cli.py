"""`python -m moejax.compress prune|merge` writes a new run directory that `load_run`
reads back with the edited experts, `moejax.eval` evaluates and (same count in every layer)
`moejax.hf.save_pretrained` exports to a model transformers loads with the same logits; a
tiny imported Hugging Face MoE (Qwen2-MoE, built here, nothing downloaded) prunes, merges
and quantizes (MC# mixed 4/8-bit experts, exported as the dequantized float weights) from
one command each."""

import json

import numpy as np
import pytest
from testing_utils import make_tiny_config, random_run

from moejax.compress import __main__ as cli
from moejax.eval import evaluate
from moejax.train.checkpoint import Checkpointer
from moejax.train.run_loader import load_run


@pytest.fixture(scope="module")
def source_run(tiny_corpus_dir, tmp_path_factory):
    config = make_tiny_config(tiny_corpus_dir, "deepseekmoe", **{"model.first_k_dense": 0})
    workdir = str(tmp_path_factory.mktemp("compress") / "run")
    model, variables, _ = random_run(workdir, config)
    return workdir, variables


def test_prune_cli_writes_a_run_that_reloads_and_evaluates(source_run, tmp_path, capsys):
    workdir, variables = source_run
    out = str(tmp_path / "pruned")
    argv = ["prune", f"--workdir={workdir}", f"--out={out}", "--keep=3,2", "--method=gate_mass"]
    assert cli.main(argv + ["--calibration_batches=1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layer_kinds"] == "moe:e=3:k=2,moe:e=2:k=2"
    with Checkpointer(out, async_save=False) as ckpt:
        record = ckpt.read_extra(0)["compression"]
    kept = [np.asarray(record["kept"][str(i)]) for i in range(2)]
    assert record["kept"] == summary["kept"] and [len(k) for k in kept] == [3, 2]
    for c, ids in zip(record["calibration"]["layers"], kept):  # the largest gate masses
        assert set(ids) == set(np.argsort(-np.asarray(c["gate_mass"]), kind="stable")[: len(ids)])
    model, new_vars, s, _ = load_run(out)
    old = variables["params"]["moe_layers"]["moe"]
    for layer, (run, ids) in enumerate(zip(("runs_0", "runs_1"), kept)):
        moe = new_vars["params"][run]["moe"]
        for name in ("w_gate", "w_up", "w_down"):
            assert np.array_equal(
                moe["experts"][name][0], np.asarray(old["experts"][name])[layer][ids]
            )
        want = np.asarray(old["router"]["kernel"])[layer][:, ids]
        assert np.array_equal(moe["router"]["kernel"][0], want)
        assert np.array_equal(moe["shared"]["w_up"][0], np.asarray(old["shared"]["w_up"])[layer])
    report = evaluate(out, "corpus", max_batches=1)
    assert [e["num_experts"] for e in report["experts"]] == [3, 2]
    assert np.isfinite(report["loss"]) and report["step"] == 0
    assert cli.main(argv) == 1  # --out now holds a run
    err = capsys.readouterr().err
    assert err.startswith("moejax.compress: error: --out=") and err.count("\n") == 1


def test_merge_cli_writes_a_run_that_reloads(source_run, tmp_path, capsys):
    workdir, _ = source_run
    out = str(tmp_path / "merged")
    argv = ["merge", f"--workdir={workdir}", f"--out={out}", "--keep=2", "--rank=0.5"]
    assert cli.main(argv + ["--calibration_batches=1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["num_experts"], summary["layer_kinds"]) == (2, "")
    for clusters in summary["clusters"].values():
        assert sorted(sum(clusters, [])) == [0, 1, 2, 3] and len(clusters) == 2
    model, variables, s, _ = load_run(out)
    assert s.moe.num_experts == 2 and variables["params"]["moe_layers"]["moe"]["experts"][
        "w_gate"
    ].shape[:2] == (2, 2)


def test_an_imported_hf_moe_prunes_merges_and_exports(tiny_corpus_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="needs torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    import moejax.hf as mhf
    from moejax.train.convert_hf import convert

    config = transformers.Qwen2MoeConfig(
        vocab_size=260,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    run = str(tmp_path / "run")
    convert(str(tmp_path / "hf"), run)
    data = [f"--data_dir={tiny_corpus_dir}", "--seq_len=32", "--batch_size=2"]
    ids = np.array([[1, 50, 60, 70, 80, 90]])
    commands = (
        ("prune", ["--keep=3", "--method=easy_ep"]),
        ("merge", ["--keep=3", "--rank=1.0"]),
        ("quantize", ["--policy=mixed", "--avg_bits=5", "--candidate_bits=4,8"]),
    )
    for command, extra in commands:
        out = str(tmp_path / command)
        argv = [command, f"--workdir={run}", f"--out={out}", *data, *extra]
        assert cli.main(argv + ["--calibration_batches=1"]) == 0, capsys.readouterr().err
        model, variables, s, _ = load_run(out)
        assert s.moe.num_experts == (4 if command == "quantize" else 3)
        mhf.save_pretrained(model, variables, str(tmp_path / f"{command}_hf"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{command}_hf"))
        with torch.no_grad():
            want = hf(torch.tensor(ids)).logits.numpy()
        got = np.asarray(model.apply(variables, ids)[0])
        assert np.abs(got - want).max() < 1e-4, command
