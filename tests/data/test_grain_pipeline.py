"""The grain pipeline on in-memory sources: batch format, packing invariants, mixture
proportions, exact resume, disjoint processes, evaluation passes and old states."""

import json

import numpy as np
import pytest

from moejax.data import ByteTokenizer, DataStateWarning
from moejax.data.model_batch import PAD_DOMAIN
from moejax.data.pipeline import (
    EvaluationBatches,
    Layout,
    TrainingBatches,
    evaluation_lanes,
    training_dataset,
)

TOKENIZER = ByteTokenizer()
KEYS = ("inputs", "targets", "segment_ids", "positions", "domains", "loss_mask")


class ListSource:
    """A random-access source over texts: the interface of `document_sources`."""

    def __init__(self, texts, domain=0):
        self.texts = list(texts)
        self.domain = domain

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"text": self.texts[i], "domain": self.domain}


def numbered_texts(prefix, n, rng, lo=5, hi=300):
    """Texts that name themselves ("<prefix><i>|"), of random lengths."""
    return [
        f"{prefix}{i}|" + "".join(rng.choice(list("abcdefgh \n"), rng.integers(lo, hi)))
        for i in range(n)
    ]


def train_batches(sources, weights=None, *, seq_len=32, rows=4, seed=0, **layout):
    lay = Layout(seq_len=seq_len, local_batch_size=rows, **layout)
    dataset = training_dataset(
        sources,
        weights or [1.0] * len(sources),
        TOKENIZER,
        list(range(len(sources))),
        lay,
        seed=seed,
        shuffle=True,
    )
    return TrainingBatches(dataset, lay, {"data.seed": seed})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def pieces(batch):
    """Every segment of every row as (its tokens, its domain). A row's last token is only a
    target: it belongs to the last input's segment when loss_mask says so, else it starts a
    segment of its own (the pad id 0 never occurs in a document), given the domain of the
    row's last input (one source per lane in these tests)."""
    out = []
    rows, length = batch["inputs"].shape
    for r in range(rows):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            piece = batch["inputs"][r, where]
            if where[-1] == length - 1 and batch["loss_mask"][r, -1]:
                piece = np.append(piece, batch["targets"][r, -1])
            out.append((piece, int(batch["domains"][r, where[0]])))
        if seg[-1] != 0 and not batch["loss_mask"][r, -1] and batch["targets"][r, -1] != 0:
            out.append((batch["targets"][r, -1:], int(batch["domains"][r, -1])))
    return out


def test_batch_format_and_loss_mask():
    rng = np.random.default_rng(0)
    batch = next(train_batches([ListSource(numbered_texts("a", 50, rng))]))
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        **{k: ("int32", (4, 32)) for k in KEYS if k != "loss_mask"},
        "loss_mask": ("float32", (4, 32)),
    }
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    seg = batch["segment_ids"]
    same = (seg[:, :-1] != 0) & (seg[:, :-1] == seg[:, 1:])
    np.testing.assert_array_equal(batch["loss_mask"][:, :-1] == 1, same)
    np.testing.assert_array_equal(batch["domains"] == PAD_DOMAIN, seg == 0)
    for r in range(4):  # positions restart at 0 in every segment
        for s in np.unique(seg[r][seg[r] > 0]):
            where = np.flatnonzero(seg[r] == s)
            np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(where)))


def test_packing_keeps_every_token_of_every_document_once():
    """One pass over a source of short and long documents: the packed pieces hold exactly the
    documents' tokens (cut where a row ends, nothing lost or repeated), one BOS per
    document, and padding only once a lane has run out."""
    rng = np.random.default_rng(1)
    texts = numbered_texts("d", 40, rng, lo=1, hi=120)
    lay = Layout(seq_len=16, local_batch_size=4)
    batches = list(
        EvaluationBatches([evaluation_lanes(ListSource(texts), TOKENIZER, 0, lay)], lay, 0)
    )
    found = [piece for batch in batches for piece, _ in pieces(batch)]
    assert all(len(piece) <= 17 for piece in found)
    expected = np.concatenate([TOKENIZER.encode(t) for t in texts])
    np.testing.assert_array_equal(
        np.bincount(np.concatenate(found), minlength=259), np.bincount(expected, minlength=259)
    )
    assert sum(int(piece[0] == 1) for piece in found) == len(texts)
    rows = sum(b["inputs"].shape[0] for b in batches)
    padding = sum(int((b["segment_ids"] == 0).sum()) for b in batches) / (rows * 16)
    assert padding < 0.25  # rows are full until a lane runs out (4 lanes, 40 documents)


def test_mixture_proportions_match_the_weights():
    """10k one-row documents from two sources weighted 0.7 / 0.3: the shares are within 2%."""
    row = 32
    text_a, text_b = "a" * (row - 1), "b" * (row - 1)  # BOS + 31 bytes + EOS = one row
    # grain's index_shuffle is slow on tiny sources (ms per index below ~100 documents)
    sources = [ListSource([text_a] * 1500, domain=0), ListSource([text_b] * 1300, domain=0)]
    batches = train_batches(sources, [0.7, 0.3], seq_len=row, rows=50)
    counts = np.zeros(2)
    for batch in take(batches, 200):
        counts += np.bincount(batch["domains"][:, 0], minlength=2)
    assert counts.sum() == 10_000
    np.testing.assert_allclose(counts / counts.sum(), [0.7, 0.3], atol=0.02)


