"""`moejax_corpus`: the offline multi-domain corpus as a tensorflow-datasets builder.

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
import dataclasses
import fcntl
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from moejax.data import config as config_lib
from moejax.data import corpus_sources, splits

DEFAULT_MAX_BYTES_PER_DOMAIN = corpus_sources.DEFAULT_MAX_BYTES_PER_DOMAIN


@dataclasses.dataclass(eq=False)
class MoejaxCorpusConfig(tfds.core.BuilderConfig):
    """A corpus variant: how many bytes each domain holds."""

    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN


def _config_name(max_bytes_per_domain: int) -> str:
    return f"domain_bytes_{max_bytes_per_domain}"


_DEFAULT_CONFIG = MoejaxCorpusConfig(
    name=_config_name(DEFAULT_MAX_BYTES_PER_DOMAIN),
    description="About 4 MB of text per domain.",
    max_bytes_per_domain=DEFAULT_MAX_BYTES_PER_DOMAIN,
)


def corpus_config(max_bytes_per_domain: int) -> MoejaxCorpusConfig:
    """The registered default config, or a custom one for another size."""
    if max_bytes_per_domain == DEFAULT_MAX_BYTES_PER_DOMAIN:
        return _DEFAULT_CONFIG  # tfds requires the registered instance itself
    if max_bytes_per_domain <= 0:
        raise ValueError(f"data.max_bytes_per_domain must be positive, got {max_bytes_per_domain}.")
    return MoejaxCorpusConfig(
        name=_config_name(max_bytes_per_domain),
        description=f"{max_bytes_per_domain} bytes of text per domain.",
        max_bytes_per_domain=max_bytes_per_domain,
    )


class MoejaxCorpus(tfds.core.GeneratorBasedBuilder):
    """Offline code / prose / arithmetic corpus; registered in tfds as `moejax_corpus`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stdlib code, system prose, generated arithmetic."}
    BUILDER_CONFIGS = [_DEFAULT_CONFIG]
    # tfds 4.9.10 derives `code_path` through `importlib_resources`, a package it only
    # declares for Python < 3.9, so the derivation raises ModuleNotFoundError on 3.11. The
    # path is only used to look for a `checksums.tsv` beside this file (there is none).
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "domain": tfds.features.ClassLabel(names=corpus_sources.DOMAINS),
                    "doc_id": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is on this machine already
        docs = corpus_sources.collect_documents(self.builder_config.max_bytes_per_domain)
        by_split = splits.split_documents(docs)
        self.info.metadata["stats"] = {
            name: corpus_stats(split_docs) for name, split_docs in by_split.items()
        }
        return {name: self._generate_examples(split_docs) for name, split_docs in by_split.items()}

    def _generate_examples(self, docs: Sequence[corpus_sources.Document]):
        for doc in docs:
            yield doc.doc_id, {"text": doc.text, "domain": doc.domain, "doc_id": doc.doc_id}


def corpus_stats(docs: Sequence[corpus_sources.Document]) -> dict:
    """{"documents": n, "bytes": b, "domains": {domain: {"documents", "bytes"}}}."""
    domains = {name: {"documents": 0, "bytes": 0} for name in corpus_sources.DOMAINS}
    for doc in docs:
        domains[doc.domain]["documents"] += 1
        domains[doc.domain]["bytes"] += len(doc.text.encode("utf-8"))
    return {
        "documents": sum(d["documents"] for d in domains.values()),
        "bytes": sum(d["bytes"] for d in domains.values()),
        "domains": domains,
    }


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


def _make_builder(data_dir: str, max_bytes_per_domain: int) -> MoejaxCorpus:
    with _quiet():  # constructing a custom config logs a warning we expect
        return MoejaxCorpus(
            data_dir=data_dir,
            config=corpus_config(max_bytes_per_domain),
            file_format="array_record",
        )


def prepared_dir(data_dir: str, max_bytes_per_domain: int) -> str:
    """Where the corpus of this size lives under `data_dir` (tfds's layout)."""
    return os.path.join(
        data_dir, MoejaxCorpus.name, _config_name(max_bytes_per_domain), str(MoejaxCorpus.VERSION)
    )


def _reuse(data_dir: str, max_bytes_per_domain: int) -> MoejaxCorpus | None:
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
) -> MoejaxCorpus:
    """Builds the corpus once under `data_dir` and returns a builder ready for reading.

    Idempotent: a prepared corpus is reused. Safe to call from several processes at once:
    the first builds under a file lock while the others wait, then all read the same files
    (tfds also writes into a temporary directory and renames it into place, so a crash
    never leaves a half-written corpus behind). Prints one line either way.
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else config_lib.default_data_dir()
    name = _config_name(max_bytes_per_domain)
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
