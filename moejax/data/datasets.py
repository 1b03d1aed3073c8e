"""What a `DataConfig` reads: its sources, its tokenizer and its batches, in one place.

`data.sources` is a weighted mixture of document sources (`source_spec.py`,
`document_sources.py`) read through the grain pipeline (`pipeline.py`), or `multitask`
alone: generated prompt -> answer rows (`tasks.py`). The entry points:

    open_tokenizer(cfg)            the `data.tokenizer` (`tokenizer.py`)
    domain_names(cfg)              the evaluation domains: one per source, the corpus's three
    make_batches(cfg, split)       this process's batches: the endless, resumable training
                                   stream for `data.train_split`, one pass over every
                                   source's held-out documents for any other split
    describe(cfg)                  documents per source and role, for logging
    check_spelling(cfg)            the source list and the tokenizer kind parse (no file read)
    check_evaluation_sources(cfg)  raises DataError now if a held-out part cannot be read

Every failure is one `DataError` naming the field and the fix, raised before compiling.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from moejax.data import tasks
from moejax.data.config import MULTITASK, DataConfig
from moejax.data.corpus_sources import DOMAINS as CORPUS_DOMAINS
from moejax.data.corpus_tokenizer import CORPUS_BPE, build_corpus_tokenizer, parse_vocab_size
from moejax.data.document_sources import open_source
from moejax.data.errors import DataError
from moejax.data.pipeline import (
    EvaluationBatches,
    Layout,
    TrainingBatches,
    evaluation_lanes,
    training_dataset,
)
from moejax.data.source_spec import SourceSpec, parse_sources
from moejax.data.tokenizer import KINDS as TOKENIZER_KINDS
from moejax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

TRAIN, EVAL = "train", "eval"


class Batches(Protocol):
    """What `make_batches` returns (`TrainingBatches`, `EvaluationBatches`, `TaskBatches`).

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


def is_multitask(cfg: DataConfig) -> bool:
    return cfg.sources.strip() == MULTITASK


def source_specs(cfg: DataConfig) -> tuple[SourceSpec, ...]:
    """The parsed `data.sources` (DataError naming the field for a bad list)."""
    if is_multitask(cfg):
        raise DataError(
            f"data.sources={MULTITASK!r} generates its rows and has no document sources."
        )
    return parse_sources(cfg.sources)


def open_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer `data.tokenizer` names (the generated tasks are always bytes;
    `corpus_bpe:N` is trained on the offline corpus on first use)."""
    if is_multitask(cfg):
        if cfg.tokenizer != "byte":
            raise DataError(
                f"data.sources={MULTITASK!r} writes byte tokens; set --config.data.tokenizer"
                f"=byte (got {cfg.tokenizer!r})."
            )
        return ByteTokenizer()
    if cfg.tokenizer.startswith(CORPUS_BPE + ":"):
        try:
            size = parse_vocab_size(cfg.tokenizer)
        except ValueError as e:
            raise DataError(str(e)) from None
        spec = build_corpus_tokenizer(cfg.resolved_data_dir, cfg.max_bytes_per_domain, size)
        return load_tokenizer(spec, pad_id=cfg.pad_id)
    return load_tokenizer(cfg.tokenizer, pad_id=cfg.pad_id)


def _domains_of(spec: SourceSpec) -> tuple[str, ...]:
    return tuple(CORPUS_DOMAINS) if spec.kind == "corpus" else (spec.name,)


def domain_names(cfg: DataConfig) -> tuple[str, ...]:
    """The evaluation domains, in the order of the `domains` ids in every batch."""
    if is_multitask(cfg):
        return tuple(CORPUS_DOMAINS)  # TaskBatches labels every row domain 0
    names: list[str] = []
    for spec in source_specs(cfg):
        for name in _domains_of(spec):
            names.append(name if name not in names else f"{spec.name}/{name}")
    return tuple(names)


def _domain_offsets(specs: Sequence[SourceSpec]) -> list[int]:
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        total += len(_domains_of(spec))
    return offsets


def _open(cfg: DataConfig, spec: SourceSpec, role: str):
    return open_source(
        spec,
        role,
        data_dir=cfg.resolved_data_dir,
        text_key=cfg.text_key,
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
        eval_fraction=cfg.eval_fraction,
        max_bytes_per_domain=cfg.max_bytes_per_domain,
    )


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    return process_index, process_count


def _layout(cfg: DataConfig, process_index: int, process_count: int) -> Layout:
    if cfg.global_batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
            f"{process_count} processes; set --config.data.global_batch_size to a multiple "
            f"of {process_count}."
        )
    return Layout(
        seq_len=cfg.seq_len,
        local_batch_size=cfg.global_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
    )


def _check_fills_a_batch(cfg: DataConfig, spec: SourceSpec, source, tokenizer) -> None:
    """A source must hold at least one batch of tokens, or every batch repeats it; the tokens
    are counted only when it has fewer documents than a batch has rows (a source that small
    is cheap to tokenize, and one that large is almost never smaller than a batch)."""
    rows = cfg.global_batch_size
    if len(source) >= rows:
        return
    needed = rows * (cfg.seq_len + 1)
    tokens = 0
    for i in range(len(source)):
        record = source[i]
        tokens += (
            len(record["tokens"]) if "tokens" in record else len(tokenizer.encode(record["text"]))
        )
    if tokens < needed:
        raise DataError(
            f"data.sources: {spec.kind}:{spec.where} holds {len(source)} training documents, "
            f"{tokens} tokens, fewer than one batch of data.global_batch_size={rows} rows x "
            f"{cfg.seq_len + 1} tokens ({needed}): every batch would repeat it. Add data to "
            f"the source, or lower --config.data.global_batch_size / --config.data.seq_len."
        )


def _fingerprint(cfg: DataConfig, layout: Layout) -> dict[str, Any]:
    """The settings that fix the training reading order, named as on the command line."""
    return {
        "data.sources": cfg.sources,
        "data.tokenizer": cfg.tokenizer,
        "data.seed": cfg.seed,
        "data.shuffle": cfg.shuffle,
        "data.seq_len": cfg.seq_len,
        "data.global_batch_size": cfg.global_batch_size,
        "data.eval_fraction": cfg.eval_fraction,
        "data.worker_count": cfg.worker_count,  # each worker packs its own slice
        "process_count": layout.process_count,
        "process_index": layout.process_index,
    }


def training_batches(
    cfg: DataConfig, *, process_index: int | None = None, process_count: int | None = None
) -> TrainingBatches:
    """This process's endless, resumable training batches of the `data.sources` mixture."""
    process_index, process_count = _process_info(process_index, process_count)
    layout = _layout(cfg, process_index, process_count)
    specs = source_specs(cfg)
    tokenizer = open_tokenizer(cfg)
    sources = [_open(cfg, spec, TRAIN) for spec in specs]
    for spec, source in zip(specs, sources):
        _check_fills_a_batch(cfg, spec, source, tokenizer)
    dataset = training_dataset(
        sources,
        [spec.weight for spec in specs],
        tokenizer,
        _domain_offsets(specs),
        layout,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        worker_count=cfg.worker_count,
    )
    return TrainingBatches(dataset, layout, _fingerprint(cfg, layout))


