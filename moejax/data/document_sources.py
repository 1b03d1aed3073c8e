"""Random-access document sources: one per `data.sources` item (`source_spec.py`) and role.

`open_source(spec, role, ...)` returns a `DocumentSource`: `len(source)` documents and
`source[i]` -> `{"text": str, "domain": int}` (`{"tokens": int32 array, "domain": 0}` for
`array_record`), where `domain` indexes `source.domains`: the corpus has its three domains
("code", "prose", "arithmetic"), every other source is one domain named after the source.
That is grain's `RandomAccessDataSource` protocol. Sources are picklable (grain copies them
into worker processes): open files and readers are dropped when pickled and reopened on the
first read.

Kinds:
- `corpus`: the offline corpus in data_dir (built on first use), read through tfds; its text
  field is always "text" (data.text_key is for the user's data).
- `tfds:NAME[/CONFIG][:VERSION]`: a tfds dataset prepared in data_dir as array_record.
- `parquet:GLOB`: the text column only, read one row group at a time (the last one read is
  cached, so reading in order costs one decode per row group).
- `jsonl:GLOB`: one JSON object per line; blank lines are skipped. Plain files are indexed
  by line offsets (one pass at open time). `.jsonl.gz` files cannot be seeked, so each is
  decompressed whole and its lines kept in memory (in every process that reads it).
- `hf_disk:DIR`: `datasets.load_from_disk(DIR)`: a Dataset, or a DatasetDict whose splits
  are used by name.
- `array_record:GLOB`: pre-tokenized documents. Each record is one document's token ids as
  raw little-endian int32 bytes (`np.asarray(ids, "<i4").tobytes()`), nothing else: no
  header, no BOS/EOS added. `write_token_records(path, rows)` writes such a file.
Globs are expanded (sorted, `**` allowed) at open time; a later new file is not seen.

Train and eval roles. Sources with their own splits (corpus, tfds, an hf_disk DatasetDict)
read `train_split` for "train" and `eval_split` for "eval"; if such a source has no
`eval_split` (many have only "train"), eval is carved out of `train_split` by the rule below.
Sources without splits (parquet, jsonl, array_record, an hf_disk Dataset) are split by
position: a document is in eval when `stable_fraction(key) < eval_fraction`, where key is
"<file path relative to the glob's fixed directory prefix>:<row in that file>" (for hf_disk,
"<split>:<row>", or ":<row>" for a plain Dataset). The key is the document's position, not
its content: hashing content would mean reading every document at open time, while
positions need only the file metadata (parquet footers, line offsets, record counts), and
they are the same on every machine as long as the files are. Appending a file leaves every
other document's side unchanged; rewriting a file re-deals its rows. Raising eval_fraction
only moves documents from train to eval. Tiny sources are topped up: when the rule leaves
eval empty and the source has at least two documents, the lowest-hash document goes to
eval; when it leaves train empty, the highest-hash one goes back to train; a one-document
source is train only.

Every problem with the data is one DataError naming `data.sources` (or the text field) and
the fix, raised by `open_source`, which reads the first document of each file or split.
Nothing is ever deleted. A bad line deep inside a large jsonl file is found when it is read,
with the same message.
"""

from __future__ import annotations

import glob
import gzip
import json
import operator
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from array_record.python import array_record_data_source, array_record_module

from moejax.data import reader
from moejax.data.config import default_data_dir
from moejax.data.corpus_sources import DEFAULT_MAX_BYTES_PER_DOMAIN, DOMAINS
from moejax.data.errors import DataError
from moejax.data.source_spec import (
    ARRAY_RECORD,
    CORPUS,
    FIELD,
    HF_DISK,
    JSONL,
    PARQUET,
    TFDS,
    TOKENIZED_KINDS,
    SourceSpec,
    parse_sources,
)
from moejax.data.text_files import stable_fraction

TRAIN = "train"
EVAL = "eval"
ROLES = (TRAIN, EVAL)
DEFAULT_EVAL_FRACTION = 0.05
_WILDCARD_CHARS = "*?["


