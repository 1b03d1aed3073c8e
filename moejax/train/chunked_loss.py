"""Token cross-entropy, whole or over chunks of tokens so that the `[tokens, vocab]` float32
logits never exist at once (`train.loss_chunk`).

    ce[t] = logsumexp(h[t] @ W) - (h[t] @ W)[target[t]]

`token_cross_entropy(logits, targets)` is the plain form, from the model's logits.
`chunked_token_cross_entropy(hidden, head, targets, chunk)` computes the same values from
the final normed hidden states `h` [..., d] and the output projection `W` [d, V]
(`Transformer(..., return_hidden=True)`), `chunk` tokens at a time: a `jax.lax.scan` over
the chunks whose body is a `jax.checkpoint`, so the forward pass holds one chunk's logits
[chunk, V] and the backward pass recomputes each chunk's logits from its hidden states
instead of storing them (the chunked / fused linear cross-entropy of Liger Kernel, Hsu et
al. 2024, written with XLA ops). A chunk's logits are the same 2-D `project` in the compute
dtype, cast to float32, as the model's.

Layout: the tokens, flattened row-major to [T], go to chunk `t % n` (n chunks), so every
chunk takes its share of every row. The batch axis, which is split over the data-parallel
devices in contiguous blocks of rows, stays split along the chunk's token axis and the scan
runs over an unsplit axis: each device projects its own tokens. When `chunk` does not
divide T the tokens are padded to `n * ceil(T / n)` (target 0) and the padding's values are
dropped; on a mesh the padded rows then move between devices (collective-permutes), which a
chunk that divides the micro-batch's tokens avoids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.nn.projection import project


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _chunk_cross_entropy(head: jax.Array, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """One chunk: hidden [c, d], targets [c] -> float32 [c]."""
    return token_cross_entropy(project(hidden, head).astype(jnp.float32), targets)


def chunked_token_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int
) -> jax.Array:
    """`token_cross_entropy(project(hidden, head), targets)` (float32, `targets`' shape)
    computed `chunk` tokens at a time (module docstring). `hidden` [..., d] has `targets`'
    shape plus the model axis; `head` is [d, V]."""
    if chunk <= 0:
        raise ValueError(f"chunked_token_cross_entropy: chunk={chunk} must be positive")
    if hidden.shape[:-1] != targets.shape or head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"chunked_token_cross_entropy: hidden {hidden.shape} must be targets' shape "
            f"{targets.shape} plus the model axis, and head {head.shape} [d, vocab]"
        )
    d = hidden.shape[-1]
    tokens = math.prod(targets.shape)
    n = -(-tokens // chunk)  # chunks
    per = -(-tokens // n)  # tokens per chunk (<= chunk; balanced when chunk does not divide)
    pad = n * per - tokens
    h, y = hidden.reshape(tokens, d), targets.reshape(tokens)
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
    # token j * n + i -> chunk i, row j; the scan runs over the leading (chunk) axis.
    h = h.reshape(per, n, d).swapaxes(0, 1)
    y = y.reshape(per, n).swapaxes(0, 1)
    chunk_ce = jax.checkpoint(_chunk_cross_entropy, prevent_cse=False)

    def body(carry, xs):
        return carry, chunk_ce(head, *xs)

    _, ce = jax.lax.scan(body, None, (h, y))
    return ce.swapaxes(0, 1).reshape(n * per)[:tokens].reshape(targets.shape)
