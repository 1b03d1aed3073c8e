"""The session's small moejax corpus (built once per xdist worker by tests/conftest.py), and
a small plain tfds text dataset prepared in a test's tmp dir (another tfds dataset by name)."""

import pytest
import tensorflow_datasets as tfds
from etils import epath
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN as SMALL_BYTES_PER_DOMAIN

from moejax.data import DataConfig, build_corpus

PLAIN_TEXTS = [f"document number {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]


class MoejaxTestPlainText(tfds.core.GeneratorBasedBuilder):
    """A text-only dataset (no domain feature), like most tfds text datasets."""

    VERSION = tfds.core.Version("0.1.0")
    code_path = epath.Path(__file__)  # see MoejaxCorpus.code_path

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(PLAIN_TEXTS):
            yield i, {"body": text}


@pytest.fixture(scope="session")
def corpus_dir(tiny_corpus_dir) -> str:
    return tiny_corpus_dir


@pytest.fixture(scope="session")
def corpus(corpus_dir):
    """The prepared builder (a second build_corpus call only reuses the files)."""
    return build_corpus(corpus_dir, max_bytes_per_domain=SMALL_BYTES_PER_DOMAIN)


@pytest.fixture()
def small_cfg(corpus_dir) -> DataConfig:
    return DataConfig(
        data_dir=corpus_dir,
        max_bytes_per_domain=SMALL_BYTES_PER_DOMAIN,
        seq_len=64,
        global_batch_size=4,
        seed=3,
    )


@pytest.fixture()
def plain_texts() -> list[str]:
    """The documents of the plain text dataset, in stored order."""
    return list(PLAIN_TEXTS)


@pytest.fixture()
def plain_text_cfg(tmp_path) -> DataConfig:
    """`data.sources="tfds:moejax_test_plain_text#body"`, prepared (array_record) in a tmp
    data dir; it has no validation split."""
    builder = MoejaxTestPlainText(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    return DataConfig(
        sources="tfds:moejax_test_plain_text",
        data_dir=str(tmp_path),
        text_key="body",
        seq_len=32,
        global_batch_size=2,
        eval_split="train",
    )