# --- the common part: roles, pickling, errors ---------------------------------------------


class DocumentSource:
    """Random access to the documents of one source and role.

    Subclasses implement `_read(position)` for a position in the whole source; `_positions`
    (sorted) selects the role's documents, None meaning all `_total` of them. Attributes
    named in `_TRANSIENT` (open files, readers, caches) are dropped when pickled.
    """

    _TRANSIENT: tuple[str, ...] = ()

    def __init__(self, spec: SourceSpec, domains: tuple[str, ...]):
        self.name = spec.name
        self.domains = domains
        self.spec = spec
        self._positions: np.ndarray | None = None
        self._total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._total if self._positions is None else len(self._positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, n = operator.index(index), len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} of {self.name} ({n} documents)")
        i %= n
        return self._read(i if self._positions is None else int(self._positions[i]))

    def _read(self, position: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        for name in self._TRANSIENT:
            state[name] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.item!r}, {len(self)} documents)"


def _source_error(spec: SourceSpec, problem: str, fix: str) -> DataError:
    return DataError(f"{FIELD}: {spec.item!r}: {problem}. {fix}")


def _key_setting(spec: SourceSpec, text_key: str) -> str:
    """How the user chose the text field, for messages."""
    if spec.text_key:
        return f"the field #{text_key} of {FIELD} item {spec.item!r}"
    return f"data.text_key={text_key!r} (for {FIELD} item {spec.item!r})"


def _field_fix(spec: SourceSpec, fields: Iterable[str]) -> str:
    fields = sorted(fields)
    example = fields[0] if fields else "content"
    return (
        f"Fields present: {fields}. Name the text field with #FIELD "
        f"(e.g. {spec.kind}:{spec.where}#{example}) or set --config.data.text_key."
    )


def _as_text(value: Any) -> str | None:
    """str for str/bytes (UTF-8, undecodable bytes replaced), "" for null, else None."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return None


# --- deterministic split -------------------------------------------------------------------


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(
            f"data.eval_fraction={eval_fraction!r} must be in (0, 1); set "
            "--config.data.eval_fraction to e.g. 0.05."
        )


def eval_mask(keys: Iterable[str], count: int, eval_fraction: float) -> np.ndarray:
    """Which of `count` documents (named by `keys`) are eval: `stable_fraction(key) <
    eval_fraction`, topped up so that eval is not empty when count >= 2 and train never is
    when count >= 1 (see the module docstring)."""
    _check_fraction(eval_fraction)
    fractions = np.fromiter((stable_fraction(k) for k in keys), np.float64, count=count)
    mask = fractions < eval_fraction
    if count >= 2 and not mask.any():
        mask[np.argmin(fractions)] = True
    if count >= 1 and mask.all():
        mask[np.argmax(fractions)] = False
    return mask


def _role_positions(mask: np.ndarray, role: str) -> np.ndarray:
    return np.flatnonzero(mask if role == EVAL else ~mask).astype(np.int64)


def _file_keys(labels: Sequence[str], counts: Sequence[int]) -> Iterator[str]:
    for label, count in zip(labels, counts):
        for row in range(count):
            yield f"{label}:{row}"


def _split_by_position(
    source: DocumentSource, labels: Sequence[str], counts: Sequence[int], role: str, frac: float
) -> None:
    """Sets `source._positions` to the role's documents (rows of `labels` in order)."""
    total = int(sum(counts))
    source._total = total
    source._positions = _role_positions(eval_mask(_file_keys(labels, counts), total, frac), role)


# --- globs -----------------------------------------------------------------------------------


def glob_root(pattern: str) -> str:
    """The fixed directory prefix of a glob: its path before the first wildcard component
    (the file's directory for a plain path)."""
    parts = pattern.split(os.sep)
    fixed: list[str] = []
    for part in parts[:-1]:
        if any(c in part for c in _WILDCARD_CHARS):
            break
        fixed.append(part)
    root = os.sep.join(fixed)
    return root or (os.sep if pattern.startswith(os.sep) else ".")


