"""Bits per byte in the trainer's evaluation count the bytes of every scored target, per
corpus domain and, for rows with no domain (-1: the generated tasks of `data.sources=
multitask`), in the total only; a multitask run evaluates (it crashed in `np.bincount`)."""

import numpy as np

from moejax.config.validation import validate
from moejax.data import make_batches, open_tokenizer
from moejax.train.evaluation import bytes_per_domain
from moejax.train.loop import train
from moejax.train.writers import read_jsonl


def test_bytes_per_domain_keeps_rows_of_no_domain_in_the_total_only():
    token_bytes = np.array([0.0, 1.0, 2.0, 3.0])
    batch = {
        "targets": np.array([[1, 2, 3], [3, 3, 1], [2, 2, 2]]),
        "loss_mask": np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1]]),
        "domains": np.array([[0, 0, 0], [1, 1, 1], [-1, -1, -1]]),
    }
    got = bytes_per_domain(batch, token_bytes, 2)
    np.testing.assert_array_equal(got, [1 + 2, 3 + 3 + 1, 2 + 2])


def test_a_multitask_run_evaluates_its_bits_per_byte(tiny_config, tmp_path):
    config = tiny_config(
        "deepseekmoe",
        **{
            "data.sources": "multitask",
            "data.seq_len": 32,
            "train.steps": 2,
            "train.eval_every": 2,
            "train.eval_batches": 1,
        },
    )
    train(config, str(tmp_path))
    [last] = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "eval/loss" in r]
    assert last["eval/bits_per_byte"] > 0 and np.isfinite(last["eval/bits_per_byte"])
    # The bytes of the eval batches' scored targets (ASCII answers and their EOS, 0 bytes).
    s = validate(config, num_devices=1, num_processes=1)
    token_bytes = np.asarray(open_tokenizer(s.data).token_bytes)
    want = sum(
        float(token_bytes[batch["targets"][batch["loss_mask"] > 0]].sum())
        for batch in make_batches(s.data, s.data.eval_split, max_eval_batches=1)
    )
    assert last["eval/bytes"] == want > 0
    ce_sum = last["eval/loss"] * last["eval/tokens"]
    np.testing.assert_allclose(last["eval/bits_per_byte"], ce_sum / np.log(2) / want, rtol=1e-6)
