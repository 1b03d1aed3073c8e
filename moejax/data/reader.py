"""Opening tensorflow-datasets splits by index, with errors that name the setting and the fix.

`corpus_builder_in(data_dir, max_bytes_per_domain)` opens the moejax corpus (built on first
use, offline, seconds), `prepared_builder(name, data_dir, ...)` any other tfds dataset, which
must already be prepared in array_record format (the pipeline needs random access: shuffling
is a permutation of indices and resuming jumps straight to a document), and
`data_source(builder, split, ...)` one split of either. `document_sources.py` uses them for
the `corpus` and `tfds:` kinds of `data.sources`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from moejax.data import corpus_builder
from moejax.data.config import DATA_DIR_ENV, DEFAULT_DATASET
from moejax.data.errors import DataError

if TYPE_CHECKING:
    import tensorflow_datasets as tfds


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


def prepared_builder(
    name: str, data_dir: str, *, setting: str, alternatives: str
) -> tfds.core.DatasetBuilder:
    """The tfds dataset `name` (`NAME[/CONFIG][:VERSION]`) as prepared in `data_dir`.

    `setting` is how the user named it (`data.sources: tfds:c4`), `alternatives` the fix when
    `name` is not a tfds dataset; both go into the DataError messages.
    """
    import tensorflow_datasets as tfds  # imported when a tfds source is opened

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise DataError(
            f"{setting} is not prepared in data.data_dir={data_dir!r}, and tensorflow-datasets "
            f"here has no builder of that name. If it is a tfds dataset, prepare it with "
            f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` (on a "
            f"machine with TensorFlow), or copy a prepared directory into data.data_dir. "
            f"{alternatives}"
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
