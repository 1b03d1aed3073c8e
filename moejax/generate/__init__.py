"""Autoregressive decoding with a key/value cache: greedy, or temperature and nucleus (top-p,
Holtzman et al., 2020) sampling, the whole loop one jit-compiled function.

    tokens = moejax.generate.generate(model, variables, prompt_BxP, max_new_tokens=20)
    tokens = generate(model, variables, prompt, 50, temperature=0.8, top_p=0.95,
                      rng=jax.random.PRNGKey(0))

The prompt is prefilled in one call of the model in decode mode (`Transformer(decode=True)`,
whose attention layers append to a `cache` collection: keys and values for GQA, the
compressed latent and rotary key for MLA), then one token per step in a `lax.fori_loop`.
Every row of the prompt has the same length P (no padding); the cache holds
P + max_new_tokens positions. A model with adapters
(`Transformer(..., adapters=moejax.lora.hook.adapters_for(cfg))`) decodes with them.
Returns int32 `[B, P + max_new_tokens]`; with `eos_id`, a row that produced it keeps
emitting `eos_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.adapter_hook import AdapterHook


def init_cache(model: Transformer, variables: dict, batch: int, max_len: int) -> dict:
    """A zero cache for `batch` rows of up to `max_len` tokens (shapes only are traced)."""
    decoder = model.clone(decode=True)

    def make(v):
        _, state = decoder.apply(v, jnp.zeros((batch, max_len), jnp.int32), mutable=["cache"])
        return state["cache"]

    shapes = jax.eval_shape(make, _without_cache(variables))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _without_cache(variables: dict) -> dict:
    return {k: v for k, v in variables.items() if k != "cache"}


def sample_logits(
    logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_p: float
) -> jax.Array:
    """Greedy (`temperature == 0`) or a sample from softmax(logits / temperature) restricted
    to the smallest set of tokens whose probability reaches `top_p`."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)  # the least likely kept logit
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("model_cfg", "moe_cfg", "adapters", "max_new_tokens", "temperature", "top_p"),
)
def _generate(
    variables,
    prompt_BxP,
    rng,
    eos_id,
    *,
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    adapters: AdapterHook | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
):
    """The decoding loop, compiled once per model and sampling setting (jit's own cache:
    the configs and the adapter hook are hashable static arguments)."""
    decoder = Transformer(model_cfg, moe_cfg, decode=True, adapters=adapters)

    def step(variables, cache, tokens_BxL, start):
        b, length = tokens_BxL.shape
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))
        (logits, _), state = decoder.apply(
            {**variables, "cache": cache}, tokens_BxL, positions_BxL=positions, mutable=["cache"]
        )
        return logits[:, -1], state["cache"]

    b, p = prompt_BxP.shape
    cache = init_cache(decoder, variables, b, p + max_new_tokens)
    logits, cache = step(variables, cache, prompt_BxP, 0)
    rng, key = jax.random.split(rng)
    token = sample_logits(logits, key, temperature, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_id

    def body(i, carry):
        cache, token, out, done, rng = carry
        logits, cache = step(variables, cache, token[:, None], p + i - 1)
        rng, key = jax.random.split(rng)
        nxt = sample_logits(logits, key, temperature, top_p)
        nxt = jnp.where(done, eos_id, nxt)
        return cache, nxt, out.at[:, i].set(nxt), done | (nxt == eos_id), rng

    carry = jax.lax.fori_loop(1, max_new_tokens, body, (cache, token, out, done, rng))
    return jnp.concatenate([prompt_BxP, carry[2]], axis=1)


def generate(
    model: Transformer,
    variables: dict,
    prompt_BxP,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int = -1,
) -> jax.Array:
    """Prompt `[B, P]` -> `[B, P + max_new_tokens]` tokens (see the module docstring).
    `eos_id = -1`: never stop early."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1].")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(...).")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(
        _without_cache(variables),
        jnp.asarray(prompt_BxP, jnp.int32),
        rng,
        jnp.int32(eos_id),
        model_cfg=model.model,
        moe_cfg=model.moe,
        adapters=model.adapters,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
    )
