"""Every layer layout the HF converter produces trains (`moejax.hf.architectures.fit_layout`:
`first_k_dense` dense layers, then periods of `moe_every - 1` dense blocks and one MoE
block). The dense blocks inside a period carry two stacked axes, `layers` and
`period_layers`: with one name for both, the sharding rules refused every `moe_every >= 2`
run ("Dimensions ('layers',) occur more than once"). A per-layer layout (`model.layer_kinds`:
runs of identical layers, MoE layers with their own expert counts) trains the same way."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from moejax.config.validation import validate
from moejax.models.transformer import Transformer
from moejax.train.loop import train
from moejax.train.writers import read_jsonl

# (model.first_k_dense, model.moe_every, model.num_layers): a Qwen2-MoE with
# decoder_sparse_step=2, a 2-layer DeepSeek-V3 with first_k_dense_replace=1 (MoE at layer 1,
# a period of 2), a dense prefix before periods, and a longer period. moe_every=1 and
# all-dense layouts train in tests/train/test_trainer.py.
LAYOUTS = [(0, 2, 2), (1, 2, 3), (0, 3, 3)]


@pytest.mark.parametrize("first_k_dense, moe_every, num_layers", LAYOUTS)
def test_layout_trains(tiny_config, tmp_path, first_k_dense, moe_every, num_layers):
    config = tiny_config(
        "deepseekmoe",
        **{
            "model.first_k_dense": first_k_dense,
            "model.moe_every": moe_every,
            "model.num_layers": num_layers,
            "train.steps": 2,
            "train.checkpoint_every": 2,
        },
    )
    metrics = train(config, str(tmp_path))
    assert metrics["step"] == 2 and np.isfinite(metrics["train/loss"])
    losses = [
        r["train/loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in r
    ]
    assert len(losses) == 2
    # The period's dense blocks: [periods, moe_every - 1, ...] under two axis names.
    s = validate(config, num_devices=1, num_processes=1)
    model = Transformer(s.model, s.moe)
    tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    names = {
        "/".join(path): leaf.names
        for path, leaf in traverse_util.flatten_dict(
            boxed, is_leaf=lambda _, x: hasattr(x, "names")
        ).items()
        if hasattr(leaf, "names")
    }
    dense_in_period = [n for p, n in names.items() if p.startswith("moe_periods/dense/")]
    assert dense_in_period and all(n[:2] == ("layers", "period_layers") for n in dense_in_period)


@pytest.mark.slow  # ~60 s; tests/models/test_layer_layouts.py checks every run's gradients
def test_per_layer_layout_trains(tiny_config, tmp_path):
    """MoE (16 experts, top-4) / dense / MoE with 8 experts, top-2: three scanned runs."""
    config = tiny_config(
        "deepseekmoe",
        **{
            "model.first_k_dense": 0,
            "model.num_layers": 3,
            "model.layer_kinds": "moe,dense,moe:e=8:k=2",
            "train.steps": 2,
            "train.checkpoint_every": 2,
        },
    )
    metrics = train(config, str(tmp_path))
    assert metrics["step"] == 2 and np.isfinite(metrics["train/loss"])
    rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in r]
    assert len(rows) == 2 and rows[0]["train/loss"] != rows[1]["train/loss"]
    s = validate(config, num_devices=1, num_processes=1)
    model = Transformer(s.model, s.moe)
    tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: hasattr(x, "names"))
    assert {path[0] for path in flat if path[0].startswith("runs_")} == {
        "runs_0",
        "runs_1",
        "runs_2",
    }
    for path, leaf in flat.items():
        if path[0].startswith("runs_"):
            assert leaf.names[0] == "layers" and leaf.names.count("layers") == 1, path
    assert flat[("runs_2", "moe", "router", "kernel")].value.shape[-1] == 8
