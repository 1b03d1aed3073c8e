"""Router auxiliary losses and routing statistics.

All functions take router probabilities `probs[T, E]` or logits, the selected
`expert_ids[T, k]`, and an optional `mask[T]` (1 for real tokens, 0 for padding) so padded
positions of packed batches do not count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _mask(t: int, mask: jax.Array | None) -> jax.Array:
    return jnp.ones((t,), jnp.float32) if mask is None else mask.astype(jnp.float32)


def expert_load(expert_ids: jax.Array, num_experts: int, mask: jax.Array | None = None,
                weights: jax.Array | None = None) -> jax.Array:
    """Fraction of the (token, choice) assignments that go to each expert: [E], sums to 1.

    `weights[T, k]` (optional) excludes slots with zero combine weight (top-p padding).
    """
    t, k = expert_ids.shape
    m = _mask(t, mask)[:, None] * jnp.ones((1, k), jnp.float32)
    if weights is not None:
        m = m * (weights > 0)
    counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids].add(m)
    return counts / jnp.maximum(jnp.sum(m), 1.0)


def switch_balance_loss(probs: jax.Array, expert_ids: jax.Array,
                        mask: jax.Array | None = None,
                        weights: jax.Array | None = None) -> jax.Array:
    """Switch Transformer load-balance loss (Fedus et al., 2021, eq. 4), top-k form.

    L = E * sum_i f_i * P_i, where f_i is the fraction of the T*k assignments sent to expert
    i and P_i the mean router probability of expert i. Equals 1 under perfect balance; this
    is DeepSeekMoE's expert-level balance loss with f_i' = E f_i. With `weights`, slots of
    zero weight (top-p padding) are not assignments.
    """
    t, e = probs.shape
    m = _mask(t, mask)
    f = expert_load(expert_ids, e, mask, weights)
    p = jnp.sum(probs.astype(jnp.float32) * m[:, None], axis=0) / jnp.maximum(jnp.sum(m), 1.0)
    return e * jnp.sum(f * p)


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al., 2022, eq. 5): mean_t logsumexp(logits_t)^2."""
    m = _mask(logits.shape[0], mask)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(z * z * m) / jnp.maximum(jnp.sum(m), 1.0)


def router_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean per-token entropy (nats) of the router distribution."""
    m = _mask(probs.shape[0], mask)
    p = probs.astype(jnp.float32)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.sum(h * m) / jnp.maximum(jnp.sum(m), 1.0)


def coefficient_of_variation(load: jax.Array) -> jax.Array:
    """std / mean of the per-expert load (0 = perfectly balanced)."""
    return jnp.std(load) / jnp.maximum(jnp.mean(load), 1e-9)


def routing_metrics(probs: jax.Array, expert_ids: jax.Array, weights: jax.Array,
                    mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-layer statistics every router reports: load [E], load CV, entropy, experts/token
    (mean, and `experts_per_token_hist[j]`: the fraction of tokens that use j experts,
    j = 0..k)."""
    e, k = probs.shape[-1], expert_ids.shape[-1]
    load = expert_load(expert_ids, e, mask, weights)
    m = _mask(probs.shape[0], mask)
    per_token = jnp.sum((weights > 0).astype(jnp.float32), axis=-1)
    hist = jnp.zeros((k + 1,), jnp.float32).at[per_token.astype(jnp.int32)].add(m)
    return {
        "experts_per_token_hist": hist / jnp.maximum(jnp.sum(m), 1.0),
        "load": load,
        "load_cv": coefficient_of_variation(load),
        "max_load": jnp.max(load) * e,  # 1 = balanced, E = everything on one expert
        "router_entropy": router_entropy(probs, mask),
        "experts_per_token": jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0),
    }
