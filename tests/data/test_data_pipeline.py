"""The packed-batch iterator: format, determinism, exact resume, sharding, eval mode."""

import dataclasses
import json

import numpy as np
import pytest

from moejax.data import ByteTokenizer, make_batches

KEYS = ("inputs", "targets", "segment_ids", "positions", "domains", "loss_mask")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def lane_documents(batches, lane):
    """The documents row slot `lane` read, rebuilt from its rows (pad id 0 never occurs in
    a document; every document starts with BOS = 1)."""
    rows = [np.concatenate([b["inputs"][lane, :1], b["targets"][lane]]) for b in batches]
    stream = np.concatenate(rows)
    stream = stream[stream != 0]
    starts = list(np.flatnonzero(stream == 1)) + [len(stream)]
    return [ByteTokenizer().decode(stream[s:e]) for s, e in zip(starts[:-1], starts[1:])]


def split_texts(corpus, split):
    source = corpus.as_data_source()[split]
    return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def test_batch_format(small_cfg):
    batch = next(make_batches(small_cfg, "train", process_index=0, process_count=1))
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "inputs": ("int32", (4, 64)),
        "targets": ("int32", (4, 64)),
        "segment_ids": ("int32", (4, 64)),
        "positions": ("int32", (4, 64)),
        "domains": ("int32", (4, 64)),
        "loss_mask": ("float32", (4, 64)),
    }
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].max() < 259 and batch["domains"].max() <= 2
    seg = batch["segment_ids"]
    np.testing.assert_array_equal(
        batch["loss_mask"][:, :-1] == 1, (seg[:, :-1] != 0) & (seg[:, :-1] == seg[:, 1:])
    )
    # Four lanes read four different documents, so the batch mixes documents.
    assert len({ByteTokenizer().decode(r[:40]) for r in batch["inputs"]}) == 4


def test_same_seed_same_batches_other_seed_differs(small_cfg):
    a = take(make_batches(small_cfg, "train", process_index=0, process_count=1), 30)
    b = take(make_batches(small_cfg, "train", process_index=0, process_count=1), 30)
    assert_same_batches(a, b)
    other = dataclasses.replace(small_cfg, seed=small_cfg.seed + 1)
    c = take(make_batches(other, "train", process_index=0, process_count=1), 30)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))


def test_resume_is_bit_identical_mid_document_and_across_epochs(small_cfg):
    """States saved after n batches, through JSON, continue exactly like the original."""
    cfg = dataclasses.replace(small_cfg, seq_len=512)
    ref = make_batches(cfg, "validation", process_index=0, process_count=1)
    batches, states = [], []
    for _ in range(150):
        batches.append(next(ref))
        states.append(json.loads(json.dumps(ref.get_state())))
    assert len(json.dumps(states[0])) < 1000

    def lanes(n):
        return states[n - 1]["lanes"]  # state after n batches: [[epoch, index, offset], ...]

    mid_document = next(n for n in range(1, 150) if all(off > 0 for _, _, off in lanes(n)))
    straddling = next(
        n
        for n in range(1, 150)  # some lanes in epoch 1, others still in 0
        if {e for e, _, _ in lanes(n)} == {0, 1}
    )
    all_in_epoch_1 = next(n for n in range(1, 150) if min(e for e, _, _ in lanes(n)) == 1)
    assert mid_document < straddling < all_in_epoch_1 < 130
    for n in (1, mid_document, straddling, straddling + 7, all_in_epoch_1):
        resumed = make_batches(cfg, "validation", process_index=0, process_count=1)
        resumed.set_state(states[n - 1])
        assert_same_batches(take(resumed, 20), batches[n : n + 20])