def evaluation_batches(
    cfg: DataConfig,
    *,
    max_batches_per_source: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvaluationBatches:
    """One pass over every source's held-out documents (at most `max_batches_per_source`
    batches each; 0: all), this process's share."""
    process_index, process_count = _process_info(process_index, process_count)
    layout = _layout(cfg, process_index, process_count)
    specs = source_specs(cfg)
    tokenizer = open_tokenizer(cfg)
    lanes = [
        evaluation_lanes(_open(cfg, spec, EVAL), tokenizer, offset, layout)
        for spec, offset in zip(specs, _domain_offsets(specs))
    ]
    return EvaluationBatches(lanes, layout, max_batches_per_source)


def make_batches(
    cfg: DataConfig,
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    max_eval_batches: int = 0,
) -> Batches:
    """This process's batches: `data.train_split` gives the training stream, any other
    split one evaluation pass (at most `max_eval_batches` per source; 0: all). The generated
    tasks (`data.sources=multitask`) always evaluate on their whole held-out set (256 inputs),
    so their figures compare across runs whatever `train.eval_batches` is."""
    if is_multitask(cfg):
        process_index, process_count = _process_info(process_index, process_count)
        _layout(cfg, process_index, process_count)  # the divisibility check
        return tasks.TaskBatches(
            cfg,
            split,
            process_index=process_index,
            process_count=process_count,
            repeat=split == cfg.train_split,
        )
    if split == cfg.train_split:
        return training_batches(cfg, process_index=process_index, process_count=process_count)
    return evaluation_batches(
        cfg,
        max_batches_per_source=max_eval_batches,
        process_index=process_index,
        process_count=process_count,
    )


def describe(cfg: DataConfig) -> dict[str, dict]:
    """{source name: {"weight", "train_documents", "eval_documents"}}, for logging."""
    if is_multitask(cfg):
        return tasks.describe()
    return {
        spec.name: {
            "weight": spec.weight,
            "train_documents": len(_open(cfg, spec, TRAIN)),
            "eval_documents": len(_open(cfg, spec, EVAL)),
        }
        for spec in source_specs(cfg)
    }


def check_spelling(cfg: DataConfig) -> None:
    """`data.sources` parses and `data.tokenizer` names a known kind; reads no file, so
    `validate` runs it on any machine."""
    if is_multitask(cfg):
        open_tokenizer(cfg)
        return
    source_specs(cfg)
    kind = cfg.tokenizer.partition(":")[0]
    if kind == CORPUS_BPE:
        try:
            parse_vocab_size(cfg.tokenizer)
        except ValueError as e:
            raise DataError(str(e)) from None
    elif kind not in [k.partition(":")[0] for k in TOKENIZER_KINDS]:
        raise DataError(
            f"data.tokenizer={cfg.tokenizer!r}: unknown tokenizer kind {kind!r}; set "
            f"--config.data.tokenizer to one of {', '.join([*TOKENIZER_KINDS, CORPUS_BPE + ':N'])}."
        )


def check_evaluation_sources(cfg: DataConfig) -> None:
    """Opens every source's held-out part, so a missing eval split or file fails now, before
    anything compiles, not at the first evaluation. (`make_batches` for the training split
    opens the training parts and reads their first documents.)"""
    if is_multitask(cfg):
        return  # generated
    for spec in source_specs(cfg):
        _open(cfg, spec, EVAL)
