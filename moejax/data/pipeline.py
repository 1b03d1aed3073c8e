"""The input pipeline on grain: weighted mixing, per-epoch shuffling, per-process shards,
packing into rows and a checkpointable iterator (grain: github.com/google/grain).

The documents of the training mixture form one stream, built from grain datasets:

    MapDataset.source(s).shuffle(seed_s).repeat()   source s: a new permutation each epoch
        .map(Tokenize)                              {"tokens", "domains"} int32[n]
    MapDataset.mix(sources, weights)                exact proportions w_s / sum(w)

The G = data.global_batch_size rows of a step come from G *lanes*: lane g reads positions
g, g + G, g + 2G, ... of the stream (`mixed[g::G]`) and packs them into rows on its own:

    mixed[g::G].to_iter_dataset()
    ConcatThenSplitIterDataset(row_len)             documents end to end, cut into rows;
                                                    segment ids, positions restarting in
                                                    every row a document enters
    ZipIterDataset(this process's lanes) -> ModelBatch   inputs/targets/... [B, seq_len]

Row b of process p is lane b * P + p, so each process reads its own documents (disjoint
from the other processes'), every batch mixes up to G documents instead of G consecutive
rows of one long document (router load statistics would swing step to step), and the rows
of a step do not depend on the number of processes: P processes train on the global batch
one process would read. A row holds `row_len = seq_len + 1` tokens: the model reads
`row[:-1]` and predicts `row[1:]`. Rows are full: a document that does not fit in the
space left is cut there and continues in the next row as a new segment whose positions
restart at 0, so no token is dropped or padded until a lane runs out (evaluation). The
pipeline before grain did the same, except that it moved a document that fits in an empty
row to the next row instead of cutting it (0.06% padding on the corpus; now none). `seed_s`
is drawn from (data.seed, s), so adding a source does not reshuffle the others.

Evaluation reads each source's held-out documents in stored order, unshuffled and
unrepeated, through the same lanes, one source after the other (at most `max_batches`
batches of each); a lane that has run out gives padding rows (loss_mask 0) until every lane
of that source is done.

The iterator's state is grain's, one small dict per lane (the mixture index and where the
packer last had at most one document in hand), wrapped with the settings that fix the
reading order; `set_state` re-reads from there and packs forward, so a resumed run reads
exactly the rows the uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_experimental

from moejax.data.errors import DataError
from moejax.data.model_batch import padding_batch, to_model_batch

STATE_FORMAT = 2
# The iterator state written by the hand-written lane pipeline, before grain.
LANE_STATE_FORMAT = 1
# Documents are read and tokenized in this thread (or in grain workers, data.worker_count):
# grain's default of 16 reader threads and 500 prefetched documents costs more in
# bookkeeping than tokenizing costs here, and competes with XLA for the host's cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Random streams are derived from (data.seed, purpose, source); the one purpose today:
_SHUFFLE_SOURCE = 1


def _grain_state(saved: Any) -> Any:
    """A grain iterator state read back from JSON: ConcatThenSplit compares its
    `remainder_slices` with the tuple (-1, -1), and JSON gives lists."""
    if isinstance(saved, dict):
        return {
            key: (
                {k: tuple(v) for k, v in value.items()}
                if key == "remainder_slices"
                else _grain_state(value)
            )
            for key, value in saved.items()
        }
    if isinstance(saved, list):
        return [_grain_state(value) for value in saved]
    return saved


class DataStateWarning(UserWarning):
    """A checkpoint's data position could not be used as it is."""


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
    """A source record -> {"tokens": int32[n], "domains": int32[n]} (global domain ids).

    Text records are encoded with BOS/EOS; pre-tokenized records (`"tokens"`) are kept.
    """

    tokenizer: Any
    domain_offset: int

    def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if "tokens" in record:
            tokens = np.asarray(record["tokens"], np.int32)
        else:
            text = record["text"]
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            tokens = np.asarray(self.tokenizer.encode(text), np.int32)
        domain = self.domain_offset + int(record.get("domain", 0))
        return {"tokens": tokens, "domains": np.full(tokens.shape, domain, np.int32)}


