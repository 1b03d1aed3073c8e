"""Plain LoRA on the model's projections: zero-initialised adapters reproduce the base model
exactly, and a random adapter equals the base projection with the merged weight
W + s * A B (float64 NumPy), for attention (q/k/v/o) and the SwiGLU MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.lora.targets import is_adapter_path
from moejax.lora.weights import lora_scale
from moejax.models.attention import Attention
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.mlp import DenseMLP
from moejax.nn.trees import split_tree

MODEL = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, moe_every=2
)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=16, n_shared=1, dispatcher="ragged")
TOKENS = jnp.arange(24).reshape(2, 12) % 64


def _randomise_b(params, seed=1):
    """Adapters with non-zero B (a trained adapter), base untouched."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [
        jax.random.normal(k, x.shape, x.dtype) * 0.1
        if is_adapter_path(p) and p[-1].key == "b"
        else x
        for k, (p, x) in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize(
    "targets", ["attn.wq,attn.wv", pytest.param("attn.*,mlp.*,shared.*", marks=pytest.mark.slow)]
)
def test_zero_initialised_adapters_give_the_base_logits_exactly(targets):
    lora = LoRAConfig(method="lora", targets=targets, rank=4)
    variables = nn.unbox(
        Transformer(MODEL, MOE, adapters=adapters_for(lora)).init(jax.random.PRNGKey(0), TOKENS)
    )
    adapters, base = split_tree(variables["params"], is_adapter_path)
    assert adapters, "no adapter was created"
    want, _ = Transformer(MODEL, MOE).apply({"params": base}, TOKENS)
    got, _ = Transformer(MODEL, MOE, adapters=adapters_for(lora)).apply(variables, TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _merged(w, ab, scale):
    """W + s * A B with W reshaped to [d_in, d_out] and back, float64."""
    a, b = (np.asarray(t, np.float64)[0] for t in (ab["a"], ab["b"]))
    w64 = np.asarray(w, np.float64)  # wq [d, H, D], wo [H, D, d], MLP [d_in, d_out]: the
    return w64 + scale * (a @ b).reshape(w64.shape)  # flattened (d_in, d_out) layout


@pytest.mark.parametrize("rslora", [False, True])
def test_random_adapter_equals_the_merged_projection(rslora):
    jax.config.update("jax_enable_x64", True)
    try:
        lora = LoRAConfig(method="lora", targets="attn.*,mlp.*", rank=3, alpha=6.0, rslora=rslora)
        scale = lora_scale(lora)
        assert scale == (6.0 / np.sqrt(3) if rslora else 2.0)
        m = ModelConfig(**{**MODEL.__dict__, "dtype": "float64", "param_dtype": "float64"})
        x = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 32), jnp.float64)
        seg = jnp.ones((2, 12), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
        cases = [
            (Attention(m, adapters=adapters_for(lora), name="attn"), (x, seg, pos)),
            (
                DenseMLP(
                    48,
                    dtype="float64",
                    param_dtype="float64",
                    adapters=adapters_for(lora),
                    name="mlp",
                ),
                (x,),
            ),
        ]
        for module, args in cases:  # jitted: eagerly, each op would compile alone
            init = jax.jit(module.init)(jax.random.PRNGKey(3), *args)
            params = _randomise_b(nn.unbox(init)["params"])
            adapters, base = split_tree(params, is_adapter_path)
            merged = {name: _merged(w, adapters[f"lora_{name}"], scale) for name, w in base.items()}
            plain = jax.jit(module.clone(adapters=None).apply)
            want = plain({"params": merged}, *args)
            got = jax.jit(module.apply)({"params": params}, *args)
            assert not np.allclose(got, plain({"params": base}, *args))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)
