"""The model's batch format: packed rows of tokens -> inputs, targets and masks.

A packed row holds `row_len = seq_len + 1` tokens, filled with pieces of documents: each a
*segment* (ids 1, 2, ... within the row; 0 is padding) whose positions restart at 0, so
attention is masked to the segment and positions never run across documents. The model
reads `row[:-1]` and predicts `row[1:]`, so one row is one training example with no token
wasted on the shift. Every batch is a dict of NumPy arrays [B, seq_len]:

    inputs, targets, segment_ids, positions, domains   int32
    loss_mask                                          float32

`loss_mask[t]` is 1 exactly when input token t and target token t + 1 are in the same
segment: 0 on padding and at a segment boundary (where the target would start another
document or piece, unpredictable from this one). `domains` is the eval domain of each input
token and `PAD_DOMAIN` on padding, so `domains == d` counts real tokens only.
"""

from __future__ import annotations

import numpy as np

PAD_DOMAIN = -1


def to_model_batch(
    tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, domains: np.ndarray
) -> dict[str, np.ndarray]:
    """Packed rows [R, row_len] (int) -> the model's batch [R, row_len - 1]."""
    seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "positions": positions[:, :-1].astype(np.int32),
        "domains": np.where(seg_in != 0, domains[:, :-1], PAD_DOMAIN).astype(np.int32),
        "loss_mask": ((seg_in != 0) & (seg_in == seg_out)).astype(np.float32),
    }


def padding_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """A batch of the usual shapes that is all padding (loss_mask 0 everywhere)."""
    zeros = np.zeros((rows, seq_len + 1), np.int32)
    return to_model_batch(zeros, zeros, zeros, zeros)
