"""`moejax.eval`: per-source loss equals the trainer's eval step on the same batches, bits per
byte is the summed loss / ln 2 / the targets' UTF-8 bytes (counted by hand), expert usage is
a recount of the routing, task accuracy is exact match of the decoded answers, and the CLI
prints one JSON report of a run directory."""

import json
import math

import jax
import numpy as np
import pytest
from testing_utils import make_tiny_config, random_run

from moejax.data import EOS_ID, ByteTokenizer, domain_names, tasks
from moejax.eval import __main__ as eval_cli
from moejax.eval import evaluate
from moejax.eval import tasks as eval_tasks
from moejax.eval.data import eval_data_config, heldout_batches
from moejax.eval.language import language_modelling
from moejax.eval.usage import count_assignments, usage_statistics
from moejax.models.transformer import Transformer
from moejax.train.run_loader import LoadedRun, one_device_sections
from moejax.train.step import eval_step


@pytest.fixture(scope="module")
def tiny_random_run(tiny_corpus_dir, tmp_path_factory):
    """(workdir, LoadedRun) of a randomly initialised 2-MoE-layer model at step 0."""
    config = make_tiny_config(tiny_corpus_dir, "deepseekmoe", **{"model.first_k_dense": 0})
    workdir = str(tmp_path_factory.mktemp("eval") / "run")
    model, variables, s = random_run(workdir, config)
    return workdir, LoadedRun(model, variables, s, ByteTokenizer())


def test_report_equals_the_trainers_eval_step_and_a_routing_recount(tiny_random_run):
    model, variables, s, _ = run = tiny_random_run[1]
    report = evaluate(run, "corpus", max_batches=1)
    cfg = eval_data_config(s, "corpus")
    names = domain_names(cfg)

    @jax.jit
    def step(variables, batch):
        sums, _ = eval_step(variables["params"], batch, model=model, num_domains=len(names))
        routing = model.apply(variables, batch["inputs"], batch["segment_ids"])[1]["routing"]
        return sums, routing["expert_ids"], routing["combine_weights"]

    ce = tok = 0
    counts = np.zeros((2, s.moe.num_experts), np.int64)
    for batch in heldout_batches(cfg, 1):
        sums, ids, w = jax.device_get(step(variables, batch))
        ce, tok = ce + sums["domain_ce_sum"], tok + sums["domain_tokens"]
        for layer, b, pos, j in zip(*np.nonzero(w > 0)):
            if batch["segment_ids"][b, pos] > 0:
                counts[layer, ids[layer, b, pos, j]] += 1
    assert sorted(report["sources"]) == sorted(n for n, t in zip(names, tok) if t)
    for d, name in enumerate(names):
        if not tok[d]:
            continue
        assert np.isclose(report["sources"][name]["loss"], ce[d] / tok[d], rtol=1e-5)
        assert report["sources"][name]["tokens"] == tok[d]
    assert np.isclose(report["loss"], ce.sum() / tok.sum(), rtol=1e-5)
    assert [layer["assignments"] for layer in report["experts"]] == counts.sum(1).tolist()
    for layer, c in zip(report["experts"], counts):
        assert np.allclose(layer["share"], c / c.sum())


def test_bits_per_byte_by_hand(tiny_random_run):
    """Targets: 3 byte tokens (1 byte each) and an EOS (0 bytes), all scored; the per-token
    losses are the model's own (the trainer's loss is checked above)."""
    model, variables, _, _ = tiny_random_run[1]
    inputs = np.array([[1, 3 + 104, 3 + 105, 3 + 33]], np.int32)
    targets = np.array([[3 + 104, 3 + 105, 3 + 33, EOS_ID]], np.int32)
    batch = {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": np.ones_like(inputs),
        "positions": np.arange(4, dtype=np.int32)[None],
        "domains": np.zeros_like(inputs),
        "loss_mask": np.ones(inputs.shape, np.float32),
    }
    logits = jax.jit(model.apply)(variables, inputs)[0]  # one compile: the reference's own
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    token_loss = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    loss = token_loss.sum()

    def forward(variables, batch):
        return token_loss, None, None

    got = language_modelling(
        model, variables, [batch], ("only",), ByteTokenizer().token_bytes, forward=forward
    )
    assert got["bytes"] == 3 and got["tokens"] == 4
    assert np.isclose(got["loss"], loss / 4, rtol=1e-5)
    assert np.isclose(got["bits_per_byte"], (loss / 4) * 4 / (3 * math.log(2)), rtol=1e-5)


def test_usage_statistics_closed_forms():
    ids = np.array([[[0, 1], [1, 2]], [[1, 0], [3, 3]]])
    w = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.7, 0.3], [0.2, 0.1]]])
    real = np.array([[True, True], [True, False]])
    counts = count_assignments(ids, w, real, 4)
    assert counts.tolist() == [2, 3, 0, 0]  # expert 2 only in an unused slot, 3 on padding
    stats = usage_statistics(counts)
    share = np.array([0.4, 0.6, 0, 0])
    assert np.allclose(stats["share"], share) and stats["dead_experts"] == 2
    assert np.isclose(stats["load_cv"], np.std([2, 3, 0, 0]) / 1.25)
    assert np.isclose(stats["max_load"], 0.6 * 4)
    assert np.isclose(stats["entropy_bits"], -(0.4 * np.log2(0.4) + 0.6 * np.log2(0.6)))


def test_task_accuracy_is_exact_match_of_the_greedy_answers(tiny_corpus_dir):
    """A stand-in decoder answers the even prompts right and the odd ones wrong."""
    answers = {}
    for task, x, answer in tasks.eval_examples(0, 6):
        answers[tuple(tasks.prompt_tokens(task, x).tolist())] = answer

    def decoder(model, variables, prompts, max_new_tokens, eos_id):
        rows = []
        for r, prompt in enumerate(np.asarray(prompts)):
            text = answers[tuple(prompt.tolist())] + ("" if r % 2 == 0 else "x")
            ids = list(ByteTokenizer().encode(text, add_bos=False, add_eos=True))
            rows.append(np.concatenate([prompt, (ids + [eos_id] * 9)[:max_new_tokens]]))
        return np.stack(rows)

    s = one_device_sections(make_tiny_config(tiny_corpus_dir, "deepseekmoe").to_dict())
    model = Transformer(s.model, s.moe)
    kw = dict(seed=0, per_task=6, generate_fn=decoder)
    got = eval_tasks.task_accuracy(model, None, ByteTokenizer(), ["rev", "add"], **kw)
    assert got == {"rev": 0.5, "add": 0.5, "mean": 0.5}


def test_cli_prints_one_json_report(tiny_random_run, capsys):
    run = tiny_random_run[0]
    argv = [f"--workdir={run}", "--sources=none", "--tasks=srt", "--per_task=2", "--json"]
    assert eval_cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 0 and 0.0 <= report["tasks"]["srt"] <= 1.0
    assert [e["num_experts"] for e in report["experts"]] == [4, 4]
    assert eval_cli.main([f"--workdir={run}", "--tasks=nope"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("moejax.eval: error: --tasks: unknown task 'nope'") and err.count("\n") == 1
    )
