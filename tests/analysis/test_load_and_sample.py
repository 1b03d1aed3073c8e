"""`moejax.load_run` reads back exactly what the trainer checkpointed, and
`python -m moejax.sample` prints the greedy continuation that a cache-free decoding loop
(one full forward pass per token) computes from the same weights."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import REPO

import moejax
from moejax import sample
from moejax.train.checkpoint import Checkpointer, CheckpointError
from moejax.train.run_loader import checkpoint_steps, load_run


def test_load_run_returns_the_checkpointed_params(tiny_moe_run):
    assert checkpoint_steps(tiny_moe_run) == [2, 4]
    model, variables, config, tokenizer = moejax.load_run(tiny_moe_run, step=2)
    assert config.model.num_moe_layers == 2 and tokenizer.vocab_size <= config.model.vocab_size
    with Checkpointer(tiny_moe_run, async_save=False) as ckpt:
        raw = ckpt.restore_subtrees({"params": variables["params"]}, 2)["params"]
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, variables["params"], raw))
    assert leaves and all(leaves)
    latest = moejax.load_run(tiny_moe_run).variables["params"]
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), latest, raw))
    assert any(moved)  # step 4 is not step 2
    logits, _ = model.apply(variables, jnp.ones((1, 4), jnp.int32))
    assert logits.shape == (1, 4, config.model.vocab_size)


def test_load_run_names_the_steps_it_has(tiny_moe_run, tmp_path):
    with pytest.raises(CheckpointError, match=r"its steps are \[2, 4\]"):
        load_run(tiny_moe_run, step=3)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_run(tmp_path)


def test_importing_moejax_does_not_load_the_training_stack():
    code = "import sys, moejax.nn; print('moejax.train' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr


def greedy_reference(model, variables, ids, steps):
    """Greedy decoding without a cache: the whole sequence through the model per token."""
    tokens = list(ids)
    for _ in range(steps):
        logits, _ = model.apply(variables, jnp.asarray([tokens], jnp.int32))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(ids) :]


def test_sample_cli_prints_the_greedy_continuation(tiny_moe_run, capsys):
    model, variables, _, tokenizer = load_run(tiny_moe_run)
    ids = tokenizer.encode("def ", add_bos=True, add_eos=False)
    new = np.asarray(greedy_reference(model, variables, ids, 6))
    want = "def " + tokenizer.decode(
        sample.continuation_ids(np.concatenate([ids, new]), len(ids), tokenizer.eos_id)
    )
    assert sample.main([f"--workdir={tiny_moe_run}", "--prompt=def ", "--max_new_tokens=6"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_sampling_is_seeded_and_errors_are_one_line(tiny_moe_run, tmp_path, capsys):
    argv = [
        f"--workdir={tiny_moe_run}",
        "--prompt=a",
        "--max_new_tokens=8",
        "--temperature=1",
        "--top_p=0.9",
        "--num_samples=2",
    ]
    assert sample.main(argv + ["--seed=3"]) == 0
    first = capsys.readouterr().out
    assert sample.main(argv + ["--seed=3"]) == 0
    assert capsys.readouterr().out == first and first.count("--- sample") == 2
    assert sample.main([f"--workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moejax.sample: error:") and err.count("\n") == 1


def test_continuation_stops_at_eos():
    assert sample.continuation_ids(np.array([1, 5, 6, 2, 7]), 1, eos_id=2).tolist() == [5, 6]
    assert sample.continuation_ids(np.array([1, 5, 6]), 1, eos_id=2).tolist() == [5, 6]