def _listing_hint(root: str) -> str:
    if not os.path.isdir(root):
        return f"The directory {root} does not exist."
    names = sorted(os.listdir(root))
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    return f"{root} holds: {shown or 'nothing'}."


def match_files(spec: SourceSpec) -> tuple[list[str], list[str]]:
    """The files the spec's glob matches (sorted) and their paths relative to its root."""
    pattern = os.path.expanduser(spec.where)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise _source_error(
            spec,
            f"the glob {pattern!r} matches no file",
            f"{_listing_hint(glob_root(pattern))} Fix the path in --config.{FIELD}.",
        )
    root = glob_root(pattern)
    return paths, [os.path.relpath(p, root) for p in paths]


# --- parquet ---------------------------------------------------------------------------------


def _is_text_type(kind: pa.DataType) -> bool:
    checks = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    checks += (pa.types.is_binary, pa.types.is_large_binary)
    return any(check(kind) for check in checks)


class ParquetSource(DocumentSource):
    """Parquet files; only the text column is read, one row group at a time."""

    _TRANSIENT = ("_files", "_cache")

    def __init__(self, spec: SourceSpec, role: str, text_key: str, eval_fraction: float):
        super().__init__(spec, (spec.name,))
        self._paths, labels = match_files(spec)
        self._text_key = text_key
        self._files: list[pq.ParquetFile | None] | None = None
        self._cache: tuple[int, list] | None = None  # (row group, its texts)
        groups: list[tuple[int, int]] = []
        group_rows: list[int] = []
        counts: list[int] = []
        for f, path in enumerate(self._paths):
            rows = self._row_groups(path)
            groups += [(f, g) for g in range(len(rows))]
            group_rows += rows
            counts.append(sum(rows))
        self._groups = np.asarray(groups, np.int64).reshape(-1, 2)  # (file, row group)
        self._group_starts = np.cumsum([0] + group_rows)[:-1]  # first position of each
        _split_by_position(self, labels, counts, role, eval_fraction)
        if self._total:
            self._read(0)  # a corrupt data page fails now

    def _corrupt(self, path: str, e: Exception) -> DataError:
        return _source_error(
            self.spec,
            f"{path} is not a readable parquet file ({type(e).__name__}: {e})",
            "Rewrite or remove the file, or narrow the glob.",
        )

    def _row_groups(self, path: str) -> list[int]:
        """Rows per row group of `path`, after checking it has a text column."""
        try:
            file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise self._corrupt(path, e) from e
        schema = file.schema_arrow
        if self._text_key not in schema.names:
            raise _source_error(
                self.spec,
                f"{path} has no column {self._text_key!r}, which "
                f"{_key_setting(self.spec, self._text_key)} names",
                _field_fix(self.spec, schema.names),
            )
        kind = schema.field(self._text_key).type
        if not _is_text_type(kind):
            raise _source_error(
                self.spec,
                f"column {self._text_key!r} of {path} holds {kind}, not text",
                _field_fix(self.spec, schema.names),
            )
        meta = file.metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def _file(self, f: int) -> pq.ParquetFile:
        if self._files is None:
            self._files = [None] * len(self._paths)
        if self._files[f] is None:
            self._files[f] = pq.ParquetFile(self._paths[f])
        return self._files[f]

    def _texts(self, g: int) -> list:
        """The text column of row group `g` (all files), cached for the next read."""
        if self._cache is None or self._cache[0] != g:
            f, group = (int(x) for x in self._groups[g])
            try:
                table = self._file(f).read_row_group(group, columns=[self._text_key])
            except (pa.ArrowException, OSError) as e:
                raise self._corrupt(self._paths[f], e) from e
            self._cache = (g, table.column(0).to_pylist())
        return self._cache[1]

    def _read(self, position: int) -> dict[str, Any]:
        g = int(np.searchsorted(self._group_starts, position, side="right")) - 1
        with self._lock:
            texts = self._texts(g)
        return {"text": _as_text(texts[position - int(self._group_starts[g])]), "domain": 0}


