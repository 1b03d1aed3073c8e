"""A small moejax corpus built once per test session (per xdist worker), in a tmp dir."""

import pytest

from moejax.data import DataConfig, build_corpus

SMALL_BYTES_PER_DOMAIN = 200_000


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  build_corpus(data_dir, max_bytes_per_domain=SMALL_BYTES_PER_DOMAIN)
  return data_dir


@pytest.fixture(scope="session")
def corpus(corpus_dir):
  """The prepared builder (a second build_corpus call only reuses the files)."""
  return build_corpus(corpus_dir, max_bytes_per_domain=SMALL_BYTES_PER_DOMAIN)


@pytest.fixture()
def small_cfg(corpus_dir) -> DataConfig:
  return DataConfig(
      data_dir=corpus_dir, max_bytes_per_domain=SMALL_BYTES_PER_DOMAIN, seq_len=64,
      global_batch_size=4, seed=3,
  )