def test_state_mismatch_names_the_field(small_cfg):
    it = make_batches(small_cfg, "train", process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    other = make_batches(
        dataclasses.replace(small_cfg, seed=9), "train", process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="data.seed"):
        other.set_state(state)
    bigger = make_batches(
        dataclasses.replace(small_cfg, global_batch_size=8),
        "train",
        process_index=0,
        process_count=1,
    )
    with pytest.raises(ValueError, match="data.global_batch_size"):
        bigger.set_state(state)


def test_eval_mode_reads_every_document_once_then_stops(small_cfg, corpus):
    cfg = dataclasses.replace(small_cfg, seq_len=256)
    it = make_batches(cfg, "validation", process_index=0, process_count=1, repeat=False)
    batches = list(it)
    with pytest.raises(StopIteration):
        next(it)
    texts = split_texts(corpus, "validation")
    read = [doc for lane in range(4) for doc in lane_documents(batches, lane)]
    assert sorted(read) == sorted(texts)
    # Lane g read positions g, g + 4, ... of the epoch-0 permutation, in that order.
    perm = np.random.default_rng((cfg.seed, 0)).permutation(len(texts))
    for lane in range(4):
        assert lane_documents(batches, lane) == [texts[i] for i in perm[lane::4]]
    # The final batch is padded: some rows hold no target at all.
    last = batches[-1]
    assert last["inputs"].shape == (4, 256)
    empty_rows = last["loss_mask"].sum(axis=1) == 0
    assert empty_rows.any()
    assert (last["segment_ids"][empty_rows] == 0).all() and (last["inputs"][empty_rows] == 0).all()
    pad = it.padding_batch()
    assert {k: v.shape for k, v in pad.items()} == {k: v.shape for k, v in last.items()}
    assert pad["loss_mask"].sum() == 0 and (pad["segment_ids"] == 0).all()
    real_tokens = sum(
        int((b["segment_ids"] != 0).sum() + (b["targets"][:, -1] != 0).sum()) for b in batches
    )
    assert real_tokens == sum(len(t.encode("utf-8")) + 2 for t in texts)


def test_processes_read_disjoint_shares_covering_the_epoch(small_cfg, corpus):
    cfg = dataclasses.replace(small_cfg, seq_len=256, global_batch_size=4)
    texts = split_texts(corpus, "validation")
    assert len(set(texts)) == len(texts)
    perm = np.random.default_rng((cfg.seed, 0)).permutation(len(texts))
    shares = []
    for p in range(2):
        batches = list(
            make_batches(cfg, "validation", process_index=p, process_count=2, repeat=False)
        )
        assert batches[0]["inputs"].shape == (2, 256)  # 4 // 2 rows per process
        shares.append({doc for lane in range(2) for doc in lane_documents(batches, lane)})
        assert shares[p] == {texts[i] for i in perm[p::2]}  # a strided share
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(texts)


def test_bad_inputs_name_the_field(small_cfg, tmp_path):
    with pytest.raises(ValueError, match="data.global_batch_size=4 is not divisible by the 3"):
        make_batches(small_cfg, "train", process_index=0, process_count=3)
    with pytest.raises(ValueError, match="data.dataset='no_such_dataset_xyz'"):
        make_batches(
            dataclasses.replace(small_cfg, dataset="no_such_dataset_xyz"),
            "train",
            process_index=0,
            process_count=1,
        )
    with pytest.raises(ValueError, match="data.eval_split='test'"):
        make_batches(
            dataclasses.replace(small_cfg, eval_split="test"),
            "test",
            process_index=0,
            process_count=1,
        )
    with pytest.raises(ValueError, match="data.global_batch_size"):  # more lanes than documents
        make_batches(
            dataclasses.replace(small_cfg, global_batch_size=64),
            "validation",
            process_index=0,
            process_count=1,
        )
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ValueError, match="data.data_dir=.*writable directory"):
        make_batches(
            dataclasses.replace(small_cfg, data_dir=str(not_a_dir)),
            "train",
            process_index=0,
            process_count=1,
        )
    with pytest.raises(ValueError, match=r"data.dataset='mnist' is not prepared in data.data_dir"):
        make_batches(
            dataclasses.replace(small_cfg, dataset="mnist", data_dir=str(tmp_path)),
            "train",
            process_index=0,
            process_count=1,
        )


def test_process_info_defaults_to_jax(small_cfg):
    it = make_batches(small_cfg, "train")  # one CPU process: the whole global batch
    assert (it.process_index, it.process_count) == (0, 1)
    assert next(it)["inputs"].shape == (small_cfg.global_batch_size, small_cfg.seq_len)