# --- jsonl ------------------------------------------------------------------------------------


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) of each non-blank line of a plain file."""
    starts, ends, numbers = [], [], []
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                starts.append(offset)
                ends.append(offset + len(line))
                numbers.append(number)
            offset += len(line)
    return tuple(np.asarray(a, np.int64) for a in (starts, ends, numbers))


def _gz_lines(path: str) -> list[bytes]:
    """Every line of a gzipped file, decompressed whole (gzip cannot seek cheaply)."""
    with gzip.open(path, "rb") as f:
        return f.read().split(b"\n")


class JsonlSource(DocumentSource):
    """JSON-lines files (`.jsonl`, or `.jsonl.gz` decompressed whole into memory)."""

    _TRANSIENT = ("_handles", "_gz")

    def __init__(self, spec: SourceSpec, role: str, text_key: str, eval_fraction: float):
        super().__init__(spec, (spec.name,))
        self._paths, labels = match_files(spec)
        self._text_key = text_key
        self._handles: dict[int, Any] | None = None  # open plain files
        self._gz: dict[int, list[bytes]] | None = None  # decompressed .gz lines
        self._spans: list[tuple[np.ndarray, np.ndarray] | None] = []  # plain: (starts, ends)
        self._numbers: list[np.ndarray] = []  # 1-based line number of each document
        for f, path in enumerate(self._paths):
            self._index(f, path)
        counts = [len(n) for n in self._numbers]
        self._file_starts = np.cumsum([0] + counts)[:-1]
        _split_by_position(self, labels, counts, role, eval_fraction)
        for f, count in enumerate(counts):
            if count:
                self._read(int(self._file_starts[f]))  # the wrong field fails now

    def _index(self, f: int, path: str) -> None:
        try:
            if path.endswith(".gz"):
                lines = self._gz_file(f, path)
                numbers = [i + 1 for i, line in enumerate(lines) if line.strip()]
                self._spans.append(None)
                self._numbers.append(np.asarray(numbers, np.int64))
            else:
                starts, ends, numbers = _index_lines(path)
                self._spans.append((starts, ends))
                self._numbers.append(numbers)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise _source_error(
                self.spec,
                f"cannot read {path} ({type(e).__name__}: {e})",
                "Rewrite or remove the file, or narrow the glob.",
            ) from e

    def _gz_file(self, f: int, path: str) -> list[bytes]:
        if self._gz is None:
            self._gz = {}
        if f not in self._gz:
            self._gz[f] = _gz_lines(path)
        return self._gz[f]

    def _line(self, f: int, r: int) -> bytes:
        spans = self._spans[f]
        if spans is None:
            with self._lock:
                lines = self._gz_file(f, self._paths[f])
            return lines[int(self._numbers[f][r]) - 1]
        with self._lock:
            if self._handles is None:
                self._handles = {}
            if f not in self._handles:
                self._handles[f] = open(self._paths[f], "rb")
            fd = self._handles[f].fileno()
        start, end = int(spans[0][r]), int(spans[1][r])
        return os.pread(fd, end - start, start)

    def _text(self, f: int, r: int, raw: bytes) -> str:
        where = f"{self._paths[f]} line {int(self._numbers[f][r])}"
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise _source_error(
                self.spec,
                f"{where} is not JSON ({e})",
                "Fix or remove that line: each line must be one JSON object.",
            ) from e
        fields = list(record) if isinstance(record, dict) else []
        if self._text_key not in fields:
            raise _source_error(
                self.spec,
                f"{where} has no field {self._text_key!r}, which "
                f"{_key_setting(self.spec, self._text_key)} names",
                _field_fix(self.spec, fields),
            )
        text = _as_text(record[self._text_key])
        if text is None:
            raise _source_error(
                self.spec,
                f"{where}: field {self._text_key!r} holds "
                f"{type(record[self._text_key]).__name__}, not text",
                _field_fix(self.spec, fields),
            )
        return text

    def _read(self, position: int) -> dict[str, Any]:
        f = int(np.searchsorted(self._file_starts, position, side="right")) - 1
        r = position - int(self._file_starts[f])
        return {"text": self._text(f, r, self._line(f, r)), "domain": 0}


# --- sources with their own splits: hf_disk, tfds, corpus -------------------------------------


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
        self._dir = os.path.expanduser(spec.where)
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
            _split_by_position(self, [self._split or ""], [len(loaded)], role, eval_fraction)
        else:
            self._total = len(loaded)
        if self._total:
            self._read(0)

    def _load(self) -> Any:
        import datasets  # the hf extra: only hf_disk sources need it

        if not os.path.isdir(self._dir):
            raise _source_error(
                self.spec,
                f"the directory {self._dir} does not exist",
                f"{_listing_hint(os.path.dirname(self._dir) or '.')} Point hf_disk: at a "
                "directory written by Dataset.save_to_disk / DatasetDict.save_to_disk.",
            )
        try:
            return datasets.load_from_disk(self._dir)
        except Exception as e:
            raise _source_error(
                self.spec,
                f"datasets.load_from_disk cannot read {self._dir} ({type(e).__name__}: {e})",
                "Point hf_disk: at a directory written by save_to_disk, or save it again.",
            ) from e

    def _check_columns(self, columns: Sequence[str]) -> None:
        if self._text_key not in columns:
            raise _source_error(
                self.spec,
                f"{self._dir} has no column {self._text_key!r}, which "
                f"{_key_setting(self.spec, self._text_key)} names",
                _field_fix(self.spec, columns),
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
        text = _as_text(value)
        if text is None:
            raise _source_error(
                self.spec,
                f"column {self._text_key!r} of {self._dir} holds {type(value).__name__}, not text",
                _field_fix(self.spec, [self._text_key]),
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
            raise _source_error(
                spec,
                f"{spec.where!r} has no feature {self._text_key!r}, which "
                f"{_key_setting(spec, self._text_key)} names",
                _field_fix(spec, features.keys()),
            )
        self._source = self._open(builder)
        if carve:
            _split_by_position(self, [self._split], [len(self._source)], role, eval_fraction)
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
        text = _as_text(record[self._text_key])
        if text is None:
            raise _source_error(
                self.spec,
                f"feature {self._text_key!r} holds {type(record[self._text_key]).__name__}, "
                "not text",
                "Name a text feature with #FIELD or --config.data.text_key.",
            )
        return {"text": text, "domain": int(record["domain"]) if self._corpus else 0}


# --- array_record: pre-tokenized documents ---------------------------------------------------

_INT32 = np.iinfo(np.int32)


def write_token_records(path: str, rows: Iterable[Sequence[int] | np.ndarray]) -> int:
    """Writes one array_record file of pre-tokenized documents, one record per row: the
    row's token ids as raw little-endian int32 bytes. Returns the number of rows written."""
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for row in rows:
            ids = np.asarray(row)
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(f"row {count}: expected a 1-D list of int token ids.")
            if ids.size and (ids.min() < _INT32.min or ids.max() > _INT32.max):
                raise ValueError(f"row {count}: token ids do not fit in int32.")
            writer.write(ids.astype("<i4").tobytes())
            count += 1
    finally:
        writer.close()
    return count


