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

Decoding-time routing, every method changing the routers only through the `router_delta`
collection (`moejax.moe.router_delta`; `routing.py` builds and fills its trees):
`scmoe.py` (Shi et al., 2024: a strong and a weak pass, logits contrasted), `rewire.py`
(rewiring experts on the fly: a routing-logit delta updated on the generated text every few
tokens) and `c3po.py` (Li et al., 2025: the delta of the critical layers optimised on the
nearest reference examples). Variables holding a `router_delta` tree decode with it here.
"""

from __future__ import annotations

import functools
from typing import Callable

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


def decode_loop(
    decoder: Transformer,
    passes: list[dict],
    prompt_BxP: jax.Array,
    rng: jax.Array,
    eos_id: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    combine: Callable[[list[jax.Array]], jax.Array] | None = None,
) -> jax.Array:
    """The decoding loop (call it inside `jit`): each of `passes` (variables; SCMoE runs two)
    keeps its own key/value cache, and `combine` turns their last-position logits `[B, V]`
    into the logits sampled from (default: the first pass's). Returns `[B, P + n]`."""
    combine = combine or (lambda logits: logits[0])

    def step(variables, cache, tokens_BxL, start):
        b, length = tokens_BxL.shape
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))
        (logits, _), state = decoder.apply(
            {**variables, "cache": cache}, tokens_BxL, positions_BxL=positions, mutable=["cache"]
        )
        return logits[:, -1], state["cache"]

    def steps(caches, tokens_BxL, start):
        out = [step(v, c, tokens_BxL, start) for v, c in zip(passes, caches)]
        return combine([o[0] for o in out]), [o[1] for o in out]

    b, p = prompt_BxP.shape
    caches = [init_cache(decoder, v, b, p + max_new_tokens) for v in passes]
    logits, caches = steps(caches, prompt_BxP, 0)
    rng, key = jax.random.split(rng)
    token = sample_logits(logits, key, temperature, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_id

    def body(i, carry):
        caches, token, out, done, rng = carry
        logits, caches = steps(caches, token[:, None], p + i - 1)
        rng, key = jax.random.split(rng)
        nxt = sample_logits(logits, key, temperature, top_p)
        nxt = jnp.where(done, eos_id, nxt)
        return caches, nxt, out.at[:, i].set(nxt), done | (nxt == eos_id), rng

    carry = jax.lax.fori_loop(1, max_new_tokens, body, (caches, token, out, done, rng))
    return jnp.concatenate([prompt_BxP, carry[2]], axis=1)


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
    return decode_loop(
        decoder, [variables], prompt_BxP, rng, eos_id, max_new_tokens, temperature, top_p
    )


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, rng) -> None:
    """ValueError naming the bad decoding argument and its fix."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1].")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(...).")


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
    check_sampling(max_new_tokens, temperature, top_p, rng)
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
