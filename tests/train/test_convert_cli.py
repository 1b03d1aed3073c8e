"""`python -m moejax.train.convert_hf` as a user runs it: its output is the one useful line
(orbax's INFO logs, about 53 lines, are off unless --verbosity is given) and bad input is
one line with exit status 1 (issue 23 item 5)."""

import pytest
from testing_utils import run_module

transformers = pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("torch", reason="needs torch")


def test_convert_prints_one_line_and_bad_input_one_error(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_hidden_layers=1,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    hf, run = str(tmp_path / "hf"), str(tmp_path / "run")
    proc = run_module("moejax.train.convert_hf", "--from", hf, "--workdir", run, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 2, lines  # no tokenizer in this checkpoint: a warning, then the result
    assert lines[0].startswith(f"WARNING: {hf} holds no tokenizer")
    assert lines[1] == (
        f"wrote {run}: fine-tune with python -m moejax.train --config={run}/config.py "
        f"--workdir={run}"
    )
    for args, expected in [
        (("--from", str(tmp_path / "nope"), "--workdir", run + "2"), "holds no config.json"),
        (("--from", hf, "--workdir", run), "already holds checkpoints"),
    ]:
        proc = run_module("moejax.train.convert_hf", *args, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("moejax: error: ") and expected in lines[0]


def test_mesh_flag_is_parsed_or_refused_by_name():
    from moejax.train.convert_hf import parse_mesh

    mesh = parse_mesh("fsdp=2, expert=4")
    assert (mesh.data, mesh.fsdp, mesh.expert, mesh.tensor) == (-1, 2, 4, 1)
    for bad in ("fsdp:2", "pipe=2", "fsdp=two"):
        with pytest.raises(ValueError, match=r"--mesh=.*is not AXIS=SIZE"):
            parse_mesh(bad)
