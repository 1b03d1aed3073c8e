"""SCMoE: self-contrast decoding of an MoE model, "Unchosen Experts Can Contribute Too:
Unleashing MoE Models' Power by Self-Contrast" (Shi et al., NeurIPS 2024, arXiv 2405.14507).

Every step runs the model twice on the same tokens, each pass with its own key/value cache:
the strong activation (the model's own top-k routing) and the weak one (rank-k routing:
each MoE layer uses only the expert its router ranks k-th, through the `router_delta` rank
mask of `moejax.generate.routing.rank_delta`). The next token is chosen from

    s(x) = (1 + beta) log p_strong(x) - beta log p_weak(x)   for x in V_head,
    s(x) = -inf                                             elsewhere,
    V_head = {x : p_strong(x) >= alpha max_w p_strong(w)}   (the adaptive plausibility constraint)

Checked against the authors' code (github.com/DavidFanzz/SCMoE, `decodingmethod/moe_utils.py`
and the Mixtral / DeepSeekMoE gates): it contrasts the raw logits, `(1 + beta) z_s - beta z_w`,
masked where `z_s < log(alpha) + max z_s`; the log-probabilities differ from the logits by
one constant per row, so the mask, the argmax and the softmax are the same (defaults there:
alpha = 0.1, beta = 0.5, temperatures 1). Its rank-k routing sorts the router's softmax,
keeps the chosen slot and renormalises it when the model renormalises top-k weights
(Mixtral: weight 1; DeepSeekMoE keeps the probability), which is what the rank mask does.
Its `--student_routed_tok r` is the 0-based slot, rank r + 1 here. Greedy by default; with
`temperature > 0` the contrast is sampled like plain logits (`moejax.generate.sample_logits`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moejax.generate import check_sampling, decode_loop
from moejax.generate.routing import rank_delta, with_delta, without_decoding_state, zero_delta
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.adapter_hook import AdapterHook


def contrast_logits(
    strong_BxV: jax.Array, weak_BxV: jax.Array, alpha: float, beta: float
) -> jax.Array:
    """SCMoE's next-token scores from the two passes' logits (module docstring)."""
    strong = jax.nn.log_softmax(strong_BxV.astype(jnp.float32), axis=-1)
    weak = jax.nn.log_softmax(weak_BxV.astype(jnp.float32), axis=-1)
    plausible = strong >= math.log(alpha) + jnp.max(strong, axis=-1, keepdims=True)
    return jnp.where(plausible, (1.0 + beta) * strong - beta * weak, -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_cfg",
        "moe_cfg",
        "adapters",
        "max_new_tokens",
        "temperature",
        "top_p",
        "alpha",
        "beta",
    ),
)
def _scmoe(
    variables,
    weak_delta,
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
    alpha: float,
    beta: float,
):
    decoder = Transformer(model_cfg, moe_cfg, decode=True, adapters=adapters)
    passes = [variables, with_delta(variables, weak_delta)]
    return decode_loop(
        decoder,
        passes,
        prompt_BxP,
        rng,
        eos_id,
        max_new_tokens,
        temperature,
        top_p,
        combine=lambda logits: contrast_logits(logits[0], logits[1], alpha, beta),
    )


def scmoe_generate(
    model: Transformer,
    variables: dict,
    prompt_BxP,
    max_new_tokens: int,
    *,
    rank: int = 2,
    alpha: float = 0.1,
    beta: float = 0.5,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int = -1,
) -> jax.Array:
    """`moejax.generate.generate` with SCMoE's contrast of the strong (top-k) pass and the
    weak rank-`rank` pass, both with a key/value cache. `[B, P]` -> `[B, P + n]`."""
    check_sampling(max_new_tokens, temperature, top_p, rng)
    if not 0 < alpha <= 1 or beta < 0:
        raise ValueError(f"alpha={alpha} must be in (0, 1] and beta={beta} >= 0.")
    base = without_decoding_state(variables)
    weak = rank_delta(zero_delta(model, base), (rank,))
    return _scmoe(
        base,
        weak,
        jnp.asarray(prompt_BxP, jnp.int32),
        jax.random.PRNGKey(0) if rng is None else rng,
        jnp.int32(eos_id),
        model_cfg=model.model,
        moe_cfg=model.moe,
        adapters=model.adapters,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        alpha=float(alpha),
        beta=float(beta),
    )
