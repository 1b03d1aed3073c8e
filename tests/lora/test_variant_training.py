"""Every LoRA variant trains through `moejax.train` from `configs/lora.py:<variant>`: two
steps with finite losses, the adapters' routing metrics and losses in the step metrics.
FlyLoRA's frozen A comes out of training bit-identical while B and the balancing bias move
(read back from the run's checkpoint)."""

import jax
import numpy as np
import pytest
from testing_utils import load_config_module

from moejax.config.validation import validate
from moejax.lora.variants import VARIANTS
from moejax.sharding.mesh import make_mesh
from moejax.train.adapter_checkpoint import adapter_part, load_adapted
from moejax.train.checkpoint import Checkpointer
from moejax.train.experiment import build_experiment
from moejax.train.loop import train

SHRINK = {  # the tiny test model (tests/testing_utils.py), one layer, two adapted projections
    # Unrolled layers and one adapted projection compile faster (the numerics of every
    # projection are tested in test_variants.py).
    "model": dict(
        d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=1, scan_layers=False
    ),
    "train": dict(
        steps=2,
        warmup_steps=1,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
        async_checkpoint=False,
        peak_tflops=1.0,
    ),
    "lora": dict(targets="mlp.*"),
}


def variant_config(name: str, data_dir: str, **lora):
    c = load_config_module("lora").get_config(name)
    for section, values in SHRINK.items():
        c[section].update(values)
    c.lora.update(lora)
    c.data.update(data_dir=data_dir, seq_len=32, global_batch_size=4, max_bytes_per_domain=200_000)
    return c


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_two_steps(name, tiny_corpus_dir, tmp_path):
    config = variant_config(name, tiny_corpus_dir)
    metrics = train(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["train/loss"]) and metrics["train/nonfinite_total"] == 0
    if VARIANTS[name]["method"] in ("moe", "mixlora"):  # routing losses/metrics reach the step
        assert metrics["train/lora/experts_per_token"] > 0
        assert any(k.startswith("train/aux/lora_") for k in metrics) == bool(
            VARIANTS[name].get("balance_coef") or VARIANTS[name].get("cv_coef")
        )
    if name == "flylora":
        check_flylora_a_stayed_frozen(config, tmp_path / "run")


def check_flylora_a_stayed_frozen(config, workdir):
    """A (lora_frozen) bit-identical to its initialisation; B and the bias moved."""
    s = validate(config)
    exp = build_experiment(s, make_mesh(s.mesh))
    init = exp.init_fn(jax.random.PRNGKey(s.train.seed))
    # Adapter runs checkpoint the adapters (and the non-trainable collections), not the base.
    target = exp.abstract_state.replace(params=adapter_part(exp.abstract_state.params))
    state, _, _ = Checkpointer(str(workdir)).restore(2, target=target)
    a0, a1 = init.collections["lora_frozen"], state.collections["lora_frozen"]
    jax.tree.map(np.testing.assert_array_equal, a1, a0)
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state.collections["lora_bias"]))
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0] if p[-1].key == "b"]
    assert b and all(np.any(np.asarray(x) != 0) for x in b)
    # The finished run loads for inference with its frozen A and bias (load_adapted).
    _, variables = load_adapted(str(workdir))
    for name in ("lora_frozen", "lora_bias"):
        jax.tree.map(np.testing.assert_array_equal, variables[name], state.collections[name])
