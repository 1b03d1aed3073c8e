"""Reading a prepared tensorflow-datasets split by index, with errors that name the setting.

`open_corpus_builder(cfg)` opens the moejax corpus (built on first use, offline, seconds)
and `open_prepared_builder(cfg, alternatives)` any other tfds dataset (`corpus_builder_in`,
`prepared_builder` and `data_source` do the same from explicit arguments, for
`data.sources`), which must already
be prepared in `data.data_dir` in array_record format, because the pipeline needs random
access (the shuffled order is a permutation of indices, and resuming jumps straight to a
document). `read_split(builder, cfg, split)` returns a `DocumentReader`: `len()` documents,
and `reader.tokens(i) -> (int32 ids framed by BOS/EOS, domain id)`; `split_stats(builder)`
the per-split counts. Which of these a `data.dataset` uses is decided in `datasets.py`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import corpus_builder
from moejax.data.config import DATA_DIR_ENV, DEFAULT_DATASET, DataConfig
from moejax.data.errors import DataError
from moejax.data.tokenizer import ByteTokenizer


class DocumentReader:
    """Random access to the documents of one split, tokenized on demand."""

    def __init__(self, source: Any, text_key: str, domain_key: str | None, name: str):
        self._source = source
        self._text_key = text_key
        self._domain_key = domain_key
        self._tokenizer = ByteTokenizer()
        self.name = name  # "<dataset>/<split>", for messages

    def __len__(self) -> int:
        return len(self._source)

    def record(self, index: int) -> tuple[bytes, int]:
        """The raw text bytes and domain id (0 without a domain feature) of document `index`."""
        example = self._source[int(index)]
        text = example[self._text_key]
        if isinstance(text, str):
            text = text.encode("utf-8")
        domain = int(example[self._domain_key]) if self._domain_key else 0
        return bytes(text), domain

    def tokens(self, index: int) -> tuple[np.ndarray, int]:
        """Token ids (BOS, bytes + 3, EOS) and the domain id of document `index`."""
        text, domain = self.record(index)
        return self._tokenizer.encode_bytes(text), domain


def _split_field(cfg: DataConfig, split: str) -> str:
    if split == cfg.train_split:
        return "data.train_split"
    if split == cfg.eval_split:
        return "data.eval_split"
    return "split"


def open_corpus_builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    """The moejax corpus of `cfg.max_bytes_per_domain` in `data.data_dir`, built if needed."""
    return corpus_builder_in(cfg.resolved_data_dir, cfg.max_bytes_per_domain)


def corpus_builder_in(data_dir: str, max_bytes_per_domain: int) -> tfds.core.DatasetBuilder:
    """The moejax corpus of `max_bytes_per_domain` in `data_dir`, built if needed; DataError
    naming data.data_dir when it cannot be built or read."""
    try:
        return corpus_builder.build_corpus(data_dir, max_bytes_per_domain)
    except OSError as e:
        raise DataError(
            f"data.data_dir={data_dir!r}: cannot build {DEFAULT_DATASET} there ({e}). "
            f"Set --config.data.data_dir (or ${DATA_DIR_ENV}) to a writable directory."
        ) from e
    except Exception as e:
        path = corpus_builder.prepared_dir(data_dir, max_bytes_per_domain)
        if not os.path.isdir(path):
            raise  # failed while building, not while reading: a bug, show it as it is
        raise DataError(
            f"data.data_dir={data_dir!r}: the prepared {DEFAULT_DATASET} at {path} cannot be "
            f"read ({type(e).__name__}: {e}). Delete {path} and rerun to rebuild it."
        ) from e


def open_prepared_builder(cfg: DataConfig, alternatives: str) -> tfds.core.DatasetBuilder:
    """The tfds dataset `cfg.dataset` as prepared in `data.data_dir`.

    `alternatives` names the other values of `data.dataset`, for the message when the name
    is not a tfds dataset.
    """
    return prepared_builder(
        cfg.dataset,
        cfg.resolved_data_dir,
        setting=f"data.dataset={cfg.dataset!r}",
        alternatives=f"Use {alternatives} or the name of a dataset prepared in data.data_dir.",
    )


def prepared_builder(
    name: str, data_dir: str, *, setting: str, alternatives: str
) -> tfds.core.DatasetBuilder:
    """The tfds dataset `name` (`NAME[/CONFIG][:VERSION]`) as prepared in `data_dir`.

    `setting` is how the user named it (`data.dataset='c4'`), `alternatives` the fix when
    `name` is not a tfds dataset; both go into the DataError messages.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise DataError(
            f"{setting} is not a registered tensorflow-datasets dataset and is not prepared "
            f"in data.data_dir={data_dir!r}. {alternatives}"
        ) from e
    except Exception as e:
        raise DataError(
            f"data.data_dir={data_dir!r}: the prepared {name!r} there ({setting}) cannot be "
            f"read ({type(e).__name__}: {e}). Prepare it again, or point "
            "--config.data.data_dir at an intact copy."
        ) from e
    if not builder.is_prepared():
        raise DataError(
            f"{setting} is not prepared in data.data_dir={data_dir!r} "
            f"(looked for {builder.data_dir}). Prepare it there in array_record format, e.g. "
            f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`, or "
            "point --config.data.data_dir at the directory that holds it."
        )
    return builder


def read_split(
    builder: tfds.core.DatasetBuilder, cfg: DataConfig, split: str, *, rebuilt_on_use: bool
) -> DocumentReader:
    """A reader for `split` of `builder` (the dataset `cfg` names); raises DataError naming
    the field. `rebuilt_on_use`: deleting corrupt files is enough, the next run rebuilds."""
    available = list(builder.info.splits.keys())
    if split not in available:
        raise DataError(
            f"{_split_field(cfg, split)}={split!r} is not a split of {cfg.dataset!r}; "
            f"available splits: {available}."
        )
    features = builder.info.features
    if cfg.text_key not in features:
        raise DataError(
            f"data.text_key={cfg.text_key!r} is not a feature of {cfg.dataset!r}; "
            f"features: {sorted(features.keys())}."
        )
    domain_key = cfg.domain_key if cfg.domain_key in features else None
    source = data_source(
        builder,
        split,
        setting=f"data.dataset={cfg.dataset!r}",
        data_dir=cfg.resolved_data_dir,
        rebuilt_on_use=rebuilt_on_use,
    )
    return DocumentReader(source, cfg.text_key, domain_key, f"{cfg.dataset}/{split}")


def data_source(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    setting: str,
    data_dir: str,
    rebuilt_on_use: bool,
) -> Any:
    """`builder.as_data_source(split)` (random access), its first record read now so that
    unreadable files fail here, with the fix, rather than mid-training. `setting` is how the
    user named the dataset; `rebuilt_on_use`: deleting corrupt files is enough, the next run
    rebuilds them."""
    try:
        source = builder.as_data_source(split=split)
        if len(source):
            source[0]
    except NotImplementedError as e:  # prepared as tfrecord: no random access
        raise DataError(
            f"{setting} in data.data_dir={data_dir!r} is not stored as array_record, which "
            f"random access needs. Re-prepare it with --file_format=array_record. ({e})"
        ) from e
    except Exception as e:
        raise DataError(
            f"data.data_dir={data_dir!r}: the prepared files of {setting} at "
            f"{builder.data_dir} cannot be read ({type(e).__name__}: {e}). They are corrupt or "
            f"incomplete: delete {builder.data_dir} and rerun"
            + (" to rebuild it." if rebuilt_on_use else ", after preparing it again.")
        ) from e
    return source


def split_stats(builder: tfds.core.DatasetBuilder) -> dict[str, dict]:
    """Documents and text bytes per split (and per domain for moejax_corpus), for logging.

    The moejax corpus stores these counts at build time; for other datasets documents are
    counted from the split metadata and bytes are None (counting them means reading it all).
    """
    out: dict[str, dict] = {}
    for split, info in builder.info.splits.items():
        stats = builder.info.metadata.get("stats", {}) if builder.info.metadata else {}
        out[split] = stats.get(split) or {"documents": info.num_examples, "bytes": None}
    return out