def derived_seed(seed: int, *path: int) -> int:
    """A seed in [0, 2^32) for one random stream of the pipeline, independent of the others:
    source s shuffles with (seed, 1, s)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def _lane_rows(documents: grain.MapDataset, row_len: int) -> grain.IterDataset:
    """One lane: its documents (tokenized) concatenated and split into rows."""
    return grain_experimental.ConcatThenSplitIterDataset(
        documents.to_iter_dataset(_READ_OPTIONS),
        length_struct={"tokens": row_len, "domains": row_len},
    )


def _stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One packed row per lane -> the model batch of those rows."""
    return to_model_batch(
        np.stack([r["tokens"] for r in rows]),
        np.stack([r["tokens_segment_ids"] for r in rows]),
        np.stack([r["tokens_positions"] for r in rows]),
        np.stack([r["domains"] for r in rows]),
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """How rows are cut and which lanes this process reads."""

    seq_len: int
    local_batch_size: int
    process_index: int = 0
    process_count: int = 1

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def num_lanes(self) -> int:
        return self.local_batch_size * self.process_count

    @property
    def lanes(self) -> list[int]:
        """This process's lanes: row b reads lane b * P + p."""
        return [b * self.process_count + self.process_index for b in range(self.local_batch_size)]


def training_dataset(
    sources: Sequence[Any],
    weights: Sequence[float],
    tokenizer: Any,
    domain_offsets: Sequence[int],
    layout: Layout,
    *,
    seed: int,
    shuffle: bool,
    worker_count: int = 0,
) -> grain.IterDataset:
    """This process's endless training batches (see the module docstring); with
    `worker_count`, grain worker processes read, tokenize and pack."""
    streams = []
    for index, (source, offset) in enumerate(zip(sources, domain_offsets)):
        docs = grain.MapDataset.source(source)
        if shuffle:
            docs = docs.shuffle(seed=derived_seed(seed, _SHUFFLE_SOURCE, index))
        streams.append(docs.repeat().map(Tokenize(tokenizer, offset)))
    mixed = grain.MapDataset.mix(streams, list(weights)) if len(streams) > 1 else streams[0]
    lanes = [_lane_rows(mixed[g :: layout.num_lanes], layout.row_len) for g in layout.lanes]
    batches = grain_experimental.ZipIterDataset(lanes).map(_stack)
    if worker_count:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return batches


def evaluation_lanes(
    source: Any, tokenizer: Any, domain_offset: int, layout: Layout
) -> list[grain.IterDataset]:
    """This process's lanes over one source's held-out documents, in stored order."""
    docs = grain.MapDataset.source(source).map(Tokenize(tokenizer, domain_offset))
    return [_lane_rows(docs[g :: layout.num_lanes], layout.row_len) for g in layout.lanes]


class TrainingBatches:
    """This process's endless batches, with a JSON state that resumes them exactly.

    `fingerprint` holds the settings that fix the reading order ({field: value}, named as on
    the command line); `set_state` refuses a state saved under other values."""

    def __init__(self, dataset: grain.IterDataset, layout: Layout, fingerprint: dict[str, Any]):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.layout = layout
        self.fingerprint = dict(fingerprint)

    def __iter__(self) -> "TrainingBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def padding_batch(self) -> dict[str, np.ndarray]:
        return padding_batch(self.layout.local_batch_size, self.layout.seq_len)

    def close(self) -> None:
        """Stops grain's worker processes, if any (the iterator cannot be used after)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; `set_state` on a new iterator resumes from it."""
        return {
            "format": STATE_FORMAT,
            "settings": self.fingerprint,
            "lanes": self.layout.lanes,
            "grain": self._iterator.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state`. A state of the lane pipeline (before grain) cannot be
        translated: the iterator starts from the beginning, with a `DataStateWarning`."""
        found = state.get("format")
        if found == LANE_STATE_FORMAT:
            warnings.warn(
                "The checkpoint's data position was saved by the pipeline before grain "
                "(iterator state format 1), which read documents in another order; it cannot "
                "be translated, so the training data restarts from its first batch. Model "
                "and optimizer state are restored as saved.",
                DataStateWarning,
                stacklevel=2,
            )
            self.close()
            self._iterator = iter(self._dataset)
            return
        if found != STATE_FORMAT:
            raise ValueError(
                f"Unknown data iterator state format {found!r}; expected {STATE_FORMAT}."
            )
        saved = state.get("settings", {})
        for field, mine in self.fingerprint.items():
            theirs = saved.get(field)
            if json.dumps(theirs) != json.dumps(mine):
                raise ValueError(
                    f"Cannot resume the data iterator: it was saved with {field}={theirs!r} "
                    f"but this run has {mine!r}. Resume with the same {field} as the saved run."
                )
        self.close()
        iterator = iter(self._dataset)
        iterator.set_state(_grain_state(state["grain"]))
        self._iterator = iterator


class EvaluationBatches:
    """One pass over every source's held-out documents, source after source, each capped at
    `max_batches` batches (0: all). A lane that has run out gives padding rows until every
    lane of the source is done."""

    def __init__(
        self, sources: Sequence[Sequence[grain.IterDataset]], layout: Layout, max_batches: int
    ):
        self._sources = [list(lanes) for lanes in sources]
        self.layout = layout
        self.max_batches = max_batches
        self._batches = self._chain()

    def _source_batches(
        self, lanes: Sequence[grain.IterDataset]
    ) -> Iterator[dict[str, np.ndarray]]:
        iterators = [iter(lane) for lane in lanes]
        zeros = np.zeros(self.layout.row_len, np.int32)  # a padding row: segment id 0
        empty = dict.fromkeys(
            ("tokens", "tokens_segment_ids", "tokens_positions", "domains"), zeros
        )
        count = 0
        while not self.max_batches or count < self.max_batches:
            rows = [next(it, None) for it in iterators]
            if all(row is None for row in rows):
                return
            yield _stack([empty if row is None else row for row in rows])
            count += 1

    def _chain(self) -> Iterator[dict[str, np.ndarray]]:
        for lanes in self._sources:
            yield from self._source_batches(lanes)

    def __iter__(self) -> "EvaluationBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._batches)

    def padding_batch(self) -> dict[str, np.ndarray]:
        return padding_batch(self.layout.local_batch_size, self.layout.seq_len)

    def get_state(self) -> dict[str, Any]:
        raise DataError("Evaluation batches are read in one pass and have no state to save.")

    def set_state(self, state: dict[str, Any]) -> None:
        raise DataError("Evaluation batches are read in one pass and cannot be resumed.")
