"""`make_batches` from a DataConfig: the offline corpus, other tfds datasets, a sub-word
tokenizer over a two-source mixture (exact resume), evaluation passes, per-process shares,
and bad input named by its field."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from testing_utils import write_mixture

from moejax.data import (
    DataConfig,
    DataError,
    describe,
    domain_names,
    make_batches,
    open_tokenizer,
)

KEYS = ("inputs", "targets", "segment_ids", "positions", "domains", "loss_mask")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def scored_tokens(batches):
    """Real tokens of a pass: every input token of a segment, plus a row's last target (the
    pad id 0 never occurs in a document)."""
    return sum(
        int(
            (b["segment_ids"] != 0).sum()
            + ((b["segment_ids"][:, -1] != 0) & (b["targets"][:, -1] != 0)).sum()
        )
        for b in batches
    )


def test_corpus_batches_have_the_model_format(small_cfg):
    batch = next(make_batches(small_cfg, "train", process_index=0, process_count=1))
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        **{k: ("int32", (4, 64)) for k in KEYS if k != "loss_mask"},
        "loss_mask": ("float32", (4, 64)),
    }
    assert batch["inputs"].max() < 259
    real = batch["segment_ids"] != 0
    assert set(np.unique(batch["domains"][real])) <= {0, 1, 2}
    assert domain_names(small_cfg) == ("code", "prose", "arithmetic")


def test_evaluation_reads_every_validation_document_once(small_cfg, corpus):
    cfg = dataclasses.replace(small_cfg, seq_len=256)
    first = list(make_batches(cfg, "validation", process_index=0, process_count=1))
    again = list(make_batches(cfg, "validation", process_index=0, process_count=1))
    assert_same_batches(first, again)  # deterministic
    source = corpus.as_data_source()["validation"]
    expected = sum(len(source[i]["text"]) + 2 for i in range(len(source)))  # + BOS, EOS
    assert scored_tokens(first) == expected
    assert all(b["inputs"].shape == (4, 256) for b in first)
    capped = list(
        make_batches(cfg, "validation", process_index=0, process_count=1, max_eval_batches=2)
    )
    assert len(capped) == 2


def test_processes_read_disjoint_documents_covering_the_split(small_cfg, corpus):
    cfg = dataclasses.replace(small_cfg, seq_len=256, global_batch_size=4)
    shares = []
    for p in range(2):
        batches = list(make_batches(cfg, "validation", process_index=p, process_count=2))
        assert batches[0]["inputs"].shape == (2, 256)
        shares.append(batches)
    source = corpus.as_data_source()["validation"]
    texts = [source[i]["text"] for i in range(len(source))]
    # Each process reads documents p, p + 2, ...: the token counts add up to the split's.
    for p in range(2):
        assert scored_tokens(shares[p]) == sum(len(t) + 2 for t in texts[p::2])


def test_a_state_saved_under_other_settings_names_the_field(small_cfg):
    it = make_batches(small_cfg, "train", process_index=0, process_count=1)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    for field, value in [("seed", 9), ("global_batch_size", 8), ("sources", "corpus@2")]:
        other = make_batches(
            dataclasses.replace(small_cfg, **{field: value}),
            "train",
            process_index=0,
            process_count=1,
        )
        with pytest.raises(ValueError, match=f"data.{field}"):
            other.set_state(state)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """(data.sources, data.tokenizer): parquet "web" + jsonl.gz "code", SentencePiece 320."""
    return write_mixture(tmp_path_factory.mktemp("mixture"))


def mixture_cfg(sources, tokenizer, **kw):
    return DataConfig(
        sources=sources,
        tokenizer=tokenizer,
        seq_len=32,
        global_batch_size=4,
        **kw,
    )


def test_a_subword_mixture_resumes_exactly(mixture):
    cfg = mixture_cfg(*mixture)
    assert domain_names(cfg) == ("web", "code")
    reference = make_batches(cfg, "train", process_index=0, process_count=1)
    take(reference, 5)
    state = json.loads(json.dumps(reference.get_state()))
    expected = take(reference, 12)  # past an epoch of the smaller share
    resumed = make_batches(cfg, "train", process_index=0, process_count=1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 12), expected)
    ids = np.concatenate([b["inputs"].ravel() for b in expected])
    assert ids.max() < 320 and ids.max() > 258  # sub-word ids, beyond the byte range
    seen = np.concatenate([b["domains"][b["segment_ids"] != 0] for b in expected])
    assert set(np.unique(seen)) == {0, 1}


def test_every_source_is_one_evaluation_domain(mixture):
    cfg = mixture_cfg(*mixture, eval_fraction=0.2)
    batches = list(make_batches(cfg, "validation", process_index=0, process_count=1))
    domains = [set(np.unique(b["domains"][b["segment_ids"] != 0])) for b in batches]
    assert domains[0] == {0} and domains[-1] == {1}  # source after source
    info = describe(cfg)
    assert info["web"]["weight"] == 0.7 and info["code"]["weight"] == 0.3
    assert info["web"]["train_documents"] + info["web"]["eval_documents"] == 120
    tokenizer = open_tokenizer(cfg)
    assert tokenizer.vocab_size == 320 and tokenizer.spec == mixture[1]


def test_tfds_dataset_by_name(plain_text_cfg, plain_texts):
    cfg = dataclasses.replace(plain_text_cfg, sources="tfds:moejax_test_plain_text#body")
    batches = list(make_batches(cfg, "train_eval_pass", process_index=0, process_count=1))
    assert scored_tokens(batches) > 0
    with pytest.raises(DataError, match="data.sources"):
        make_batches(
            dataclasses.replace(cfg, sources="tfds:moejax_test_plain_text#nope"),
            "train",
            process_index=0,
            process_count=1,
        )


def test_bad_input_names_the_field(small_cfg, tmp_path):
    with pytest.raises(ValueError, match="data.global_batch_size=4 is not divisible by the 3"):
        make_batches(small_cfg, "train", process_index=0, process_count=3)
    with pytest.raises(DataError, match="data.sources"):
        make_batches(dataclasses.replace(small_cfg, sources="nosuchkind:x"), "train")
    with pytest.raises(DataError, match="data.tokenizer"):
        make_batches(
            dataclasses.replace(small_cfg, tokenizer="sentencepiece:/no/such.model"), "train"
        )
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=r"fewer than one batch.*data.global_batch_size"):
        make_batches(dataclasses.replace(small_cfg, sources=f"jsonl:{tiny}"), "train")
    with pytest.raises(DataError, match=r"data.sources.*tfds build mnist"):
        make_batches(
            dataclasses.replace(small_cfg, sources="tfds:mnist", data_dir=str(tmp_path)), "train"
        )


def test_a_corrupt_corpus_names_the_data_dir_and_the_fix(corpus, tmp_path):
    copy = tmp_path / "tfds"
    shutil.copytree(os.path.dirname(os.path.dirname(os.path.dirname(corpus.data_dir))), copy)
    cap = corpus.builder_config.max_bytes_per_domain
    cfg = DataConfig(data_dir=str(copy), max_bytes_per_domain=cap)
    variant = copy / "moejax_corpus" / corpus.builder_config.name / "1.0.0"
    (shard,) = variant.glob("*train.array_record*")
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match=r"data.data_dir=.*delete .* and rerun") as e:
        make_batches(cfg, "train", process_index=0, process_count=1)
    assert str(variant) in str(e.value)


def test_process_info_defaults_to_jax(small_cfg):
    it = make_batches(small_cfg, "train")  # one CPU process: the whole global batch
    assert (it.layout.process_index, it.layout.process_count) == (0, 1)
    assert next(it)["inputs"].shape == (small_cfg.global_batch_size, small_cfg.seq_len)