class ArrayRecordSource(DocumentSource):
    """array_record files of token-id documents (`write_token_records`)."""

    def __init__(self, spec: SourceSpec, role: str, eval_fraction: float):
        super().__init__(spec, (spec.name,))
        paths, labels = match_files(spec)
        counts = [self._count(path) for path in paths]
        # Picklable as is: it drops its open readers itself and reopens them lazily.
        self._records = array_record_data_source.ArrayRecordDataSource(paths)
        _split_by_position(self, labels, counts, role, eval_fraction)
        if self._total:
            self._read(0)

    def _count(self, path: str) -> int:
        try:
            file = array_record_module.ArrayRecordReader(path)
            try:
                return int(file.num_records())
            finally:
                file.close()
        except Exception as e:
            raise _source_error(
                self.spec,
                f"{path} is not a readable array_record file ({type(e).__name__}: {e})",
                "Write token files with moejax.data.document_sources.write_token_records, or "
                "narrow the glob.",
            ) from e

    def _read(self, position: int) -> dict[str, Any]:
        raw = self._records[position]
        if len(raw) % 4:
            raise _source_error(
                self.spec,
                f"record {position} is {len(raw)} bytes, not whole int32 token ids",
                "Write token files with moejax.data.document_sources.write_token_records.",
            )
        return {"tokens": np.frombuffer(raw, "<i4").astype(np.int32), "domain": 0}


