"""`PackedBatches`: the deterministic, resumable, per-process iterator over packed documents.

It reads a `reader.DocumentReader` (`datasets.make_batches` opens one for the datasets read
from disk) and yields this process's share of each global batch as NumPy arrays
(B = global_batch_size // process_count rows, L = seq_len):

    inputs, targets, segment_ids, positions, domains   int32[B, L]
    loss_mask                                          float32[B, L]

Reading order. Epoch e visits the documents of the split in a permutation drawn from
`np.random.default_rng((seed, e))` (a pair, not `seed + e`, so runs with seeds 0 and 1 do
not share epochs shifted by one). The G = global_batch_size rows of a step come from G
*lanes*: lane g reads positions g, g + G, g + 2G, ... of each epoch's permutation and packs
them into rows on its own (`packing.py`). Row b of process p is lane b * P + p, so process p
reads positions p, p + P, ... — a strided share, disjoint from the other processes' — and
every batch mixes up to G different documents instead of G consecutive rows of one long
document (one domain per batch would make router load statistics swing step to step).

Resuming. A lane's position is (epoch, index in its share, tokens already consumed of that
document): three ints. Rows are closed eagerly, so between batches nothing else is
buffered, and `get_state()` is a small JSON-serialisable dict. A new iterator given that
state with `set_state` re-reads the current document and continues bit-identically,
mid-epoch, mid-document and across epoch boundaries. The state is independent of seq_len.
Lanes move on to the next epoch independently, so near an epoch boundary one batch can
mix the end of epoch e with the start of e + 1; every epoch still reads each document once.

`repeat=False` (evaluation) stops at the end of the split; lanes that finish early give
padding rows (loss_mask 0) until the last lane is done. Lanes hold different amounts of
text, so processes can produce different numbers of eval batches: a multi-process
evaluation loop must agree on a stopping step (e.g. run until every process is done,
feeding `padding_batch()` once its own iterator is exhausted).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moejax.data.errors import DataError
from moejax.data.packing import PackedRows, fill_row
from moejax.data.reader import DocumentReader

STATE_FORMAT = 1


class _Lane:
    """One row slot's reading position; a `packing.TokenCursor`."""

    def __init__(self, owner: "PackedBatches", lane_id: int):
        self._owner = owner
        self.lane_id = lane_id
        self.epoch, self.index, self.offset = 0, 0, 0
        self._cached: tuple[tuple[int, int], np.ndarray, int] | None = None
        n, g = owner.num_documents, owner.num_lanes
        self.share_len = max(0, -(-(n - lane_id) // g))  # len(range(lane_id, n, g))

    def remaining(self) -> tuple[np.ndarray, int] | None:
        if self.index >= self.share_len:
            if not self._owner.repeat or self.share_len == 0:
                return None
            self.epoch, self.index, self.offset = self.epoch + 1, 0, 0
        key = (self.epoch, self.index)
        if self._cached is None or self._cached[0] != key:
            position = self.lane_id + self.index * self._owner.num_lanes
            doc = self._owner.document_index(self.epoch, position)
            self._cached = (key, *self._owner.reader.tokens(doc))
        _, tokens, domain = self._cached
        return tokens[self.offset :], domain

    def consume(self, n: int) -> None:
        self.offset += n
        if self._cached is not None and self.offset >= len(self._cached[1]):
            self.index, self.offset = self.index + 1, 0


class PackedBatches:
    """Iterator of packed batches for one process; see the module docstring."""

    def __init__(
        self,
        reader: DocumentReader,
        *,
        seq_len: int,
        local_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        repeat: bool = True,
    ):
        self.reader = reader
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.repeat = repeat
        self.num_documents = len(reader)
        self.num_lanes = local_batch_size * process_count
        if repeat and self.num_documents < self.num_lanes:
            raise DataError(
                f"{reader.name} has {self.num_documents} documents, but data.global_batch_size="
                f"{self.num_lanes} reads one document stream per row and needs at least that "
                "many. Lower --config.data.global_batch_size or enlarge the corpus "
                "(data.max_bytes_per_domain)."
            )
        self._permutations: dict[int, np.ndarray] = {}
        self._lanes = [
            _Lane(self, b * process_count + process_index) for b in range(local_batch_size)
        ]

    def document_index(self, epoch: int, position: int) -> int:
        """The document at `position` of epoch `epoch`'s reading order."""
        if not self.shuffle:
            return position
        if epoch not in self._permutations:
            oldest = min(lane.epoch for lane in self._lanes)
            for stale in [e for e in self._permutations if e < oldest]:
                del self._permutations[stale]  # lanes never go back to an earlier epoch
            rng = np.random.default_rng((self.seed, epoch))
            self._permutations[epoch] = rng.permutation(self.num_documents)
        return int(self._permutations[epoch][position])

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = PackedRows.empty(self.local_batch_size, self.seq_len + 1)
        written = [fill_row(lane, rows, r) for r, lane in enumerate(self._lanes)]
        if not any(written):
            raise StopIteration
        return rows.to_batch()

    def padding_batch(self) -> dict[str, np.ndarray]:
        """A batch of the usual shapes that is all padding (loss_mask 0 everywhere)."""
        return PackedRows.empty(self.local_batch_size, self.seq_len + 1).to_batch()

    def get_state(self) -> dict[str, Any]:
        """A small JSON-serialisable snapshot; `set_state` on a new iterator resumes from it."""
        return {
            "format": STATE_FORMAT,
            "source": self.reader.name,
            "num_documents": self.num_documents,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "lanes": [[lane.epoch, lane.index, lane.offset] for lane in self._lanes],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state`; raises if it was saved for a different reading order."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"Unknown data iterator state format {state.get('format')!r}; "
                f"expected {STATE_FORMAT}."
            )
        checks = [
            ("source", self.reader.name, "data.dataset / data.train_split / data.eval_split"),
            ("num_documents", self.num_documents, "data.dataset / data.max_bytes_per_domain"),
            ("seed", self.seed, "data.seed"),
            ("shuffle", self.shuffle, "data.shuffle"),
            ("process_count", self.process_count, "the number of processes"),
            ("process_index", self.process_index, "the process index"),
        ]
        for key, mine, field in checks:
            if state.get(key) != mine:
                raise ValueError(
                    f"Cannot resume the data iterator: it was saved with {key}={state.get(key)!r} "
                    f"but this one has {mine!r}. Resume with the same {field} as the saved run."
                )
        lanes = state.get("lanes", [])
        if len(lanes) != len(self._lanes):
            raise ValueError(
                f"Cannot resume the data iterator: it was saved with {len(lanes)} rows per "
                f"process but this one has {len(self._lanes)}. Resume with the same "
                "data.global_batch_size and number of processes as the saved run."
            )
        for lane, (epoch, index, offset) in zip(self._lanes, lanes):
            lane.epoch, lane.index, lane.offset = int(epoch), int(index), int(offset)
        self._permutations.clear()
