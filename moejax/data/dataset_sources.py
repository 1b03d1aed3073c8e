"""Document sources with their own splits: `hf_disk:DIR` (a Hugging Face `datasets`
`save_to_disk` directory, Dataset or DatasetDict) and `tfds:NAME` / `corpus` (a prepared
tensorflow-datasets split, the offline corpus built on first use). A source without its eval
split has eval carved out of its train split by the position hash of `source_base.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import logging

from moejax.data import reader
from moejax.data.corpus_sources import DOMAINS
from moejax.data.errors import DataError
from moejax.data.source_base import (
    TRAIN,
    DocumentSource,
    as_text,
    field_fix,
    key_setting,
    listing_hint,
    source_error,
    split_by_position,
)
from moejax.data.source_spec import (
    CORPUS,
    FIELD,
    SourceSpec,
)
from moejax.paths import as_path, resolve


def _own_split(
    spec: SourceSpec, available: Sequence[str], role: str, train_split: str, eval_split: str
) -> tuple[str, bool]:
    """(the split to read for `role`, whether to carve the role out of it by position)."""
    if train_split not in available:
        raise DataError(
            f"data.train_split={train_split!r} is not a split of {FIELD} item {spec.item!r}; "
            f"available splits: {sorted(available)}. Set --config.data.train_split."
        )
    if eval_split in available:
        return (train_split if role == TRAIN else eval_split), False
    logging.warning(
        "%s item %r has no split %r (data.eval_split): eval is carved out of %r by position.",
        FIELD,
        spec.item,
        eval_split,
        train_split,
    )
    return train_split, True


class HfDiskSource(DocumentSource):
    """A Hugging Face `datasets` directory written by `save_to_disk`."""

    _TRANSIENT = ("_dataset",)

    def __init__(
        self,
        spec: SourceSpec,
        role: str,
        text_key: str,
        train_split: str,
        eval_split: str,
        eval_fraction: float,
    ):
        super().__init__(spec, (spec.name,))
        self._dir = resolve(spec.where)  # a local directory or a gs:// URL (fsspec)
        self._text_key = text_key
        self._split: str | None = None  # None: a plain Dataset
        loaded = self._load()
        carve = True
        if hasattr(loaded, "keys"):  # a DatasetDict
            self._split, carve = _own_split(
                spec, list(loaded.keys()), role, train_split, eval_split
            )
            loaded = loaded[self._split]
        self._check_columns(loaded.column_names)
        self._dataset = loaded.select_columns([text_key])
        if carve:
            split_by_position(self, [self._split or ""], [len(loaded)], role, eval_fraction)
        else:
            self._total = len(loaded)
        if self._total:
            self._read(0)

    def _load(self) -> Any:
        import datasets  # the hf extra: only hf_disk sources need it

        if not as_path(self._dir).is_dir():
            raise source_error(
                self.spec,
                f"the directory {self._dir} does not exist",
                f"{listing_hint(str(as_path(self._dir).parent))} Point hf_disk: at a "
                "directory written by Dataset.save_to_disk / DatasetDict.save_to_disk.",
            )
        try:
            return datasets.load_from_disk(self._dir)
        except Exception as e:
            raise source_error(
                self.spec,
                f"datasets.load_from_disk cannot read {self._dir} ({type(e).__name__}: {e})",
                "Point hf_disk: at a directory written by save_to_disk, or save it again.",
            ) from e

    def _check_columns(self, columns: Sequence[str]) -> None:
        if self._text_key not in columns:
            raise source_error(
                self.spec,
                f"{self._dir} has no column {self._text_key!r}, which "
                f"{key_setting(self.spec, self._text_key)} names",
                field_fix(self.spec, columns),
            )

    def _rows(self) -> Any:
        with self._lock:
            if self._dataset is None:
                loaded = self._load()
                if self._split is not None:
                    loaded = loaded[self._split]
                self._dataset = loaded.select_columns([self._text_key])
            return self._dataset

    def _read(self, position: int) -> dict[str, Any]:
        value = self._rows()[position][self._text_key]
        text = as_text(value)
        if text is None:
            raise source_error(
                self.spec,
                f"column {self._text_key!r} of {self._dir} holds {type(value).__name__}, not text",
                field_fix(self.spec, [self._text_key]),
            )
        return {"text": text, "domain": 0}


class TfdsSource(DocumentSource):
    """`corpus` (the offline corpus, three domains) or `tfds:NAME` prepared in data_dir."""

    _TRANSIENT = ("_source",)

    def __init__(
        self,
        spec: SourceSpec,
        role: str,
        *,
        data_dir: str,
        text_key: str,
        train_split: str,
        eval_split: str,
        eval_fraction: float,
        max_bytes_per_domain: int,
    ):
        self._corpus = spec.kind == CORPUS
        super().__init__(spec, DOMAINS if self._corpus else (spec.name,))
        self._data_dir = data_dir
        self._max_bytes = max_bytes_per_domain
        self._text_key = "text" if self._corpus else text_key
        builder = self._builder()
        splits = list(builder.info.splits.keys())
        self._split, carve = _own_split(spec, splits, role, train_split, eval_split)
        features = builder.info.features
        if self._text_key not in features:
            raise source_error(
                spec,
                f"{spec.where!r} has no feature {self._text_key!r}, which "
                f"{key_setting(spec, self._text_key)} names",
                field_fix(spec, features.keys()),
            )
        self._source = self._open(builder)
        if carve:
            split_by_position(self, [self._split], [len(self._source)], role, eval_fraction)
        else:
            self._total = len(self._source)

    def _builder(self) -> Any:
        if self._corpus:
            return reader.corpus_builder_in(self._data_dir, self._max_bytes)
        return reader.prepared_builder(
            self.spec.where,
            self._data_dir,
            setting=f"{FIELD} item {self.spec.item!r}",
            alternatives=(
                "Write tfds:NAME[/CONFIG][:VERSION] with a tensorflow-datasets dataset "
                f"prepared in data.data_dir, or use another kind of {FIELD} item."
            ),
        )

    def _open(self, builder: Any) -> Any:
        return reader.data_source(
            builder,
            self._split,
            setting=f"{FIELD} item {self.spec.item!r}",
            data_dir=self._data_dir,
            rebuilt_on_use=self._corpus,
        )

    def _read(self, position: int) -> dict[str, Any]:
        with self._lock:
            if self._source is None:
                self._source = self._open(self._builder())
            source = self._source
        record = source[position]
        text = as_text(record[self._text_key])
        if text is None:
            raise source_error(
                self.spec,
                f"feature {self._text_key!r} holds {type(record[self._text_key]).__name__}, "
                "not text",
                "Name a text feature with #FIELD or --config.data.text_key.",
            )
        return {"text": text, "domain": int(record["domain"]) if self._corpus else 0}
