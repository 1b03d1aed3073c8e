"""Document sources read from files: `parquet:GLOB` (the text column, one row group at a
time), `jsonl:GLOB` (line offsets; `.jsonl.gz` decompressed whole) and `array_record:GLOB`
(pre-tokenized documents as little-endian int32 records; `write_token_records` writes them).
Each is split into train/eval roles by the position hash of `source_base.py`."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python import array_record_data_source, array_record_module

from moejax.data.errors import DataError
from moejax.data.source_base import (
    DocumentSource,
    as_text,
    field_fix,
    key_setting,
    match_files,
    source_error,
    split_by_position,
)
from moejax.data.source_spec import (
    SourceSpec,
)
from moejax.paths import as_path, is_remote

_INT32 = np.iinfo(np.int32)


# --- parquet ---------------------------------------------------------------------------------


def _parquet(path: str) -> pq.ParquetFile:
    """A parquet file on disk or in a bucket: pyarrow reads row groups by ranged reads of the
    epath handle (gcsfs for gs://)."""
    return pq.ParquetFile(as_path(path).open("rb"))


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
        split_by_position(self, labels, counts, role, eval_fraction)
        if self._total:
            self._read(0)  # a corrupt data page fails now

    def _corrupt(self, path: str, e: Exception) -> DataError:
        return source_error(
            self.spec,
            f"{path} is not a readable parquet file ({type(e).__name__}: {e})",
            "Rewrite or remove the file, or narrow the glob.",
        )

    def _row_groups(self, path: str) -> list[int]:
        """Rows per row group of `path`, after checking it has a text column."""
        try:
            file = _parquet(path)
        except (pa.ArrowException, OSError) as e:
            raise self._corrupt(path, e) from e
        schema = file.schema_arrow
        if self._text_key not in schema.names:
            raise source_error(
                self.spec,
                f"{path} has no column {self._text_key!r}, which "
                f"{key_setting(self.spec, self._text_key)} names",
                field_fix(self.spec, schema.names),
            )
        kind = schema.field(self._text_key).type
        if not _is_text_type(kind):
            raise source_error(
                self.spec,
                f"column {self._text_key!r} of {path} holds {kind}, not text",
                field_fix(self.spec, schema.names),
            )
        meta = file.metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def _file(self, f: int) -> pq.ParquetFile:
        if self._files is None:
            self._files = [None] * len(self._paths)
        if self._files[f] is None:
            self._files[f] = _parquet(self._paths[f])
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
        return {"text": as_text(texts[position - int(self._group_starts[g])]), "domain": 0}


# --- jsonl ------------------------------------------------------------------------------------


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) of each non-blank line of a plain file."""
    starts, ends, numbers = [], [], []
    offset = 0
    with as_path(path).open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                starts.append(offset)
                ends.append(offset + len(line))
                numbers.append(number)
            offset += len(line)
    return tuple(np.asarray(a, np.int64) for a in (starts, ends, numbers))


def _gz_lines(path: str) -> list[bytes]:
    """Every line of a gzipped file, decompressed whole (gzip cannot seek cheaply)."""
    with as_path(path).open("rb") as raw, gzip.GzipFile(fileobj=raw) as f:
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
        split_by_position(self, labels, counts, role, eval_fraction)
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
            raise source_error(
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
        start, end = int(spans[0][r]), int(spans[1][r])
        with self._lock:
            if self._handles is None:
                self._handles = {}
            if f not in self._handles:
                self._handles[f] = as_path(self._paths[f]).open("rb")
            handle = self._handles[f]
            if is_remote(self._paths[f]):  # a gcsfs file: ranged reads, one at a time
                handle.seek(start)
                return handle.read(end - start)
            fd = handle.fileno()
        return os.pread(fd, end - start, start)

    def _text(self, f: int, r: int, raw: bytes) -> str:
        where = f"{self._paths[f]} line {int(self._numbers[f][r])}"
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise source_error(
                self.spec,
                f"{where} is not JSON ({e})",
                "Fix or remove that line: each line must be one JSON object.",
            ) from e
        fields = list(record) if isinstance(record, dict) else []
        if self._text_key not in fields:
            raise source_error(
                self.spec,
                f"{where} has no field {self._text_key!r}, which "
                f"{key_setting(self.spec, self._text_key)} names",
                field_fix(self.spec, fields),
            )
        text = as_text(record[self._text_key])
        if text is None:
            raise source_error(
                self.spec,
                f"{where}: field {self._text_key!r} holds "
                f"{type(record[self._text_key]).__name__}, not text",
                field_fix(self.spec, fields),
            )
        return text

    def _read(self, position: int) -> dict[str, Any]:
        f = int(np.searchsorted(self._file_starts, position, side="right")) - 1
        r = position - int(self._file_starts[f])
        return {"text": self._text(f, r, self._line(f, r)), "domain": 0}


# --- array_record: pre-tokenized documents ---------------------------------------------------


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
        if is_remote(paths[0]):  # array_record's C++ reader opens local files only
            raise source_error(
                spec,
                f"array_record files are read from local disk only, and {paths[0]} is in a bucket",
                "Copy them to each host first (gcloud storage cp -r), or store the documents "
                "as parquet or jsonl, which are read from the bucket directly.",
            )
        counts = [self._count(path) for path in paths]
        # Picklable as is: it drops its open readers itself and reopens them lazily.
        self._records = array_record_data_source.ArrayRecordDataSource(paths)
        split_by_position(self, labels, counts, role, eval_fraction)
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
            raise source_error(
                self.spec,
                f"{path} is not a readable array_record file ({type(e).__name__}: {e})",
                "Write token files with moejax.data.document_sources.write_token_records, or "
                "narrow the glob.",
            ) from e

    def _read(self, position: int) -> dict[str, Any]:
        raw = self._records[position]
        if len(raw) % 4:
            raise source_error(
                self.spec,
                f"record {position} is {len(raw)} bytes, not whole int32 token ids",
                "Write token files with moejax.data.document_sources.write_token_records.",
            )
        return {"tokens": np.frombuffer(raw, "<i4").astype(np.int32), "domain": 0}
