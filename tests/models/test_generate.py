"""Decoding with the key/value cache (moejax.generate) against the full forward pass.

HF token-for-token parity is in tests/hf; these run without torch.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.generate import generate, init_cache, sample_logits
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig

BASE = ModelConfig(
    vocab_size=40,
    d_model=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    d_ff=48,
    first_k_dense=1,
    init_std=0.3,
)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=16, n_shared=1, d_shared=8, shared_gate=True)
MODELS = {
    "gqa_bias": dataclasses.replace(BASE, attention_bias=True),
    "mla": dataclasses.replace(
        BASE,
        attention="mla",
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=6,
    ),
}


@functools.cache  # one model (and one compile of its init) per name for the whole module
def _model(name):
    model = Transformer(MODELS[name], MOE)
    prompt = np.random.default_rng(0).integers(0, 40, (2, 4))
    # Jitted: an eager init dispatches (and compiles) each of its ~700 ops one by one.
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.asarray(prompt))
    return model, nn.unbox(variables), prompt


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "mla" else n for n in sorted(MODELS)]
)
def test_cached_decoding_equals_full_forward(name):
    model, variables, prompt = _model(name)
    tokens = np.asarray(generate(model, variables, prompt, 6))
    assert tokens.shape == (2, 10)
    np.testing.assert_array_equal(tokens[:, :4], prompt)
    full = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens))[0])
    # Greedy: each generated token is the argmax of the full forward at the previous position.
    np.testing.assert_array_equal(tokens[:, 4:], full[:, 3:-1].argmax(-1))
    # And the cached logits themselves equal the full forward, chunk by chunk.
    decoder = model.clone(decode=True)
    cache = init_cache(model, variables, 2, 10)
    pos = jnp.arange(10)[None].repeat(2, 0)
    step = jax.jit(functools.partial(decoder.apply, mutable=["cache"]))
    (first, _), state = step({**variables, "cache": cache}, tokens[:, :7], positions_BxL=pos[:, :7])
    (rest, _), _ = step(
        {**variables, "cache": state["cache"]}, tokens[:, 7:], positions_BxL=pos[:, 7:]
    )
    np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=2e-5)


def test_mla_cache_holds_the_compressed_latent():
    model, variables, _ = _model("mla")
    cache = init_cache(model, variables, 2, 10)
    attn = cache["moe_layers"]["attn"]
    m = MODELS["mla"]
    assert set(attn) == {"latent", "k_rope", "index"}
    assert attn["latent"].shape == (2, 2, 10, m.kv_lora_rank)  # [layers, B, S, r_kv]
    assert attn["k_rope"].shape == (2, 2, 10, m.qk_rope_head_dim)


def test_sampling_top_p_and_temperature():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.PRNGKey(0)
    draws = np.asarray(sample_logits(logits, keys, 1.0, 0.7))
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is the first two tokens
    np.testing.assert_allclose(np.mean(draws == 0), 0.5 / 0.8, atol=0.03)
    draws = np.asarray(sample_logits(logits, keys, 1.0, 1.0))
    np.testing.assert_allclose(
        np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03
    )
    np.testing.assert_array_equal(sample_logits(logits[:2], keys, 0.0, 1.0), [0, 0])
    model, variables, prompt = _model("gqa_bias")
    a = generate(model, variables, prompt, 5, temperature=0.8, top_p=0.9, rng=jax.random.PRNGKey(3))
    b = generate(model, variables, prompt, 5, temperature=0.8, top_p=0.9, rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, variables, prompt, 5, temperature=0.8)
