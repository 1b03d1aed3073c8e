"""Rewiring experts on the fly: "Rewiring Experts on the Fly: Continuous Rerouting for Better
Online Adaptation in Mixture-of-Expert Models" (Su, Yang, Shen, Yin, Liu, Geiping, 2025,
arXiv 2510.14853).

Generation cycles between two phases. At the prefill, and then every `every` generated
tokens, the routing is optimised by self-supervision on the sequence so far: `steps`
gradient steps (optax `sgd` or `adam`, rate `lr`) on a lightweight additive vector on the
router logits of the selected MoE `layers` (the `logits` of the `router_delta` collection,
`moejax.moe.router_delta`; the other layers keep zero), minimising the mean next-token
negative log-likelihood of the tokens already there (prompt and generated text). Then the
model decodes with the modified routers until the next adaptation; the vector and the
optimizer state carry over from one adaptation to the next.

Correctness first: a changed router changes every earlier position's keys and values, so
each decoding segment rebuilds its key/value cache from the whole sequence under the new
delta (one token at a time in the same compiled loop that then decodes, so one
compilation serves every segment). The sequence lives in a fixed buffer `[B, P + n]`; the
loss reads its first `length` tokens (causal attention and per-token routing: the unused
tail changes no earlier position), so the update also compiles once.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.generate import check_sampling, init_cache, sample_logits
from moejax.generate.routing import layer_mask, with_delta, without_decoding_state, zero_delta
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.adapter_hook import AdapterHook

OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam}


def sequence_nll(
    model: Transformer, variables: dict, delta, tokens_BxS: jax.Array, length: jax.Array
) -> jax.Array:
    """Mean next-token negative log-likelihood of the first `length` tokens of every row,
    the model routing with `delta`."""
    logits, _ = model.apply(with_delta(variables, delta), tokens_BxS)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
    valid = jnp.arange(tokens_BxS.shape[1] - 1) < length - 1
    return jnp.sum(jnp.where(valid, nll, 0.0)) / (nll.shape[0] * jnp.maximum(length - 1, 1))


def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    return OPTIMIZERS[name](lr)


@functools.partial(
    jax.jit, static_argnames=("model_cfg", "moe_cfg", "adapters", "steps", "optimizer", "lr")
)
def update_delta(
    variables,
    delta,
    opt_state,
    mask,
    tokens_BxS,
    length,
    *,
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    adapters: AdapterHook | None,
    steps: int,
    optimizer: str,
    lr: float,
):
    """`steps` optimizer steps on the `mask`ed delta against `sequence_nll`; returns the
    delta, the optimizer state and the loss before the first step."""
    model = Transformer(model_cfg, moe_cfg, adapters=adapters)
    opt = _optimizer(optimizer, lr)
    grad_fn = jax.value_and_grad(lambda d: sequence_nll(model, variables, d, tokens_BxS, length))

    def body(i, carry):
        delta, opt_state, first = carry
        loss, grads = grad_fn(delta)
        grads = jax.tree.map(lambda g, m: g * m, grads, mask)
        updates, opt_state = opt.update(grads, opt_state, delta)
        first = jnp.where(i == 0, loss, first)
        return optax.apply_updates(delta, updates), opt_state, first

    return jax.lax.fori_loop(0, steps, body, (delta, opt_state, jnp.zeros((), jnp.float32)))


@functools.partial(
    jax.jit, static_argnames=("model_cfg", "moe_cfg", "adapters", "temperature", "top_p")
)
def decode_segment(
    variables,
    delta,
    buf_BxS,
    length,
    count,
    prompt_len,
    rng,
    eos_id,
    *,
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    adapters: AdapterHook | None,
    temperature: float,
    top_p: float,
):
    """The buffer with tokens `length .. length + count - 1` decoded, routing with `delta`:
    a fresh cache is filled from the first `length` tokens, one per step, then each step's
    prediction is written after it (a row past `eos_id` keeps emitting it)."""
    decoder = Transformer(model_cfg, moe_cfg, decode=True, adapters=adapters)
    v = with_delta(variables, delta)
    b, s = buf_BxS.shape
    cache = init_cache(decoder, v, b, s)
    pos = jnp.arange(s)
    done = jnp.any((buf_BxS == eos_id) & (pos >= prompt_len) & (pos < length), axis=1)

    def body(i, carry):
        cache, buf, done, rng = carry
        (logits, _), state = decoder.apply(
            {**v, "cache": cache},
            jax.lax.dynamic_slice_in_dim(buf, i, 1, axis=1),
            positions_BxL=jnp.full((b, 1), i, jnp.int32),
            mutable=["cache"],
        )
        rng, key = jax.random.split(rng)
        nxt = sample_logits(logits[:, -1], key, temperature, top_p)
        write = i + 1 >= length
        nxt = jnp.where(done, eos_id, nxt)
        column = jnp.where(write, nxt, buf[:, i + 1])
        buf = jax.lax.dynamic_update_slice_in_dim(buf, column[:, None], i + 1, axis=1)
        return state["cache"], buf, done | (write & (nxt == eos_id)), rng

    carry = jax.lax.fori_loop(0, length + count - 1, body, (cache, buf_BxS, done, rng))
    return carry[1]


def rewire_generate(
    model: Transformer,
    variables: dict,
    prompt_BxP,
    max_new_tokens: int,
    *,
    every: int = 8,
    steps: int = 1,
    lr: float = 0.1,
    optimizer: str = "sgd",
    layers: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int = -1,
) -> tuple[jax.Array, dict, list[float]]:
    """Decoding with rewiring (module docstring): `[B, P]` -> (`[B, P + n]` tokens, the
    final router delta, the loss measured at each adaptation before its first step).
    `layers`: MoE-layer indices whose routers adapt (negative from the end; None: all)."""
    check_sampling(max_new_tokens, temperature, top_p, rng)
    if every < 1 or steps < 0 or optimizer not in OPTIMIZERS:
        raise ValueError(
            f"every={every} must be >= 1, steps={steps} >= 0 and optimizer={optimizer!r} one "
            f"of {sorted(OPTIMIZERS)}."
        )
    base = without_decoding_state(variables)
    delta = zero_delta(model, base)
    mask = layer_mask(delta, layers)
    opt_state = _optimizer(optimizer, lr).init(delta)
    prompt = np.asarray(prompt_BxP, np.int32)
    b, p = prompt.shape
    buf = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)
    statics = dict(model_cfg=model.model, moe_cfg=model.moe, adapters=model.adapters)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    length, losses = p, []
    while length < p + max_new_tokens:
        if steps and length >= 2:
            delta, opt_state, loss = update_delta(
                base, delta, opt_state, mask, buf, jnp.int32(length),
                steps=steps, optimizer=optimizer, lr=float(lr), **statics,
            )  # fmt: skip
            losses.append(float(loss))
        count = min(every, p + max_new_tokens - length)
        rng, key = jax.random.split(rng)
        buf = decode_segment(
            base, delta, buf, jnp.int32(length), jnp.int32(count), jnp.int32(p), key,
            jnp.int32(eos_id), temperature=float(temperature), top_p=float(top_p), **statics,
        )  # fmt: skip
        length += count
    return buf, delta, losses