# --- entry points -----------------------------------------------------------------------------


def open_source(
    spec: SourceSpec,
    role: str,
    *,
    data_dir: str,
    text_key: str,
    train_split: str,
    eval_split: str,
    eval_fraction: float,
    max_bytes_per_domain: int,
) -> DocumentSource:
    """The `role` ("train" or "eval") documents of one `data.sources` item, checked now.

    `data_dir` ("" for the default) holds the corpus and tfds datasets; `text_key` is
    data.text_key (the item's #FIELD wins); the splits and `eval_fraction` decide the
    roles (module docstring); `max_bytes_per_domain` selects the corpus variant.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
    _check_fraction(eval_fraction)
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    key = spec.text_key or text_key
    if spec.kind in (CORPUS, TFDS):
        return TfdsSource(
            spec,
            role,
            data_dir=data_dir,
            text_key=key,
            train_split=train_split,
            eval_split=eval_split,
            eval_fraction=eval_fraction,
            max_bytes_per_domain=max_bytes_per_domain,
        )
    if spec.kind == PARQUET:
        return ParquetSource(spec, role, key, eval_fraction)
    if spec.kind == JSONL:
        return JsonlSource(spec, role, key, eval_fraction)
    if spec.kind == HF_DISK:
        return HfDiskSource(spec, role, key, train_split, eval_split, eval_fraction)
    if spec.kind == ARRAY_RECORD:
        return ArrayRecordSource(spec, role, eval_fraction)
    raise ValueError(f"unknown source kind {spec.kind!r}")  # parse_sources rejects these


def iter_texts(
    sources: str,
    *,
    data_dir: str,
    text_key: str,
    split: str = TRAIN,
    eval_split: str = "validation",
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> Iterator[str]:
    """The texts of the train role of every `data.sources` item, source after source, in
    stored order (for tokenizer training). `split` is the train split's name. Every source
    is opened (and checked) by this call, before the first text; array_record items are
    skipped with a warning (already tokenized), and DataError if nothing else is left."""
    specs = parse_sources(sources)
    for spec in specs:
        if spec.kind in TOKENIZED_KINDS:
            warnings.warn(
                f"{FIELD}: skipping {spec.item!r}: {spec.kind} documents are already token "
                "ids, there is no text to train a tokenizer on.",
                stacklevel=2,
            )
    texts = [s for s in specs if s.kind not in TOKENIZED_KINDS]
    if not texts:
        raise DataError(
            f"{FIELD}={sources!r} lists only pre-tokenized sources; list at least one text "
            "source (corpus, tfds, parquet, jsonl or hf_disk) to train a tokenizer on."
        )
    opened = [
        open_source(
            spec,
            TRAIN,
            data_dir=data_dir,
            text_key=text_key,
            train_split=split,
            eval_split=eval_split,
            eval_fraction=eval_fraction,
            max_bytes_per_domain=max_bytes_per_domain,
        )
        for spec in texts
    ]
    return (source[i]["text"] for source in opened for i in range(len(source)))
