"""`data.sources`: the list of document sources a run reads, and their sampling weights.

The setting is a comma-separated list of items `KIND:WHERE[#FIELD][@WEIGHT]`:

    --config.data.sources="parquet:/d/web-*.parquet@0.7,jsonl:/d/code-*.jsonl#content@0.3"

- KIND is the text before the first ':' (one of `KINDS`):
  `corpus` the built-in offline corpus (no WHERE: write just `corpus`, or `corpus@0.5`);
  `tfds:NAME[/CONFIG][:VERSION]` a tensorflow-datasets dataset prepared in data.data_dir;
  `parquet:GLOB`, `jsonl:GLOB` (also `.jsonl.gz`) files matched by a glob;
  `hf_disk:DIR` a Hugging Face `datasets` `save_to_disk` directory;
  `array_record:GLOB` pre-tokenized documents (see `document_sources.write_token_records`).
- WEIGHT, after the last '@', is the source's sampling proportion (a positive finite
  number, default 1.0). A WHERE that itself contains '@' therefore needs an explicit weight.
- FIELD, after the last '#' (before the weight), overrides `data.text_key` for that source.
- WHERE may contain ':' (`tfds:c4/en:3.1.0`) but not ',' (the item separator).

Each parsed item gets a `name`: short, unique and safe in metric names (letters, digits,
'_' and '-'), e.g. `/d/web-*.parquet` -> "web", `tfds:c4/en:3.1.0` -> "c4_en".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from moejax.data.errors import DataError

FIELD = "data.sources"
CORPUS = "corpus"
TFDS = "tfds"
PARQUET = "parquet"
JSONL = "jsonl"
HF_DISK = "hf_disk"
ARRAY_RECORD = "array_record"
KINDS = (CORPUS, TFDS, PARQUET, JSONL, HF_DISK, ARRAY_RECORD)
# Kinds whose documents are token ids, not text: a text field means nothing to them.
TOKENIZED_KINDS = (ARRAY_RECORD,)
_EXAMPLE = "parquet:/d/web-*.parquet@0.7,jsonl:/d/code-*.jsonl#content@0.3"
_EXTENSIONS = (".gz", ".parquet", ".jsonl", ".json", ".array_record", ".arrayrecord")
_WILDCARDS = re.compile(r"\[[^\]]*\]|[*?]")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One item of `data.sources`.

    Attributes:
      kind: one of `KINDS`.
      where: the glob, directory or tfds name ("" for `corpus`).
      weight: sampling proportion (positive, finite; need not sum to 1 over the list).
      text_key: the `#FIELD` override of `data.text_key`, or None.
      name: short unique display name (metrics, logs).
    """

    kind: str
    where: str
    weight: float = 1.0
    text_key: str | None = None
    name: str = ""

    @property
    def item(self) -> str:
        """The item as the user would write it, for messages."""
        out = self.kind + (f":{self.where}" if self.where else "")
        return out + (f"#{self.text_key}" if self.text_key else "")


def _error(item: str, problem: str, fix: str) -> DataError:
    return DataError(
        f"{FIELD}: item {item!r} {problem}. {fix} Each item is KIND:WHERE[#FIELD][@WEIGHT], "
        f"e.g. --config.{FIELD}={_EXAMPLE!r}."
    )


def _parse_weight(item: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise _error(
            item,
            f"has weight {text!r}, which is not a positive finite number",
            "Write a weight > 0 after the last '@' (a location containing '@' needs an "
            "explicit weight, e.g. '@1').",
        )
    return weight


def _parse_item(item: str) -> SourceSpec:
    """One `KIND:WHERE[#FIELD][@WEIGHT]` item, without its name yet."""
    body, at, weight_text = item.rpartition("@")
    if not at:
        body, weight_text = item, ""
    weight = _parse_weight(item, weight_text) if at else 1.0
    rest, hash_, text_key = body.rpartition("#")
    if not hash_:
        rest, text_key = body, ""
    elif not text_key:
        raise _error(item, "has an empty #FIELD", "Name the text field after '#', or drop '#'.")
    kind, _, where = rest.partition(":")
    kind, where = kind.strip(), where.strip()
    if kind not in KINDS:
        raise _error(
            item, f"has unknown kind {kind!r}", f"Valid kinds: {', '.join(KINDS)} (before ':')."
        )
    if kind == CORPUS and where:
        raise _error(item, "gives corpus a location", "Write just 'corpus' (it lives in data_dir).")
    if kind != CORPUS and not where:
        raise _error(item, f"has no location after '{kind}:'", "Add the glob, directory or name.")
    if hash_ and kind in (CORPUS, *TOKENIZED_KINDS):
        raise _error(item, f"gives a #FIELD to {kind}, which has none", "Drop the '#...' part.")
    return SourceSpec(kind, where, weight, text_key or None)


def base_name(kind: str, where: str) -> str:
    """The display name before de-duplication: the glob basename without wildcards or
    extensions, the tfds name and config without version, the directory basename."""
    if kind == CORPUS:
        return CORPUS
    if kind == TFDS:
        raw = where.split(":", 1)[0].replace("/", "_")
    else:
        path = where.rstrip("/\\")
        raw = os.path.basename(path)
        while raw.lower().endswith(_EXTENSIONS):
            raw = raw[: raw.rfind(".")]
        raw = _WILDCARDS.sub("", raw)
        if not re.search(r"[A-Za-z0-9]", raw):  # "*.parquet": name it after its directory
            raw = _WILDCARDS.sub("", os.path.basename(os.path.dirname(path)))
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_-.")
    return name or kind


def _unique_names(specs: list[SourceSpec]) -> tuple[SourceSpec, ...]:
    """Gives every spec its name, suffixing repeats with _2, _3, ..."""
    bases = [base_name(s.kind, s.where) for s in specs]
    taken: set[str] = set()
    out = []
    for spec, base in zip(specs, bases):
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        out.append(dataclasses.replace(spec, name=name))
    return tuple(out)


def parse_sources(spec: str) -> tuple[SourceSpec, ...]:
    """Parses `data.sources`; raises DataError naming the field and the fix."""
    if not spec or not spec.strip():
        raise DataError(
            f"{FIELD} is empty; list at least one source, e.g. --config.{FIELD}={_EXAMPLE!r} "
            f"or --config.{FIELD}=corpus."
        )
    specs: list[SourceSpec] = []
    seen: dict[tuple[str, str, str | None], str] = {}
    for position, raw in enumerate(spec.split(",")):
        item = raw.strip()
        if not item:
            raise DataError(
                f"{FIELD}={spec!r}: item {position + 1} is empty (a stray ','); remove it."
            )
        parsed = _parse_item(item)
        key = (parsed.kind, parsed.where, parsed.text_key)
        if key in seen:
            raise _error(
                item,
                f"lists the same source as {seen[key]!r}",
                "List each source once and give it the sum of the weights.",
            )
        seen[key] = item
        specs.append(parsed)
    return _unique_names(specs)
