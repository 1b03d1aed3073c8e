"""The input pipeline on grain: weighted mixing, per-epoch shuffling, per-process sharding,
first-fit packing and a checkpointable iterator (grain: github.com/google/grain).

Training reads, for each source s (a random-access `DocumentSource`, weight w_s):

    MapDataset.source(s).shuffle(seed_s).repeat()   a new permutation every epoch
        .map(Tokenize)                              {"tokens", "domains"} int32[n]
    MapDataset.mix(sources, weights)                exact proportions w_s / sum(w)
        [process_index::process_count]              disjoint documents per process
    -> to_iter_dataset()
    FlatMapIterDataset(SplitLong(row_len))          pieces of at most row_len tokens
    WindowShuffleIterDataset(window)                pieces of one long document spread
                                                    over many batches
    FirstFitPackIterDataset(row_len, bins)          first-fit packing with segment ids
                                                    and positions restarting per piece
    .batch(local_batch_size) -> ModelBatch          inputs/targets/... [B, seq_len]

`seed_s` is drawn from (data.seed, s), so adding a source does not reshuffle the others.
A row holds `row_len = seq_len + 1` tokens: the model reads `row[:-1]` and predicts
`row[1:]`. Documents longer than a row are cut into row-sized pieces (each a segment whose
positions restart at 0), so no token is dropped; the window shuffle then scatters those
pieces, so one long document does not fill whole batches (router load statistics would
swing step to step). Packing is grain's first-fit over `data.packing_bins` bins: a piece
goes into the first bin with room, and all bins are emitted when one does not fit.

Evaluation reads each source's held-out documents in stored order, unshuffled and
unrepeated, packed the same way, one source after the other (at most `max_batches` batches
of each); the last batch of a source is topped up with padding rows (loss_mask 0).

The iterator's state is grain's (a few ints per stage: the mixture index, the window
start, the packer's row counters), wrapped with the settings that fix the reading order;
`set_state` re-reads the current window and packs forward, so a resumed run reads exactly
the rows the uninterrupted run would have read.
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
from moejax.data.model_batch import pad_rows, padding_batch, to_model_batch

STATE_FORMAT = 2
# The iterator state written by the hand-written lane pipeline, before grain.
LANE_STATE_FORMAT = 1
# A piece count no real document reaches (grain's FlatMap asks for a bound).
_MAX_PIECES = 1 << 24
# Documents are read and tokenized in this thread (or in grain workers, data.worker_count):
# grain's default of 16 reader threads and 500 prefetched documents costs more in
# bookkeeping than tokenizing costs here, and competes with XLA for the host's cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Random streams are derived from (data.seed, purpose[, source]); purposes:
_SHUFFLE_SOURCE, _SHUFFLE_WINDOW = 1, 2


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


@dataclasses.dataclass(frozen=True)
class SplitLong(grain_experimental.FlatMapTransform):
    """A tokenized document -> consecutive pieces of at most `row_len` tokens."""

    row_len: int
    max_fan_out: int = _MAX_PIECES

    def flat_map(self, element: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(element["tokens"])
        return [
            {key: value[i : i + self.row_len] for key, value in element.items()}
            for i in range(0, n, self.row_len)
        ]


def derived_seed(seed: int, *path: int) -> int:
    """A seed in [0, 2^32) for one random stream of the pipeline, independent of the others:
    source s shuffles with (seed, 1, s), the piece window with (seed, 2)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def _pack(
    pieces: grain.IterDataset, row_len: int, bins: int, rows: int, drop_remainder: bool
) -> grain.IterDataset:
    packed = grain_experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={"tokens": row_len, "domains": row_len},
        num_packing_bins=bins,
        shuffle_bins=False,
    )
    return packed.batch(rows, drop_remainder=drop_remainder).map(_model_batch)


def _model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed rows (feature, feature_segment_ids, feature_positions) -> model batch."""
    return to_model_batch(
        packed["tokens"],
        packed["tokens_segment_ids"],
        packed["tokens_positions"],
        packed["domains"],
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """How rows are cut and packed: the settings both readers share."""

    seq_len: int
    local_batch_size: int
    packing_bins: int  # 0 -> 2 x local_batch_size
    process_index: int = 0
    process_count: int = 1

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def bins(self) -> int:
        return self.packing_bins or 2 * self.local_batch_size


def training_dataset(
    sources: Sequence[Any],
    weights: Sequence[float],
    tokenizer: Any,
    domain_offsets: Sequence[int],
    layout: Layout,
    *,
    seed: int,
    shuffle: bool,
    shuffle_window: int,
    worker_count: int = 0,
) -> grain.IterDataset:
    """The endless training stream of this process (see the module docstring); with
    `worker_count`, grain worker processes read, tokenize and pack."""
    streams = []
    for index, (source, offset) in enumerate(zip(sources, domain_offsets)):
        docs = grain.MapDataset.source(source)
        if shuffle:
            docs = docs.shuffle(seed=derived_seed(seed, _SHUFFLE_SOURCE, index))
        streams.append(docs.repeat().map(Tokenize(tokenizer, offset)))
    mixed = grain.MapDataset.mix(streams, list(weights)) if len(streams) > 1 else streams[0]
    mine = mixed[layout.process_index :: layout.process_count]
    pieces = grain_experimental.FlatMapIterDataset(
        mine.to_iter_dataset(_READ_OPTIONS), SplitLong(layout.row_len)
    )
    if shuffle and shuffle_window > 1:
        pieces = grain_experimental.WindowShuffleIterDataset(
            pieces, window_size=shuffle_window, seed=derived_seed(seed, _SHUFFLE_WINDOW)
        )
    batches = _pack(pieces, layout.row_len, layout.bins, layout.local_batch_size, True)
    if worker_count:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return batches


def evaluation_dataset(
    source: Any, tokenizer: Any, domain_offset: int, layout: Layout
) -> grain.IterDataset:
    """This process's share of one source's held-out documents, packed, in stored order."""
    docs = grain.MapDataset.source(source)[layout.process_index :: layout.process_count]
    pieces = grain_experimental.FlatMapIterDataset(
        docs.map(Tokenize(tokenizer, domain_offset)).to_iter_dataset(_READ_OPTIONS),
        SplitLong(layout.row_len),
    )
    return _pack(pieces, layout.row_len, layout.bins, layout.local_batch_size, False)


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

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; `set_state` on a new iterator resumes from it."""
        return {
            "format": STATE_FORMAT,
            "settings": self.fingerprint,
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
        iterator = iter(self._dataset)
        iterator.set_state(state["grain"])
        self._iterator = iterator


class EvaluationBatches:
    """One pass over every source's held-out documents, source after source, each capped at
    `max_batches` batches (0: all); the last batch of a source is topped up with padding."""

    def __init__(self, datasets: Sequence[grain.IterDataset], layout: Layout, max_batches: int):
        self._datasets = list(datasets)
        self.layout = layout
        self.max_batches = max_batches
        self._batches = self._chain()

    def _chain(self) -> Iterator[dict[str, np.ndarray]]:
        for dataset in self._datasets:
            for i, batch in enumerate(dataset):
                if self.max_batches and i >= self.max_batches:
                    break
                yield pad_rows(batch, self.layout.local_batch_size)

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
