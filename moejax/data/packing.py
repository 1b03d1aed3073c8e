"""Greedy packing of tokenized documents into fixed-length rows, in pure NumPy.

A row holds `row_len = seq_len + 1` tokens: the model reads `row[:-1]` and predicts
`row[1:]`, so one row is one training example with no token wasted on the shift. Rows are
filled left to right with whole documents, each a new *segment* (ids 1, 2, ... within the
row; 0 is padding) whose positions restart at 0, so attention can be masked to the segment
and position embeddings never run across documents. The rule for the next document (or the
remaining tail of one):

- it fits in the space left in the row: append it;
- it would fit in an empty row but not in this one: close this row with padding and start
  the next row with it, so short documents are never cut;
- it is longer than a row: fill the space left with its head, and continue with the tail
  in the next row as a new segment (positions restart at 0 there too).

Packing reads documents through a `TokenCursor`, the interface the resumable input
pipeline implements over its shuffled reading order; `pack_documents` does the same for an
in-memory list, which the tests check by hand.

`to_batch` derives the model inputs. `loss_mask[t]` is 1 exactly when input token t and
target token t + 1 are in the same segment: 0 on padding and at a document boundary (where
the target would be the next document's BOS, unpredictable from this document).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

PAD_DOMAIN = -1  # domain id on padding, so `domains == d` counts real tokens only


class TokenCursor(Protocol):
    """A reading position in a stream of tokenized documents."""

    def remaining(self) -> tuple[np.ndarray, int] | None:
        """Unconsumed tokens of the current document and its domain id; None at the end."""

    def consume(self, n: int) -> None:
        """Marks the next `n` tokens of the current document as read (moving on at its end)."""


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of packed tokens, every array int32[R, row_len]."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    domains: np.ndarray

    @classmethod
    def empty(cls, num_rows: int, row_len: int) -> "PackedRows":
        """All-padding rows."""
        shape = (num_rows, row_len)
        return cls(
            np.zeros(shape, np.int32),
            np.zeros(shape, np.int32),
            np.zeros(shape, np.int32),
            np.full(shape, PAD_DOMAIN, np.int32),
        )

    def to_batch(self) -> dict[str, np.ndarray]:
        """Model inputs, each [R, row_len - 1]: inputs/targets/segment_ids/positions/domains
        (int32) and loss_mask (float32)."""
        seg_in, seg_out = self.segment_ids[:, :-1], self.segment_ids[:, 1:]
        return {
            "inputs": self.tokens[:, :-1],
            "targets": self.tokens[:, 1:],
            "segment_ids": seg_in,
            "positions": self.positions[:, :-1],
            "domains": self.domains[:, :-1],
            "loss_mask": ((seg_in != 0) & (seg_in == seg_out)).astype(np.float32),
        }


def fill_row(cursor: TokenCursor, rows: PackedRows, r: int) -> int:
    """Packs documents from `cursor` into row `r` of `rows` (which must be all padding).

    Returns the number of real tokens written; 0 means the cursor was already at its end.
    """
    row_len = rows.tokens.shape[1]
    filled, segment = 0, 0
    while filled < row_len:
        item = cursor.remaining()
        if item is None:
            break
        tokens, domain = item
        space = row_len - filled
        if len(tokens) > space and filled > 0 and len(tokens) <= row_len:
            break  # a short document: start it in the next row rather than cut it
        take = min(len(tokens), space)
        segment += 1
        end = filled + take
        rows.tokens[r, filled:end] = tokens[:take]
        rows.segment_ids[r, filled:end] = segment
        rows.positions[r, filled:end] = np.arange(take, dtype=np.int32)
        rows.domains[r, filled:end] = domain
        cursor.consume(take)
        filled = end
    return filled


class ListCursor:
    """A `TokenCursor` over an in-memory sequence of (tokens, domain) documents."""

    def __init__(self, documents: Iterable[tuple[Sequence[int] | np.ndarray, int]]):
        self._docs = [(np.asarray(t, np.int32), int(d)) for t, d in documents]
        self._index = 0
        self._offset = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._docs) and self._offset >= len(self._docs[self._index][0]):
            self._index += 1
            self._offset = 0

    def remaining(self) -> tuple[np.ndarray, int] | None:
        if self._index >= len(self._docs):
            return None
        tokens, domain = self._docs[self._index]
        return tokens[self._offset :], domain

    def consume(self, n: int) -> None:
        self._offset += n
        self._skip_empty()


def pack_documents(
    documents: Iterable[tuple[Sequence[int] | np.ndarray, int]], row_len: int
) -> PackedRows:
    """Packs every document into as many rows as needed (the last one padded)."""
    if row_len < 2:
        raise ValueError(f"row_len must be >= 2 (seq_len + 1), got {row_len}.")
    cursor = ListCursor(documents)
    rows = []
    while True:
        row = PackedRows.empty(1, row_len)
        if fill_row(cursor, row, 0) == 0:
            break
        rows.append(row)
    if not rows:
        return PackedRows.empty(0, row_len)
    return PackedRows(
        *(
            np.concatenate([getattr(r, f.name) for r in rows])
            for f in dataclasses.fields(PackedRows)
        )
    )
