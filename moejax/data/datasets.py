"""The dataset registry: every value of `data.dataset`, and what each one means, in one place.

`DATASETS` maps a name to its `Dataset`: `moejax_corpus` (the offline corpus, a tfds dataset
built on first use) and `multitask` (generated prompt -> answer rows, `tasks.py`). Any other
name that tensorflow-datasets can parse is a tfds text dataset already prepared in
`data.data_dir` (`PreparedTfds`). A `Dataset` gives this process's batches of a split, the
counts of its splits, a check that a split can be read (run before training), and the
smallest `model.vocab_size` its token ids need (checked by `moejax.config.validation.validate`).
Adding a dataset is one `Dataset` subclass and one line in `DATASETS`.

The entry points dispatch on `cfg.dataset` through `dataset_for`, which refuses a name that
is neither registered nor a tfds name with one `DataError` that lists the choices:

    make_batches(cfg, split)   this process's iterator (`PackedBatches` or `TaskBatches`)
    describe(cfg)              documents (and bytes) per split, for logging
    open_split(cfg, split)     a `DocumentReader` over a split read from disk
    check_split(cfg, split)    raises now if `split` could not be read later
"""

from __future__ import annotations

import abc
import types
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
import tensorflow_datasets as tfds

from moejax.data import reader, tasks
from moejax.data.config import DEFAULT_DATASET, DataConfig
from moejax.data.errors import DataError
from moejax.data.pipeline import PackedBatches
from moejax.data.tokenizer import VOCAB_SIZE


class Batches(Protocol):
    """What `make_batches` returns, whatever the dataset (`PackedBatches`, `TaskBatches`).

    Each batch is a dict of NumPy arrays [B, seq_len], B = global_batch_size // processes:
    inputs, targets, segment_ids, positions, domains (int32) and loss_mask (float32).
    """

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def padding_batch(self) -> dict[str, np.ndarray]:
        """A batch of the usual shapes that is all padding (loss_mask 0 everywhere)."""

    def get_state(self) -> dict[str, Any]:
        """A small JSON-serialisable snapshot; `set_state` on a new iterator resumes from it."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state`; raises ValueError if it was saved for other settings."""


class Dataset(abc.ABC):
    """One kind of `data.dataset`: what the pipeline, the preflight checks and validation
    need of it. Stateless: everything comes from the `DataConfig` passed in."""

    # The smallest model.vocab_size its token ids need; 0 when that depends on the data
    # (then only the first batch is checked, by moejax.train.preflight).
    min_vocab_size: int = 0

    @abc.abstractmethod
    def make_batches(
        self, cfg: DataConfig, split: str, *, process_index: int, process_count: int, repeat: bool
    ) -> Batches:
        """This process's iterator over `split` (process info already resolved and checked)."""

    @abc.abstractmethod
    def describe(self, cfg: DataConfig) -> dict[str, dict]:
        """{split: {"documents": ..., "bytes": ...}} for logging."""

    @abc.abstractmethod
    def open_split(self, cfg: DataConfig, split: str) -> reader.DocumentReader:
        """Random access to the documents of `split`; DataError if it has none to read."""

    @abc.abstractmethod
    def check_split(self, cfg: DataConfig, split: str) -> None:
        """Raises DataError (naming the field) now if `split` could not be read later."""


class PreparedTfds(Dataset):
    """A tensorflow-datasets text dataset prepared in `data.data_dir` (array_record), named
    by `data.dataset`; documents are packed into rows (`PackedBatches`)."""

    # Deleting corrupt files is the whole fix only when the next run rebuilds them.
    rebuilt_on_use = False

    def builder(self, cfg: DataConfig) -> tfds.core.DatasetBuilder:
        return reader.open_prepared_builder(cfg, alternatives=_registered_names())

    def open_split(self, cfg: DataConfig, split: str) -> reader.DocumentReader:
        return reader.read_split(self.builder(cfg), cfg, split, rebuilt_on_use=self.rebuilt_on_use)

    def check_split(self, cfg: DataConfig, split: str) -> None:
        self.open_split(cfg, split)

    def describe(self, cfg: DataConfig) -> dict[str, dict]:
        return reader.split_stats(self.builder(cfg))

    def make_batches(
        self, cfg: DataConfig, split: str, *, process_index: int, process_count: int, repeat: bool
    ) -> PackedBatches:
        return PackedBatches(
            self.open_split(cfg, split),
            seq_len=cfg.seq_len,
            local_batch_size=cfg.global_batch_size // process_count,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            process_index=process_index,
            process_count=process_count,
            repeat=repeat,
        )


