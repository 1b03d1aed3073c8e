"""`moejax_corpus`: the offline multi-domain corpus as a tensorflow-datasets builder, built
once per data dir (`build_corpus`: under a file lock, reused when prepared). The builder
class is in `corpus_tfds.py`, which imports tensorflow-datasets and is loaded on first use.

Nothing is downloaded: `_split_generators` ignores the download manager and reads the
sources of `corpus_sources.py` (stdlib code, system prose, generated arithmetic). Records are
`{"text": str, "domain": ClassLabel(DOMAINS), "doc_id": str}` written as array_record, so
they are read by random access through `builder.as_data_source()`, without TensorFlow.

The size cap selects a builder config (`domain_bytes_<cap>`), so corpora of different
sizes live side by side in one data dir and a test corpus is never mistaken for the full
one. Per split and domain document/byte counts are stored in the dataset metadata at build
time, so `describe()` costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from absl import logging

from moejax.data import config as config_lib
from moejax.data import corpus_sources

DEFAULT_MAX_BYTES_PER_DOMAIN = corpus_sources.DEFAULT_MAX_BYTES_PER_DOMAIN

if TYPE_CHECKING:
    import tensorflow_datasets as tfds


def __getattr__(name: str):
    """`MoejaxCorpus`, `MoejaxCorpusConfig` and `corpus_config` live in `corpus_tfds`, which
    imports tensorflow-datasets: loaded on first access (`_tfds`)."""
    if name in ("MoejaxCorpus", "MoejaxCorpusConfig", "corpus_config"):
        return getattr(_tfds(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tfds():
    """The tfds builder module, imported on first use so that moejax imports without
    tensorflow-datasets (a GPU image without it runs models and the train-step benchmark).
    The one import by name in the package: `corpus_tfds` imports no moejax module that could
    import this one, so no cycle hides behind it."""
    return importlib.import_module("moejax.data.corpus_tfds")


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock: concurrent builders (pytest-xdist workers, the processes of
    one multi-process job on a shared disk) wait for the first one instead of racing."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Captures tfds's banners, progress bars and log lines; replays them on failure."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def _make_builder(data_dir: str, max_bytes_per_domain: int) -> tfds.core.DatasetBuilder:
    module = _tfds()
    with _quiet():  # constructing a custom config logs a warning we expect
        return module.MoejaxCorpus(
            data_dir=data_dir,
            config=module.corpus_config(max_bytes_per_domain),
            file_format="array_record",
        )


def prepared_dir(data_dir: str, max_bytes_per_domain: int) -> str:
    """Where the corpus of this size lives under `data_dir` (tfds's layout)."""
    return os.path.join(
        data_dir,
        "moejax_corpus",
        corpus_sources.config_name(max_bytes_per_domain),
        corpus_sources.CORPUS_VERSION,
    )


def _reuse(data_dir: str, max_bytes_per_domain: int) -> tfds.core.DatasetBuilder | None:
    """The builder if this corpus is already prepared under `data_dir`, else None."""
    if not os.path.isdir(prepared_dir(data_dir, max_bytes_per_domain)):
        return None  # skip tfds's "has no dataset_info.json" warning on a fresh dir
    builder = _make_builder(data_dir, max_bytes_per_domain)
    with _quiet():
        prepared = builder.is_prepared()
    if not prepared:
        return None
    # Logged, not printed: every split and evaluation opens the corpus again.
    logging.info("moejax_corpus/%s: reusing %s", builder.builder_config.name, builder.data_dir)
    return builder


def build_corpus(
    data_dir: str | None = None,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> tfds.core.DatasetBuilder:
    """Builds the corpus once under `data_dir` and returns a builder ready for reading.

    Idempotent: a prepared corpus is reused. Safe to call from several processes at once:
    the first builds under a file lock while the others wait, then all read the same files
    (tfds also writes into a temporary directory and renames it into place, so a crash
    never leaves a half-written corpus behind). Prints one line either way.
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else config_lib.default_data_dir()
    name = corpus_sources.config_name(max_bytes_per_domain)
    builder = _reuse(data_dir, max_bytes_per_domain)  # no lock: data_dir may be read-only
    if builder is not None:
        return builder
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, f".moejax_corpus.{name}.lock")):
        builder = _reuse(data_dir, max_bytes_per_domain)  # built while we waited for the lock?
        if builder is not None:
            return builder
        builder = _make_builder(data_dir, max_bytes_per_domain)
        start = time.perf_counter()
        with _quiet():
            builder.download_and_prepare(
                download_dir=os.path.join(data_dir, "downloads"),
                file_format="array_record",
            )
        seconds = time.perf_counter() - start
    builder = _make_builder(data_dir, max_bytes_per_domain)  # re-read the written info
    stats = builder.info.metadata["stats"]
    sizes = ", ".join(
        f"{split} {s['documents']} docs / {s['bytes'] / 1e6:.2f} MB" for split, s in stats.items()
    )
    print(
        f"moejax_corpus/{name}: built in {seconds:.1f} s ({sizes}) -> {builder.data_dir}",
        flush=True,
    )
    return builder
