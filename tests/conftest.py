"""Shared test fixtures: CPU only, a tiny offline corpus, and tiny experiment configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN, make_tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> str:
    from moejax.data import build_corpus

    data_dir = str(tmp_path_factory.mktemp("tiny_tfds"))
    build_corpus(data_dir, max_bytes_per_domain=TEST_CORPUS_BYTES_PER_DOMAIN)
    return data_dir


@pytest.fixture()
def tiny_config(tiny_corpus_dir):
    """`tiny_config(name="deepseekmoe", **overrides)`: a config small enough to train in
    seconds; overrides use dotted names, e.g. `**{"train.steps": 5}`."""

    def make(name: str = "deepseekmoe", **overrides):
        return make_tiny_config(tiny_corpus_dir, name, **overrides)

    return make


@pytest.fixture(scope="session")
def gcs():
    """A local GCS (`tests/storage_emulator.py`) with the bucket `test-bucket`; yields the
    environment variables that point clients (this process's and subprocesses') at it."""
    from storage_emulator import storage_emulator

    with storage_emulator() as env:
        yield env


@pytest.fixture(scope="session")
def tiny_moe_run(tiny_corpus_dir, tmp_path_factory) -> str:
    """A finished tiny DeepSeekMoE run (2 MoE layers, 4 steps, checkpoints at steps 2 and 4)
    for the tools that read runs back: load_run, sampling, traces, the notebooks."""
    from moejax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("tiny_moe_run") / "run")
    config = make_tiny_config(
        tiny_corpus_dir,
        "deepseekmoe",
        **{
            "model.first_k_dense": 0,
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "train.keep_checkpoints": 3,
            "train.eval_every": 4,
            "train.eval_batches": 1,
        },
    )
    train(config, workdir)
    return workdir
