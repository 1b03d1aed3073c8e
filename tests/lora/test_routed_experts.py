"""LoRA on the routed experts (`lora.targets="experts.*"`): each expert gets its own A_e, B_e;
the delta runs through the dispatcher's grouped matmul. References: the merged model
(`W_e + s A_e B_e`, `moejax.lora.merge`) without adapters, through every single-device
dispatcher; a training step moves only the expert adapters; mixtures of LoRA experts are
refused on the routed experts, naming the field. (Expert parallelism with expert LoRA:
tests/moe/test_expert_parallel.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from testing_utils import make_tiny_config

from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.lora.hook import adapters_for
from moejax.lora.merge import merge
from moejax.lora.targets import is_adapter_path
from moejax.lora.trainable import is_trainable
from moejax.models.transformer import Transformer
from moejax.nn.trees import split_tree
from moejax.sharding.mesh import make_mesh
from moejax.train.experiment import build_experiment

OVERRIDES = {
    "lora.method": "lora",
    "lora.targets": "experts.*",
    "lora.rank": 2,
    "lora.alpha": 3.0,
    "model.num_layers": 1,
    "model.first_k_dense": 0,
    "train.warmup_steps": 0,
    "train.learning_rate": 1e-2,
}


def _sections(**overrides):
    return validate(make_tiny_config("", "deepseekmoe", **{**OVERRIDES, **overrides}))


@pytest.fixture(scope="module")
def adapted():
    s = _sections()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        treedef,
        [
            x + 0.3 * jax.random.normal(k, x.shape) if is_adapter_path(p) else x
            for k, (p, x) in zip(keys, leaves)
        ],
    )
    return s, tokens, params


def test_expert_adapters_have_one_pair_per_expert(adapted):
    s, _, params = adapted
    flat = traverse_util.flatten_dict(params, sep="/")
    e, d, f, r = s.moe.num_experts, s.model.d_model, s.moe.d_expert, s.lora.rank
    experts = "moe_layers/moe/experts"
    want = {
        f"{experts}/lora_w_gate/a": (1, e, d, r),
        f"{experts}/lora_w_gate/b": (1, e, r, f),
        f"{experts}/lora_w_up/a": (1, e, d, r),
        f"{experts}/lora_w_up/b": (1, e, r, f),
        f"{experts}/lora_w_down/a": (1, e, f, r),
        f"{experts}/lora_w_down/b": (1, e, r, d),
    }
    assert {k: v.shape for k, v in flat.items() if "/lora_" in k} == want


@pytest.mark.parametrize(
    "dispatcher",
    [
        "dense_reference",
        "ragged",
        pytest.param("hybrid", marks=pytest.mark.slow),
        pytest.param("capacity_einsum", marks=pytest.mark.slow),
    ],
)
def test_adapted_experts_equal_the_merged_model(adapted, dispatcher):
    s, tokens, params = adapted
    moe = s.moe.__class__(**{**s.moe.__dict__, "dispatcher": dispatcher, "capacity_factor": 8.0})
    model = Transformer(s.model, moe, adapters=adapters_for(s.lora))
    got = np.asarray(jax.jit(model.apply)({"params": params}, tokens)[0])
    plain = jax.jit(Transformer(s.model, moe).apply)
    merged = np.asarray(plain({"params": merge(params, s.lora)}, tokens)[0])
    base = np.asarray(plain({"params": split_tree(params, is_adapter_path)[1]}, tokens)[0])
    assert np.abs(got - base).max() > 1e-2  # the expert adapters matter
    err = np.abs(got - merged).max()
    print(f"{dispatcher}: max |adapted - merged| = {err:.2e}")
    assert err < 2e-5


def test_a_training_step_moves_only_the_expert_adapters():
    s = _sections()
    exp = build_experiment(s, make_mesh(s.mesh))
    state = exp.init_fn(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    shape = (s.data.global_batch_size, s.data.seq_len)
    batch = {
        "inputs": rng.integers(0, 259, shape, dtype=np.int32),
        "targets": rng.integers(0, 259, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        "domains": np.zeros(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }
    before = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    for _ in range(2):
        state, metrics = exp.step_fn(state, batch)
    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    moved = {k for k, v in before.items() if not np.array_equal(v, after[k])}
    assert moved == {k for k in before if "/experts/lora_w_" in k}  # a and b of all three
    assert all(is_trainable(k.split("/")) for k in moved)
    assert np.isfinite(float(metrics["loss"]))


def test_mixtures_of_lora_experts_are_refused_on_the_routed_experts():
    with pytest.raises(ConfigError, match=r"lora.targets='experts.w_up' adapts the routed"):
        _sections(**{"lora.method": "moe", "lora.num_experts": 2, "lora.targets": "experts.w_up"})
