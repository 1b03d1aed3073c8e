"""What every document source of `document_sources.py` shares: the `DocumentSource` base
(grain's RandomAccessDataSource protocol, picklable), the train/eval roles and the
position-hash split rule, glob matching and the DataError messages.

The split rule (documented in full in `document_sources.py`): a document of a source without
splits is in eval when `stable_fraction("<file relative to the glob root>:<row>")` is below
`data.eval_fraction`, with tiny sources topped up so both roles are non-empty.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from moejax.data.errors import DataError
from moejax.data.source_spec import (
    FIELD,
    SourceSpec,
)
from moejax.data.text_files import stable_fraction
from moejax.paths import as_path, glob_files, is_remote, resolve

TRAIN = "train"
EVAL = "eval"
ROLES = (TRAIN, EVAL)
DEFAULT_EVAL_FRACTION = 0.05
WILDCARD_CHARS = "*?["


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


def source_error(spec: SourceSpec, problem: str, fix: str) -> DataError:
    return DataError(f"{FIELD}: {spec.item!r}: {problem}. {fix}")


def key_setting(spec: SourceSpec, text_key: str) -> str:
    """How the user chose the text field, for messages."""
    if spec.text_key:
        return f"the field #{text_key} of {FIELD} item {spec.item!r}"
    return f"data.text_key={text_key!r} (for {FIELD} item {spec.item!r})"


def field_fix(spec: SourceSpec, fields: Iterable[str]) -> str:
    fields = sorted(fields)
    example = fields[0] if fields else "content"
    return (
        f"Fields present: {fields}. Name the text field with #FIELD "
        f"(e.g. {spec.kind}:{spec.where}#{example}) or set --config.data.text_key."
    )


def as_text(value: Any) -> str | None:
    """str for str/bytes (UTF-8, undecodable bytes replaced), "" for null, else None."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return None


# --- deterministic split -------------------------------------------------------------------


def check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(
            f"data.eval_fraction={eval_fraction!r} must be in (0, 1); set "
            "--config.data.eval_fraction to e.g. 0.05."
        )


def eval_mask(keys: Iterable[str], count: int, eval_fraction: float) -> np.ndarray:
    """Which of `count` documents (named by `keys`) are eval: `stable_fraction(key) <
    eval_fraction`, topped up so that eval is not empty when count >= 2 and train never is
    when count >= 1 (see the module docstring)."""
    check_fraction(eval_fraction)
    fractions = np.fromiter((stable_fraction(k) for k in keys), np.float64, count=count)
    mask = fractions < eval_fraction
    if count >= 2 and not mask.any():
        mask[np.argmin(fractions)] = True
    if count >= 1 and mask.all():
        mask[np.argmax(fractions)] = False
    return mask


def role_positions(mask: np.ndarray, role: str) -> np.ndarray:
    return np.flatnonzero(mask if role == EVAL else ~mask).astype(np.int64)


def file_keys(labels: Sequence[str], counts: Sequence[int]) -> Iterator[str]:
    for label, count in zip(labels, counts):
        for row in range(count):
            yield f"{label}:{row}"


def split_by_position(
    source: DocumentSource, labels: Sequence[str], counts: Sequence[int], role: str, frac: float
) -> None:
    """Sets `source._positions` to the role's documents (rows of `labels` in order)."""
    total = int(sum(counts))
    source._total = total
    source._positions = role_positions(eval_mask(file_keys(labels, counts), total, frac), role)


# --- globs -----------------------------------------------------------------------------------


def glob_root(pattern: str) -> str:
    """The fixed directory prefix of a glob: its path before the first wildcard component
    (the file's directory for a plain path)."""
    parts = pattern.split(os.sep)
    fixed: list[str] = []
    for part in parts[:-1]:
        if any(c in part for c in WILDCARD_CHARS):
            break
        fixed.append(part)
    root = os.sep.join(fixed)
    return root or (os.sep if pattern.startswith(os.sep) else ".")


def listing_hint(root: str) -> str:
    directory = as_path(root)
    if not directory.is_dir():
        return f"The directory {resolve(root)} does not exist."
    names = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    return f"{resolve(root)} holds: {shown or 'nothing'}."


def match_files(spec: SourceSpec) -> tuple[list[str], list[str]]:
    """The files the spec's glob matches (sorted; local or gs://, `moejax.paths`) and their
    paths relative to its root (the same for a copy of the data on disk or in a bucket, so
    the train/eval split does not depend on where the files live)."""
    pattern = spec.where if is_remote(spec.where) else os.path.expanduser(spec.where)
    paths = glob_files(pattern)
    if not paths:
        raise source_error(
            spec,
            f"the glob {pattern!r} matches no file",
            f"{listing_hint(glob_root(pattern))} Fix the path in --config.{FIELD}.",
        )
    root = glob_root(pattern)
    if is_remote(pattern):
        return paths, [p[len(root.rstrip("/")) + 1 :] for p in paths]
    return paths, [os.path.relpath(p, root) for p in paths]
