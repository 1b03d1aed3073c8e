"""Selection rules: router logits `[T, E]` -> which experts each token takes, and their weights.

A router = a scorer (linear map, RMoE's GRU, ...) + one of these rules, so every scorer
composes with every rule. Each rule returns `Selection(expert_ids[T, k], weights[T, k],
aux_losses, metrics)` with a static k; a slot with weight 0 is unused (padding tokens, and
the slots top-p leaves empty), and the dispatchers skip it.

- `softmax_topk`: GShard (Lepikhin et al., 2020), Switch (Fedus et al., 2021), Mixtral (Jiang
  et al., 2024). p = softmax(logits); the k largest p_i; with `renormalize` divided by their
  sum (Mixtral), otherwise the raw probabilities (GShard, DeepSeekMoE).
- `top_p`: dynamic routing, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
  (Huang et al., 2024, eq. 3-4; reference code ZhenweiAn/Dynamic_MoE). Each token takes the
  fewest experts, in decreasing probability, whose probabilities sum to at least `top_p`;
  at most `top_k` of them (a static bound; `top_k = num_experts` for none). Weights are the
  router probabilities, not renormalised. The paper's dynamic loss is the router entropy
  (`entropy_coef`, beta = 1e-4) next to the balance loss (alpha = 1e-2). The static number
  of slots is `routing_slots(cfg) = min(top_k, ceil(top_p * E))`: the m largest of E
  probabilities sum to at least m / E, so no token ever needs more than ceil(p E) experts,
  and every slot past that would be dispatched, permuted and combined as dead weight.

Aux losses (each omitted when its coefficient is 0), all over real tokens only: Switch
balance (`balance_coef`, counting only used slots), ST-MoE z-loss (`z_loss_coef`) and router
entropy (`entropy_coef`).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.losses import router_entropy, router_z_loss, routing_metrics, switch_balance_loss


class Selection(NamedTuple):
    expert_ids: jax.Array  # int32[T, k]
    weights: jax.Array  # float32[T, k]; 0 = slot unused
    aux_losses: dict[str, jax.Array]  # already multiplied by their coefficients
    metrics: dict[str, jax.Array]


def top_p_mask(sorted_probs: jax.Array, p: float) -> jax.Array:
    """Which of the probabilities (sorted in decreasing order on the last axis) form the
    shortest prefix whose sum reaches `p`: slot j is kept iff the slots before it sum to < p.

    The first slot is always kept (for p > 0); p = 1 keeps every slot (up to float error in
    the running sum, which can only keep one more slot of tiny probability).
    """
    # Exclusive running sum with `before[0]` exactly 0, so crafted dyadic probabilities
    # compare exactly.
    before = jnp.concatenate([jnp.zeros_like(sorted_probs[..., :1]),
                              jnp.cumsum(sorted_probs[..., :-1], axis=-1)], axis=-1)
    return before < p


def _finish(cfg: MoEConfig, logits, probs, ids, weights, mask) -> Selection:
    if mask is not None:  # padding tokens get zero weight: they take no capacity or compute
        weights = weights * mask[:, None].astype(weights.dtype)
    balance = switch_balance_loss(probs, ids, mask, weights)
    z = router_z_loss(logits, mask)
    entropy = router_entropy(probs, mask)
    aux = {}
    for name, coef, value in (("balance", cfg.balance_coef, balance),
                              ("z_loss", cfg.z_loss_coef, z),
                              ("entropy", cfg.entropy_coef, entropy)):
        if coef:
            aux[name] = coef * value
    metrics = routing_metrics(probs, ids, weights, mask)
    metrics.update(balance_loss=balance, z_loss=z)
    return Selection(ids.astype(jnp.int32), weights, aux, metrics)


def softmax_topk(logits: jax.Array, mask: jax.Array | None, cfg: MoEConfig) -> Selection:
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, cfg.top_k)
    if cfg.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return _finish(cfg, logits, probs, ids, weights, mask)


def top_p(logits: jax.Array, mask: jax.Array | None, cfg: MoEConfig) -> Selection:
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs, ids = jax.lax.top_k(probs, routing_slots(cfg))  # ties: lower id first
    weights = jnp.where(top_p_mask(sorted_probs, cfg.top_p), sorted_probs, 0.0)
    return _finish(cfg, logits, probs, ids, weights, mask)


def selection_rule(cfg: MoEConfig) -> str:
    """The rule a config selects with: the router's own name, or `selection` for `gru`."""
    if cfg.router == "gru":
        return cfg.selection or "softmax_topk"
    return cfg.router


def routing_slots(cfg: MoEConfig) -> int:
    """k of the Routing arrays `[T, k]`: `top_k`, or for top-p min(top_k, ceil(top_p * E))
    (see the module docstring)."""
    if selection_rule(cfg) == "top_p":
        return max(1, min(cfg.top_k, math.ceil(cfg.top_p * cfg.num_experts - 1e-9)))
    return cfg.top_k


SELECTIONS: dict[str, Callable[[jax.Array, jax.Array | None, MoEConfig], Selection]] = {
    "softmax_topk": softmax_topk,
    "top_p": top_p,
}