class MoejaxCorpusDataset(PreparedTfds):
    """`moejax_corpus`: the offline multi-domain corpus, built in `data.data_dir` on first
    use (`corpus_builder.py`), one variant per `data.max_bytes_per_domain`."""

    rebuilt_on_use = True
    min_vocab_size = VOCAB_SIZE  # the byte tokenizer's ids

    def builder(self, cfg: DataConfig) -> tfds.core.DatasetBuilder:
        return reader.open_corpus_builder(cfg)


class MultitaskDataset(Dataset):
    """`multitask`: generated prompt -> answer rows (`tasks.py`), nothing read from disk;
    `data.train_split` is the unbounded training stream, any other split the held-out one."""

    min_vocab_size = VOCAB_SIZE  # the byte tokenizer's ids

    def make_batches(
        self, cfg: DataConfig, split: str, *, process_index: int, process_count: int, repeat: bool
    ) -> tasks.TaskBatches:
        return tasks.TaskBatches(
            cfg, split, process_index=process_index, process_count=process_count, repeat=repeat
        )

    def describe(self, cfg: DataConfig) -> dict[str, dict]:
        return tasks.describe()

    def open_split(self, cfg: DataConfig, split: str) -> reader.DocumentReader:
        raise DataError(
            f"data.dataset={tasks.DATASET!r} is generated, not read: use "
            f"make_batches (moejax.data.tasks)."
        )

    def check_split(self, cfg: DataConfig, split: str) -> None:
        """Nothing to check: every split is generated."""


DATASETS: Mapping[str, Dataset] = types.MappingProxyType(
    {
        DEFAULT_DATASET: MoejaxCorpusDataset(),
        tasks.DATASET: MultitaskDataset(),
    }
)
PREPARED_TFDS = PreparedTfds()  # every other data.dataset


def _registered_names() -> str:
    return ", ".join(repr(name) for name in DATASETS)


def dataset_for(name: str) -> Dataset:
    """The `Dataset` that `data.dataset=name` selects; DataError naming the field and the
    choices when `name` is neither registered nor a tensorflow-datasets name."""
    if name in DATASETS:
        return DATASETS[name]
    try:
        tfds.core.naming.parse_builder_name_kwargs(name)
    except ValueError:
        raise DataError(
            f"data.dataset={name!r} is not a dataset: set --config.data.dataset to one of "
            f"{_registered_names()}, or to the name of a tensorflow-datasets dataset prepared "
            "in data.data_dir (dataset_name[/config_name][:version])."
        ) from None
    return PREPARED_TFDS


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    return process_index, process_count


def make_batches(
    cfg: DataConfig,
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    repeat: bool = True,
) -> Batches:
    """This process's iterator over `split` of `cfg.dataset`; process info defaults to JAX's.

    Documents read from disk give `PackedBatches`; `data.dataset="multitask"` gives generated
    prompt -> answer rows (`tasks.TaskBatches`, the same interface).
    """
    process_index, process_count = _process_info(process_index, process_count)
    if cfg.global_batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
            f"{process_count} processes; set --config.data.global_batch_size to a multiple "
            f"of {process_count}."
        )
    return dataset_for(cfg.dataset).make_batches(
        cfg, split, process_index=process_index, process_count=process_count, repeat=repeat
    )


def describe(cfg: DataConfig) -> dict[str, dict]:
    """Documents and text bytes per split of `cfg.dataset` (per domain for moejax_corpus)."""
    return dataset_for(cfg.dataset).describe(cfg)


def open_split(cfg: DataConfig, split: str) -> reader.DocumentReader:
    """A reader for `split` of `cfg.dataset`; raises DataError naming the field."""
    return dataset_for(cfg.dataset).open_split(cfg, split)


def check_split(cfg: DataConfig, split: str) -> None:
    """Raises DataError naming the field now if `split` of `cfg.dataset` could not be read
    later (e.g. the evaluation split, before training starts)."""
    dataset_for(cfg.dataset).check_split(cfg, split)
