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

import os
import warnings
from collections.abc import Iterator

from moejax.data.config import default_data_dir
from moejax.data.corpus_sources import DEFAULT_MAX_BYTES_PER_DOMAIN
from moejax.data.dataset_sources import HfDiskSource, TfdsSource
from moejax.data.errors import DataError
from moejax.data.file_sources import (
    ArrayRecordSource,
    JsonlSource,
    ParquetSource,
    write_token_records,
)
from moejax.data.source_base import (
    DEFAULT_EVAL_FRACTION,
    ROLES,
    TRAIN,
    DocumentSource,
    check_fraction,
    eval_mask,
    glob_root,
    match_files,
)
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
from moejax.paths import is_remote

__all__ = [
    "DocumentSource",
    "eval_mask",
    "glob_root",
    "iter_texts",
    "match_files",
    "open_source",
    "write_token_records",
]


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
    check_fraction(eval_fraction)
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    key = spec.text_key or text_key
    if spec.kind in (CORPUS, TFDS) and is_remote(data_dir):
        raise DataError(
            f"data.data_dir={data_dir!r} is in a bucket, but {spec.kind} sources are "
            f"array_record files read from local disk only (the source {spec.name!r}). Copy "
            f"the prepared dataset to each host (gcloud storage cp -r) and point "
            f"--config.data.data_dir there, or store the documents as parquet/jsonl in the "
            f"bucket and name them in --config.data.sources."
        )
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