def test_resume_is_exact_at_every_step_and_across_epochs():
    """The state, through JSON as in a checkpoint, resumes exactly at every one of the
    first steps (a row may end inside a document or hold a remainder) and past the epoch
    of the small source."""
    rng = np.random.default_rng(2)
    sources = [ListSource(numbered_texts("x", 30, rng)), ListSource(numbered_texts("y", 7, rng))]
    reference = train_batches(sources, [2.0, 1.0])
    for step in range(16):
        state = json.loads(json.dumps(reference.get_state()))
        expected = take(reference, 3 if step < 15 else 20)
        resumed = train_batches(sources, [2.0, 1.0])
        resumed.set_state(state)
        assert_same(take(resumed, len(expected)), expected)
        reference.set_state(state)  # the reference resumes too, and continues one step
        take(reference, 1)


def test_seed_changes_the_order_and_epochs_reshuffle():
    rng = np.random.default_rng(3)
    source = ListSource(numbered_texts("s", 20, rng, lo=40, hi=60))
    first = take(train_batches([source], seed=0), 3)
    again = take(train_batches([source], seed=0), 3)
    other = take(train_batches([source], seed=1), 3)
    assert_same(first, again)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def documents_read(batches, n):
    names = set()
    for batch in take(batches, n):
        for piece, _ in pieces(batch):
            if piece[0] == 1:
                names.add(TOKENIZER.decode(piece).split("|")[0])
    return names


def test_two_processes_read_the_rows_of_one_in_disjoint_shares():
    """Row b of process p is lane b * P + p: two processes' rows are the one-process batch's
    rows, interleaved, and they read disjoint documents."""
    rng = np.random.default_rng(4)
    source = ListSource(numbered_texts("p", 400, rng, lo=10, hi=40))
    single = take(train_batches([source], rows=4), 6)
    shares = [
        take(train_batches([source], rows=2, process_index=p, process_count=2), 6) for p in range(2)
    ]
    for p in range(2):
        for one, mine in zip(single, shares[p]):
            for key in KEYS:
                np.testing.assert_array_equal(one[key][p::2], mine[key], err_msg=key)
    names = [documents_read(iter(share), len(share)) for share in shares]
    assert names[0] and names[1] and not names[0] & names[1]


def test_a_lane_pipeline_state_restarts_with_a_warning():
    rng = np.random.default_rng(5)
    source = ListSource(numbered_texts("w", 30, rng))
    fresh = take(train_batches([source]), 2)
    batches = train_batches([source])
    with pytest.warns(DataStateWarning, match="format 1"):
        batches.set_state({"format": 1, "lanes": [[0, 3, 10]]})
    assert_same(take(batches, 2), fresh)


def test_a_state_saved_under_other_settings_names_the_field():
    rng = np.random.default_rng(6)
    source = ListSource(numbered_texts("f", 30, rng))
    state = train_batches([source], seed=0).get_state()
    with pytest.raises(ValueError, match=r"data.seed=0 but this run has 1"):
        train_batches([source], seed=1).set_state(state)


def test_evaluation_reads_each_source_once_in_order_and_pads_the_last_batch():
    rng = np.random.default_rng(7)
    sources = [ListSource(numbered_texts("e", 9, rng), 0), ListSource(numbered_texts("f", 5, rng))]
    lay = Layout(seq_len=32, local_batch_size=4)

    def run(max_batches=0):
        lanes = [evaluation_lanes(s, TOKENIZER, d, lay) for d, s in enumerate(sources)]
        return list(EvaluationBatches(lanes, lay, max_batches))

    first, second = run(), run()
    assert_same(first, second)
    tokens = {d: 0 for d in range(2)}
    for batch in first:
        assert batch["inputs"].shape == (4, 32)
        for piece, domain in pieces(batch):
            tokens[domain] += len(piece)
    for d, source in enumerate(sources):
        assert tokens[d] == sum(len(TOKENIZER.encode(t)) for t in source.texts)
    domains = [set(np.unique(b["domains"][b["domains"] >= 0])) for b in first]
    assert domains[0] == {0} and domains[-1] == {1}  # source after source
    assert len(run(max_batches=1)) == 2


@pytest.mark.slow  # starts grain worker processes; the in-process resume is the fast case
def test_worker_processes_resume_exactly():
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags in the workers
    rng = np.random.default_rng(8)
    source = ListSource(numbered_texts("w", 2000, rng))
    lay = Layout(seq_len=32, local_batch_size=4)

    def make():
        dataset = training_dataset(
            [source], [1.0], TOKENIZER, [0], lay, seed=0, shuffle=True, worker_count=2
        )
        return TrainingBatches(dataset, lay, {})

    reference = make()
    take(reference, 3)
    state = json.loads(json.dumps(reference.get_state()))
    expected = take(reference, 4)
    resumed = make()
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected)
    reference.close()
    resumed.close()
