"""The offline corpus as a tensorflow-datasets builder: `MoejaxCorpus` (registered in tfds
as `moejax_corpus`) and its configs, one per size cap (`domain_bytes_<cap>`).

Kept apart from `corpus_builder` (which builds, locks and reuses the prepared corpus) because
it imports tensorflow-datasets: `corpus_builder` loads it on first use, so the rest of moejax
imports without tfds. The module docstring of `corpus_builder` describes the records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow_datasets as tfds
from etils import epath

from moejax.data import corpus_sources, splits

DEFAULT_MAX_BYTES_PER_DOMAIN = corpus_sources.DEFAULT_MAX_BYTES_PER_DOMAIN


@dataclasses.dataclass(eq=False)
class MoejaxCorpusConfig(tfds.core.BuilderConfig):
    """A corpus variant: how many bytes each domain holds."""

    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN


_DEFAULT_CONFIG = MoejaxCorpusConfig(
    name=corpus_sources.config_name(DEFAULT_MAX_BYTES_PER_DOMAIN),
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
        name=corpus_sources.config_name(max_bytes_per_domain),
        description=f"{max_bytes_per_domain} bytes of text per domain.",
        max_bytes_per_domain=max_bytes_per_domain,
    )


class MoejaxCorpus(tfds.core.GeneratorBasedBuilder):
    """Offline code / prose / arithmetic corpus; registered in tfds as `moejax_corpus`."""

    VERSION = tfds.core.Version(corpus_sources.CORPUS_VERSION)
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
            name: corpus_sources.corpus_stats(split_docs) for name, split_docs in by_split.items()
        }
        return {name: self._generate_examples(split_docs) for name, split_docs in by_split.items()}

    def _generate_examples(self, docs: Sequence[corpus_sources.Document]):
        for doc in docs:
            yield doc.doc_id, {"text": doc.text, "domain": doc.domain, "doc_id": doc.doc_id}
