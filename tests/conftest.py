"""Shared test fixtures: CPU only, a tiny offline corpus, and tiny experiment configs."""

import functools
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test-time compile speed (inherited by the subprocesses the tests start): the tiny models
# here are compile-bound, and XLA:CPU's LLVM optimisation passes took a quarter of the suite's
# time. Results stay within every test's tolerance; bit-exact checks compare one program
# with itself. MOEJAX_TEST_XLA_OPT=1 keeps XLA's defaults.
if os.environ.get("MOEJAX_TEST_XLA_OPT") != "1":
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
        ]
    ).strip()

import pytest  # noqa: E402
from slow_tests import SLOW  # noqa: E402
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN, make_tiny_config  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    """Marks the cases of `tests/slow_tests.py` slow."""
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)


# Session fixtures too costly to build once per xdist worker: the test modules that use one
# run on the same worker.
SHARED_FIXTURES = ("tiny_moe_run",)


@functools.cache
def xdist_group_of(module: str) -> str:
    """A test module's work unit under `--dist loadgroup`: the costly session fixture of
    SHARED_FIXTURES it uses, or else the module itself (so a module-scoped fixture, e.g. an
    8-device subprocess, runs once)."""
    try:
        text = (pathlib.Path(__file__).parent.parent / module).read_text()
    except OSError:
        return module
    return next((name for name in SHARED_FIXTURES if name in text), module)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups of `xdist_group_of`. (pytest-xdist's own loadgroup
    tags node ids through `Item._nodeid`, which pytest 9.2 no longer reads, so its
    `xdist_group` marks are ignored there.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid.split("::")[0])

    return ModuleOrFixtureScheduling(config, log)


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
