"""Greedy packing: a hand-worked example and invariants on random documents."""

import numpy as np
import pytest

from moejax.data import PAD_DOMAIN, pack_documents

# Four documents (BOS=1 ... EOS=2) packed into rows of 6 tokens (seq_len 5).
DOCS = [
    ([1, 10, 11, 2], 0),  # A: fits row 0
    ([1, 20, 2], 1),  # B: 3 > 2 left in row 0 -> starts row 1
    ([1, 30, 31, 32, 33, 34, 35, 2], 2),  # C: longer than a row -> 3 in row 1, 5 in row 2
    ([1, 40, 2], 1),  # D: 3 > 1 left in row 2 -> row 3
]


def test_hand_worked_example():
    rows = pack_documents(DOCS, row_len=6)
    np.testing.assert_array_equal(
        rows.tokens,
        [
            [1, 10, 11, 2, 0, 0],
            [1, 20, 2, 1, 30, 31],
            [32, 33, 34, 35, 2, 0],
            [1, 40, 2, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(
        rows.segment_ids,
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 2, 2, 2],
            [1, 1, 1, 1, 1, 0],  # C's continuation is a new segment
            [1, 1, 1, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(
        rows.positions,
        [
            [0, 1, 2, 3, 0, 0],
            [0, 1, 2, 0, 1, 2],
            [0, 1, 2, 3, 4, 0],  # positions restart for the continuation
            [0, 1, 2, 0, 0, 0],
        ],
    )
    p = PAD_DOMAIN
    np.testing.assert_array_equal(
        rows.domains,
        [
            [0, 0, 0, 0, p, p],
            [1, 1, 1, 2, 2, 2],
            [2, 2, 2, 2, 2, p],
            [1, 1, 1, p, p, p],
        ],
    )
    batch = rows.to_batch()
    np.testing.assert_array_equal(batch["inputs"], rows.tokens[:, :-1])
    np.testing.assert_array_equal(batch["targets"], rows.tokens[:, 1:])
    np.testing.assert_array_equal(
        batch["loss_mask"],
        [
            [1, 1, 1, 0, 0],  # EOS -> pad: masked
            [1, 1, 0, 1, 1],  # B's EOS -> C's BOS: masked at the boundary
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0],
        ],
    )
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "inputs": ("int32", (4, 5)),
        "targets": ("int32", (4, 5)),
        "segment_ids": ("int32", (4, 5)),
        "positions": ("int32", (4, 5)),
        "domains": ("int32", (4, 5)),
        "loss_mask": ("float32", (4, 5)),
    }


@pytest.mark.parametrize("row_len", [2, 7, 33, 257])
def test_invariants_on_random_documents(row_len):
    rng = np.random.default_rng(row_len)
    docs = []
    for i in range(60):
        n = int(rng.integers(0, 3 * row_len))
        docs.append((np.concatenate([[1], rng.integers(3, 259, n), [2]]).astype(np.int32), i % 3))
    rows = pack_documents(docs, row_len)
    real = rows.segment_ids != 0

    # Every token of every document appears exactly once, in order.
    np.testing.assert_array_equal(rows.tokens[real], np.concatenate([d for d, _ in docs]))
    assert (rows.tokens[~real] == 0).all() and (rows.domains[~real] == PAD_DOMAIN).all()
    # Each domain's token count is preserved.
    for domain in range(3):
        expected = sum(len(d) for d, dom in docs if dom == domain)
        assert (rows.domains == domain).sum() == expected

    for r in range(rows.tokens.shape[0]):
        seg = rows.segment_ids[r]
        n_real = int(real[r].sum())
        assert real[r, :n_real].all() and not real[r, n_real:].any()  # padding only at the end
        assert seg[0] == 1 and (np.diff(seg[:n_real]) >= 0).all()
        assert (np.diff(seg[:n_real]) <= 1).all()  # ids count up 1, 2, ...
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(rows.positions[r, idx], np.arange(len(idx)))
            assert len(set(rows.domains[r, idx])) == 1

    # Segments, in order, are the documents: a document that fits in a row is exactly one
    # segment (never cut); a longer one is a run of segments, each but the first starting a row.
    segments = [
        (r, rows.tokens[r][rows.segment_ids[r] == s])
        for r in range(len(rows.tokens))
        for s in range(1, rows.segment_ids[r].max() + 1)
    ]
    k = 0
    for doc, _ in docs:
        if len(doc) <= row_len:
            np.testing.assert_array_equal(segments[k][1], doc)
            k += 1
        else:
            pieces = []
            while sum(map(len, pieces)) < len(doc):
                if pieces:
                    assert (
                        rows.positions[segments[k][0], 0] == 0
                        and rows.segment_ids[segments[k][0], 0] == 1
                    )
                pieces.append(segments[k][1])
                k += 1
            np.testing.assert_array_equal(np.concatenate(pieces), doc)
    assert k == len(segments)

    # loss_mask is 0 exactly where the input is padding or the target is in another segment.
    batch = rows.to_batch()
    seg_in, seg_out = rows.segment_ids[:, :-1], rows.segment_ids[:, 1:]
    boundary = (seg_in != seg_out) & (seg_out != 0)
    np.testing.assert_array_equal(batch["loss_mask"] == 0, (seg_in == 0) | (seg_out != seg_in))
    assert (batch["loss_mask"][boundary] == 0).all()
    assert (batch["targets"][batch["loss_mask"] == 1] != 0).all()


def test_empty_and_invalid():
    assert pack_documents([], 8).tokens.shape == (0, 8)
    with pytest.raises(ValueError, match="row_len"):
        pack_documents(DOCS, 1)
