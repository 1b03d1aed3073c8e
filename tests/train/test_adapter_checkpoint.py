"""Adapter runs through moejax.train: the checkpoint holds adapters only with a reference to
the base, resume is exact, and a changed, missing or mis-shaped base is refused."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from testing_utils import make_tiny_config

from moejax.config.validation import validate
from moejax.lora.hook import adapters_for
from moejax.lora.targets import is_adapter_path
from moejax.models.transformer import Transformer, scanned_abstract, unscan_params
from moejax.nn.trees import split_tree
from moejax.train.adapter_checkpoint import BaseModelError, load_adapted, load_base
from moejax.train.checkpoint import Checkpointer
from moejax.train.loop import train
from moejax.train.writers import read_jsonl


def _losses(workdir):
    return {
        r["step"]: r["train/loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    }


def _adapter_config(data_dir, base_dir, **overrides):
    return make_tiny_config(
        data_dir,
        "dense",
        **{
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "train.learning_rate": 1e-2,
            "lora.method": "lora",
            "lora.targets": "attn.*,mlp.*",
            "lora.rank": 2,
            "lora.base_checkpoint": base_dir,
            **overrides,
        },
    )


def _write_base(config, run_dir, step):
    """A base run's checkpoint (its params at `step`), as moejax.train leaves it."""
    s = validate(config)
    params = nn.unbox(
        jax.jit(Transformer(s.model, s.moe).init)(
            jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
        )
    )["params"]
    params = jax.tree.map(lambda x: x + 0.01, params)  # not the adapter run's own init
    with Checkpointer(run_dir, async_save=False, save_every=1) as ckpt:
        ckpt.save(step, {"step": jnp.asarray(step), "params": params}, force=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)


@pytest.fixture(scope="module")
def runs(tiny_corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_runs")
    base, adapted = str(root / "base"), str(root / "adapted")
    _write_base(make_tiny_config(tiny_corpus_dir, "dense"), base, step=2)
    train(_adapter_config(tiny_corpus_dir, base), adapted)
    return tiny_corpus_dir, root, base, adapted


def test_checkpoint_holds_adapters_and_a_base_reference(runs):
    _, _, base, adapted = runs
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(adapted, "checkpoints", "4", "state"))
    params = traverse_util.flatten_dict(dict(meta.item_metadata["params"]))
    assert params and all(is_adapter_path(k) for k in params)
    with Checkpointer(adapted) as ckpt:
        ref = ckpt.read_extra(4)["base"]
    assert ref["kind"] == "moejax" and ref["path"] == base and ref["step"] == 2
    # The adapted model: the base run's params, bit for bit, plus the adapters.
    model, variables = load_adapted(adapted)
    with Checkpointer(base) as ckpt:
        want = traverse_util.flatten_dict(
            jax.device_get(
                ckpt.restore_subtrees(
                    {
                        "params": jax.tree.map(
                            np.asarray,
                            traverse_util.unflatten_dict(
                                {
                                    k: v
                                    for k, v in traverse_util.flatten_dict(
                                        variables["params"]
                                    ).items()
                                    if not is_adapter_path(k)
                                }
                            ),
                        )
                    }
                )["params"]
            )
        )
    got = traverse_util.flatten_dict(jax.device_get(variables["params"]))
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
    assert any(np.abs(v).max() > 0 for k, v in got.items() if k[-1] == "b")


def test_resume_is_exact(runs):
    data_dir, root, base, adapted = runs
    resumed = str(root / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(
        os.path.join(adapted, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2")
    )
    shutil.copy(os.path.join(adapted, "config.json"), resumed)
    train(_adapter_config(data_dir, base), resumed)
    a, b = _losses(adapted), _losses(resumed)
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in (3, 4)), (a, b)


def test_a_changed_or_missing_base_is_refused(runs):
    data_dir, root, base, adapted = runs
    changed = str(root / "changed_base")
    shutil.copytree(base, changed)
    with Checkpointer(changed, async_save=False, save_every=1) as ckpt:
        target = jax.tree.map(np.asarray, load_adapted(adapted)[1]["params"])
        base_params = traverse_util.unflatten_dict(
            {k: v for k, v in traverse_util.flatten_dict(target).items() if not is_adapter_path(k)}
        )
        params = ckpt.restore_subtrees({"params": base_params})["params"]
        params["final_norm"]["scale"] = params["final_norm"]["scale"] + 0.01
        ckpt.save(3, {"params": params}, force=True)
    config = _adapter_config(data_dir, changed, **{"train.steps": 6})
    with pytest.raises(
        BaseModelError,
        match=r"not the one this adapter run was trained on.*"
        r"final_norm/scale",
    ):
        train(config, adapted)
    missing = _adapter_config(data_dir, str(root / "nowhere"), **{"train.steps": 6})
    with pytest.raises(BaseModelError, match=r"lora.base_checkpoint=.*nowhere.* does not exist"):
        train(missing, adapted)
    assert sorted(os.listdir(os.path.join(adapted, "checkpoints"))) == ["2", "4"]


def test_a_base_of_another_shape_is_named(runs, tmp_path):
    data_dir, _, base, _ = runs
    config = _adapter_config(data_dir, base, **{"model.d_ff": 96})
    with pytest.raises(
        BaseModelError,
        match=r"does not match the model config.*w_down' the "
        r"checkpoint has shape \(2, 64, 32\) but the "
        r"target has shape \(2, 96, 32\)",
    ):
        train(config, str(tmp_path / "run"))


def test_a_base_trained_with_another_rope_theta_is_named(runs, tmp_path):
    data_dir, _, base, _ = runs
    config = _adapter_config(data_dir, base, **{"model.rope_theta": 500.0})
    with pytest.raises(
        BaseModelError,
        match=r"was trained with model.rope_theta=10000.0 but "
        r"this config has model.rope_theta=500.0",
    ):
        train(config, str(tmp_path / "run"))


def test_a_scanned_base_loads_into_unrolled_layers(runs):
    """MoLA unrolls the layers (different expert counts per layer): the base, trained with
    scanned layers, is restored in that layout and unscanned, leaf for leaf."""
    data_dir, _, base, _ = runs
    config = _adapter_config(data_dir, base, **{"model.scan_layers": False})
    s = validate(config)
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    abstract = nn.unbox(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    )["params"]
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ),
        abstract,
    )
    loaded, _ = load_base(s.lora, str(base), abstract, None, s.model)
    with Checkpointer(base, async_save=False) as ckpt:
        saved = ckpt.restore_subtrees(
            {"params": scanned_abstract(split_tree(abstract, is_adapter_path)[1])}, 2
        )
    assert "dense_layers_0" in loaded["params"] and "dense_layers" not in loaded["params"]
    want = traverse_util.flatten_dict(unscan_params(jax.device_get(saved["params"])))
    got = traverse_util.flatten_dict(jax.device_get(loaded["params"]))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
