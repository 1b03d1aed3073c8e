"""`python -m moejax.sample --routing=scmoe|rewire|c3po`: one command each, on a trained run
and on a Hugging Face checkpoint imported in-process (a tiny Mixtral that transformers
writes here, nothing downloaded), printing what the library functions decode; bad flags are
one line on stderr before anything loads."""

import json

import jax
import numpy as np
import pytest

from moejax import sample
from moejax.data import ByteTokenizer
from moejax.generate.c3po import c3po_generate
from moejax.generate.rewire import rewire_generate
from moejax.generate.scmoe import scmoe_generate
from moejax.hf import from_pretrained
from moejax.train.run_loader import load_run

REFERENCES = [
    {"prompt": "def f(x):", "output": " return x"},
    {"prompt": "1+1=", "output": "2"},
    {"prompt": "def g(y):", "output": " pass"},
]
FLAGS = {
    "scmoe": ["--scmoe_rank=2", "--scmoe_beta=0.5"],
    "rewire": ["--rewire_every=2", "--rewire_steps=1", "--rewire_lr=1.0"],
    "c3po": ["--c3po_k=2", "--c3po_layers=1", "--c3po_steps=3", "--c3po_lr=0.5"],
}


def expected_text(routing, model, variables, tokenizer, refs_path, prompt, n):
    """What the library decodes for `prompt` with the method the flags above select."""
    ids = np.asarray([tokenizer.encode(prompt, add_bos=True, add_eos=False)], np.int32)
    kw = dict(rng=jax.random.PRNGKey(0), eos_id=tokenizer.eos_id)
    if routing == "scmoe":
        tokens = scmoe_generate(model, variables, ids, n, rank=2, beta=0.5, **kw)
    elif routing == "rewire":
        tokens = rewire_generate(model, variables, ids, n, every=2, steps=1, lr=1.0, **kw)[0]
    else:
        refs = sample.read_references(refs_path, tokenizer)
        tokens = c3po_generate(
            model, variables, ids[0], refs, n, k=2, critical_layers=1, steps=3, lr=0.5, **kw
        )[0]
    row = np.asarray(tokens)[0]
    return prompt + tokenizer.decode(sample.continuation_ids(row, ids.shape[1], tokenizer.eos_id))


def run_all(source_flag, model, variables, tokenizer, tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("\n".join(json.dumps(r) for r in REFERENCES) + "\n")
    capsys.readouterr()  # what came before (transformers' progress bars)
    for routing, flags in FLAGS.items():
        argv = [source_flag, "--prompt=def ", "--max_new_tokens=4", f"--routing={routing}"]
        argv += flags + ([f"--c3po_references={refs}"] if routing == "c3po" else [])
        assert sample.main(argv) == 0
        out = capsys.readouterr()
        want = expected_text(routing, model, variables, tokenizer, str(refs), "def ", 4)
        assert out.out == want + "\n", routing
        assert out.err.startswith(f"{routing}: "), out.err


def test_every_method_runs_from_one_command_on_an_imported_hf_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    torch = pytest.importorskip("torch", reason="needs torch")
    config = transformers.MixtralConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "hf")
    model, variables = from_pretrained(str(tmp_path / "hf"))
    run_all(f"--hf={tmp_path / 'hf'}", model, variables, ByteTokenizer(), tmp_path, capsys)


def test_every_method_runs_from_one_command_on_a_trained_run(tiny_moe_run, tmp_path, capsys):
    model, variables, _, tokenizer = load_run(tiny_moe_run)
    run_all(f"--workdir={tiny_moe_run}", model, variables, tokenizer, tmp_path, capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--routing=c3po"], "--routing=c3po needs --c3po_references"),
        (["--routing=rewire", "--rewire_layers=a,b"], "--rewire_layers='a,b' must be"),
        (["--step=3"], "--hf has none"),
    ],
)
def test_bad_routing_flags_are_one_line_before_loading(tmp_path, capsys, flags, message):
    assert sample.main([f"--hf={tmp_path / 'nothing'}", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moejax.sample: error:") and err.count("\n") == 1 and message in err
