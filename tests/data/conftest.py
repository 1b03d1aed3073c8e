"""The session's small moejax corpus (built once per xdist worker by tests/conftest.py)."""

import pytest
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN as SMALL_BYTES_PER_DOMAIN

from moejax.data import DataConfig, build_corpus


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
