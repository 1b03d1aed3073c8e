"""Adapter-only training: the step moves only adapter leaves (base bit-identical) and equals
AdamW on the adapters alone; the optimizer state holds adapters only; merged == adapted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from testing_utils import make_tiny_config

from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.generate import generate
from moejax.lora import trainable
from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.lora.merge import check_mergeable, merge
from moejax.lora.targets import is_adapter_path
from moejax.lora.trainable import is_trainable
from moejax.models.transformer import Transformer
from moejax.nn.trees import join_trees, split_tree
from moejax.sharding.mesh import make_mesh
from moejax.train.experiment import build_experiment
from moejax.train.step import _micro_loss


def _sections(name="dense", **overrides):
    """A tiny config; the corpus is not read (batches are made up here)."""
    config = make_tiny_config(
        "",
        name,
        **{
            "lora.method": "lora",
            "lora.targets": "attn.*,mlp.*,shared.*",
            "lora.rank": 2,
            "train.warmup_steps": 0,
            "train.learning_rate": 1e-2,
            **overrides,
        },
    )
    return validate(config)


def _experiment(name="dense", **overrides):
    s = _sections(name, **overrides)
    return s, build_experiment(s, make_mesh(s.mesh))


@pytest.fixture(scope="module")
def moe_experiment():
    """One DeepSeekMoE layer (attention and shared experts adapted): short to compile."""
    return _experiment(
        "deepseekmoe",
        **{"model.num_layers": 1, "model.first_k_dense": 0, "lora.targets": "attn.wq,shared.*"},
    )


def _batch(s, seed=0):
    rng = np.random.default_rng(seed)
    shape = (s.data.global_batch_size, s.data.seq_len)
    return {
        "inputs": rng.integers(0, 259, shape, dtype=np.int32),
        "targets": rng.integers(0, 259, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        "domains": np.zeros(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }


def test_a_step_moves_only_adapters_and_equals_adamw_on_the_adapters(moe_experiment):
    s, exp = moe_experiment
    state = exp.init_fn(jax.random.PRNGKey(0))
    before = jax.device_get(state.params)
    batch = _batch(s)
    # Reference: gradients of the loss w.r.t. the trainable leaves, AdamW (the same chain)
    # on the trainable partition alone.
    train_p, frozen_p = split_tree(before, is_trainable)

    def loss(tp):
        return _micro_loss(
            join_trees(tp, frozen_p),
            batch,
            exp.model,
            float(batch["loss_mask"].sum()),
            1,
            state.collections,
        )[0]

    grads = jax.jit(jax.grad(loss))(train_p)
    from moejax.train.optimizer import make_optimizer

    tx = make_optimizer(s.train)
    updates, _ = tx.update(grads, tx.init(train_p), train_p)
    want = optax.apply_updates(train_p, updates)

    for _ in range(2):
        state, metrics = exp.step_fn(state, batch)
        if _ == 0:
            first = jax.device_get(state.params)
    flat_before = traverse_util.flatten_dict(before)
    flat_after = traverse_util.flatten_dict(jax.device_get(state.params))
    moved = set()
    for key, old in flat_before.items():
        if trainable.is_trainable(key):
            if not np.array_equal(old, flat_after[key]):
                moved.add(key[-1])
        else:  # the base: bit-identical
            np.testing.assert_array_equal(flat_after[key], old, err_msg="/".join(key))
    assert moved == {"a", "b"}  # b from step 1, a once b is non-zero
    got = split_tree(first, is_trainable)[0]
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7, err_msg=str(path))
    assert float(metrics["grad_norm"]) > 0


def test_optimizer_state_holds_the_adapters_only(moe_experiment):
    s, exp = moe_experiment
    state = exp.init_fn(jax.random.PRNGKey(0))
    adapters, base = split_tree(state.params, is_adapter_path)
    base_shapes = {x.shape for x in jax.tree.leaves(base)}
    adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
    assert not base_shapes & adapter_shapes  # so the check below can tell them apart
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert opt_leaves and all(x.shape in adapter_shapes for x in opt_leaves)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert sum(x.size for x in opt_leaves) == 2 * n_adapter  # Adam's mu and nu
    assert trainable.count(state.params) == n_adapter


def test_frozen_adapter_leaves_are_not_trained(monkeypatch):
    """A variant may freeze a leaf inside its adapter (FlyLoRA's A): one predicate decides."""
    monkeypatch.setattr(trainable, "FROZEN_ADAPTER_LEAVES", {("*", "a")})
    s, exp = _experiment(**{"lora.targets": "attn.wq", "model.num_layers": 1})
    state = exp.init_fn(jax.random.PRNGKey(0))
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    for _ in range(2):
        state, _m = exp.step_fn(state, _batch(s))
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    for key, old in before.items():
        same = np.array_equal(old, after[key])
        assert same == (key[-1] != "b"), key
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * sum(
        v.size for k, v in before.items() if k[-1] == "b"
    )


def _randomise(params, seed=1):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if is_adapter_path(p) else x
        for k, (p, x) in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def test_merged_model_gives_the_adapted_logits():
    name = "dense"
    s = _sections(name, **{"lora.rslora": True, "lora.alpha": 4.0})
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    tokens = jnp.asarray(_batch(s)["inputs"][:2, :12])
    params = _randomise(nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))["params"])
    adapted, _ = jax.jit(model.apply)({"params": params}, tokens)
    _, base = split_tree(params, is_adapter_path)
    plain = Transformer(s.model, s.moe)
    merged = merge(params, s.lora)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    plain_apply = jax.jit(plain.apply)
    got, _ = plain_apply({"params": merged}, tokens)
    assert (
        np.abs(np.asarray(adapted) - np.asarray(plain_apply({"params": base}, tokens)[0])).max()
        > 1e-2
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(adapted), atol=2e-5, rtol=2e-5)
    # Greedy decoding with the adapters (KV cache) equals decoding the merged model.
    np.testing.assert_array_equal(
        np.asarray(generate(model, {"params": params}, tokens[:, :4], 6)),
        np.asarray(generate(plain, {"params": merged}, tokens[:, :4], 6)),
    )


def test_router_variants_do_not_merge():
    with pytest.raises(ConfigError, match=r"lora.num_experts=4\) routes tokens"):
        check_mergeable(LoRAConfig(method="lora", num_experts=4, top_k=2))
    with pytest.raises(ConfigError, match=r"lora.method='mola'"):
        check_mergeable(LoRAConfig(method="mola"))
