"""Shared test fixtures: CPU only, a tiny offline corpus, and tiny experiment configs."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN, load_config_module  # noqa: E402


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
        c = load_config_module(name).get_config()
        c.model.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=2)
        if c.model.moe_every:
            c.moe.update(num_experts=4, top_k=2, d_expert=16, gmm_tile=16)
        c.data.update(data_dir=tiny_corpus_dir, max_bytes_per_domain=TEST_CORPUS_BYTES_PER_DOMAIN,
                      seq_len=32, global_batch_size=4)
        c.train.update(steps=10, warmup_steps=2, log_every=1, eval_every=0, eval_batches=2,
                       checkpoint_every=5, async_checkpoint=False, peak_tflops=1.0)
        for key, value in overrides.items():
            section, field = key.split(".", 1)
            c[section][field] = value
        return c
    return make
