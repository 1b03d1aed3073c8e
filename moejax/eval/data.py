"""The data a post-training tool reads: the run's `data` section with the sources, row
length, batch size and data directory the caller names (`eval_data_config`), and its
held-out batches (`heldout_batches`): every source's evaluation documents, or with
`data.sources=multitask` the generated tasks' evaluation rows (`moejax.data.tasks`)."""

from __future__ import annotations

import dataclasses

from moejax.config.validation import Sections
from moejax.data import DataConfig, make_batches
from moejax.data.datasets import check_spelling


def eval_data_config(
    s: Sections,
    sources: str | None = None,
    *,
    seq_len: int = 0,
    batch_size: int = 0,
    data_dir: str | None = None,
) -> DataConfig:
    """The run's data section with `sources` (None: the run's own), `seq_len` /
    `batch_size` (0: the run's) and `data_dir` (None: the run's); DataError naming the
    field for a bad source list."""
    changes = {}
    if sources:
        changes["sources"] = sources
    if seq_len:
        changes["seq_len"] = seq_len
    if batch_size:
        changes["global_batch_size"] = batch_size
    if data_dir is not None:
        changes["data_dir"] = data_dir
    cfg = dataclasses.replace(s.data, **changes)
    check_spelling(cfg)
    return cfg


def heldout_batches(cfg: DataConfig, max_batches: int = 0):
    """One pass over the held-out rows of `cfg` (at most `max_batches` per source; 0: all),
    on this one process."""
    return make_batches(
        cfg, cfg.eval_split, process_index=0, process_count=1, max_eval_batches=max_batches
    )
