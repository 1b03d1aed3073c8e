"""Selection rules: router logits `[T, E]` -> which experts each token takes, and their weights.

A router = a scorer (linear map, RMoE's GRU, ...) + one of these rules, named by
`config.moe.selection`, so every scorer composes with every rule. Each rule returns the
router's record itself, `Routing(expert_ids[T, k], combine_weights[T, k], aux_losses,
metrics)` (`moejax.moe.routing`, state None: the router sets its own) with a static k; a
slot with weight 0 is unused (padding tokens, and the slots top-p leaves empty), and the
dispatchers skip it. `finish_routing` builds that record (losses and metrics) from a rule's
chosen ids and weights, for the rules here and LoRA's DynMoLE rule.

- `softmax_topk`: GShard (Lepikhin et al., 2020), Switch (Fedus et al., 2021), Mixtral (Jiang
  et al., 2024). p = softmax(logits); the k largest p_i; with `renormalize` divided by their
  sum (Mixtral), otherwise the raw probabilities (GShard, DeepSeekMoE); then multiplied by
  `routed_scaling_factor`. With `n_group` > 1 it is DeepSeek-V2's `group_limited_greedy`
  (Liu et al., 2024, arXiv 2405.04434, section 2.1.2 device-limited routing; transformers'
  DeepseekV2TopkRouter): the experts form groups of E / n_group, a group scores the largest
  p in it, and only the `topk_group` best groups' experts stay selectable (the others' p
  become 0 or -inf, `group_mask`); the weights are the p of the chosen experts.
- `top_p`: dynamic routing, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
  (Huang et al., 2024, eq. 3-4; reference code ZhenweiAn/Dynamic_MoE). Each token takes the
  fewest experts, in decreasing probability, whose probabilities sum to at least `top_p`;
  at most `top_k` of them (a static bound; `top_k = num_experts` for none). Weights are the
  router probabilities, not renormalised. The paper's dynamic loss is the router entropy
  (`entropy_coef`, beta = 1e-4) next to the balance loss (alpha = 1e-2). The static number
  of slots is `routing_slots(cfg) = min(top_k, ceil(top_p * E))`: the m largest of E
  probabilities sum to at least m / E, so no token ever needs more than ceil(p E) experts,
  and every slot past that would be dispatched, permuted and combined as dead weight.
- `sigmoid_bias`: DeepSeek-V3 (Liu et al., 2024, arXiv 2412.19437, eq. 12-16 and the
  node-limited routing of section 2.1.2), as transformers' DeepseekV3TopkRouter:
  s = sigmoid(logits); the choice scores c = s + b add the per-expert bias b[E] (the
  `router_bias` collection, see `selection_bias`); with `n_group` > 1 the experts form
  groups of E / n_group, each group scores the sum of its two largest c, and only the
  experts of the `topk_group` best groups stay selectable (the others' c become 0 or -inf,
  `group_mask`); ids = top-k(c); the weights are s at those ids, so the bias never changes
  a weight; with `renormalize` (norm_topk_prob) divided by (their sum + 1e-20); then
  multiplied by `routed_scaling_factor`. The losses and statistics see the normalised
  affinities s' = s / sum_j s_j (eq. 19) as the router's probabilities.

Every rule is `rule(logits[T, E], mask[T] | None, cfg, bias=None, seq_len=None,
ranks=None)`; `bias` is the per-expert bias of the rules in `BIASED_RULES` (None
elsewhere), `seq_len` the length of the sequences the T tokens form (None = one sequence),
used by the sequence-wise loss. `ranks` `[E]` is the rank mask of an apply-time router delta
(`moejax.moe.router_delta`; None: none): `restrict_choice` forbids the experts of logit
-inf and those at the ranks it excludes, and `allowed_weights` gives a slot that holds a
forbidden expert weight 0, before any renormalisation.

Aux losses (each omitted when its coefficient is 0), all over real tokens only: Switch
balance = DeepSeekMoE's expert-level loss (`balance_coef`, counting only used slots),
DeepSeekMoE's device-level loss (`device_balance_coef`), DeepSeek-V3's sequence-wise loss
(`seq_balance_coef`), ST-MoE z-loss (`z_loss_coef`) and router entropy (`entropy_coef`);
see `moejax.moe.losses`.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.losses import (
    balance_statistics,
    device_balance_loss,
    router_entropy,
    router_z_loss,
    routing_metrics,
    sequence_balance_loss,
    token_entropy,
)
from moejax.moe.one_hot import take_experts
from moejax.moe.routing import Routing
from moejax.nn.collections import BALANCE_LOAD, ROUTER_BIAS, sow_value


def top_p_mask(sorted_probs: jax.Array, p: float) -> jax.Array:
    """Which of the probabilities (sorted in decreasing order on the last axis) form the
    shortest prefix whose sum reaches `p`: slot j is kept iff the slots before it sum to < p.

    The first slot is always kept (for p > 0); p = 1 keeps every slot (up to float error in
    the running sum, which can only keep one more slot of tiny probability).
    """
    # Exclusive running sum with `before[0]` exactly 0, so crafted dyadic probabilities
    # compare exactly.
    before = jnp.concatenate(
        [jnp.zeros_like(sorted_probs[..., :1]), jnp.cumsum(sorted_probs[..., :-1], axis=-1)],
        axis=-1,
    )
    return before < p


def restrict_choice(choice: jax.Array, logits: jax.Array, ranks: jax.Array | None) -> jax.Array:
    """A rule's choice scores `[T, E]` with the forbidden experts at -inf: those whose logit
    is -inf, then those whose rank (0-based, by decreasing choice, ties to the lower id as in
    `lax.top_k`) has `ranks[rank] <= 0`. Unchanged for `ranks` None (no router delta)."""
    if ranks is None:
        return choice
    choice = jnp.where(jnp.isneginf(logits), -jnp.inf, choice)
    order = jnp.argsort(-choice, axis=-1, stable=True)
    rank_of = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(jnp.take(ranks, rank_of) > 0, choice, -jnp.inf)


def allowed_weights(
    weights: jax.Array, choice: jax.Array, ids: jax.Array, ranks: jax.Array | None
) -> jax.Array:
    """`weights[T, k]` with 0 at the slots whose expert `restrict_choice` forbade (the rule
    had to fill k slots from fewer allowed experts)."""
    if ranks is None:
        return weights
    allowed = take_experts(jnp.isfinite(choice).astype(jnp.float32), ids) > 0
    return jnp.where(allowed, weights, jnp.zeros((), weights.dtype))


def finish_routing(
    cfg: MoEConfig,
    logits: jax.Array,
    probs: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    mask: jax.Array | None,
    seq_len: int | None,
) -> Routing:
    """The `Routing` (state None) of a selection rule's choice: `ids[T, k]` taken with
    `weights[T, k]` (0 = slot unused) out of `probs[T, E]`, the router's probabilities from
    `logits[T, E]`. Padding tokens (`mask` 0) get zero weight; the aux losses named by the
    nonzero coefficients of `cfg` (module docstring) and the routing metrics are computed
    over the real tokens, `seq_len` as in the rules."""
    if mask is not None:  # padding tokens get zero weight: they take no capacity or compute
        weights = weights * mask[:, None].astype(weights.dtype)
    f, p = balance_statistics(probs, ids, mask, weights)  # shared by the balance losses
    balance = probs.shape[-1] * jnp.sum(f * p)
    z = router_z_loss(logits, mask)
    entropy = router_entropy(probs, mask)
    terms = (
        ("balance", cfg.balance_coef, lambda: balance),
        (
            "device_balance",
            cfg.device_balance_coef,
            lambda: device_balance_loss(f, p, cfg.balance_devices),
        ),
        (
            "seq_balance",
            cfg.seq_balance_coef,
            lambda: sequence_balance_loss(probs, ids, seq_len or probs.shape[0], mask, weights),
        ),
        ("z_loss", cfg.z_loss_coef, lambda: z),
        ("entropy", cfg.entropy_coef, lambda: entropy),
    )
    aux = {name: coef * value() for name, coef, value in terms if coef}
    metrics = routing_metrics(probs, ids, weights, mask, load=f, entropy=entropy)
    metrics.update(balance_loss=balance, z_loss=z)
    return Routing(
        expert_ids=ids.astype(jnp.int32),
        combine_weights=weights,
        aux_losses=aux,
        metrics=metrics,
        token_entropy=token_entropy(probs),
    )


def _no_bias(bias, rule: str) -> None:
    if bias is not None:
        raise ValueError(
            f"the {rule} selection rule takes no per-expert bias; only {BIASED_RULES} do."
        )


def softmax_topk(
    logits: jax.Array,
    mask: jax.Array | None,
    cfg: MoEConfig,
    bias=None,
    seq_len: int | None = None,
    ranks: jax.Array | None = None,
) -> Routing:
    _no_bias(bias, "softmax_topk")
    probs = jax.nn.softmax(logits, axis=-1)
    choice = jax.lax.stop_gradient(probs)
    if cfg.n_group > 1:  # DeepSeek-V2's group_limited_greedy: a group scores its best expert
        choice = limit_groups(
            choice, cfg.n_group, cfg.topk_group, GROUP_MASK_FILL[cfg.group_mask], per_group=1
        )
    choice = restrict_choice(choice, logits, ranks)
    ids = jax.lax.top_k(choice, cfg.top_k)[1]
    weights = take_experts(probs, ids)  # top_k's own gradient is a scatter
    weights = allowed_weights(weights, choice, ids, ranks)
    if cfg.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return finish_routing(cfg, logits, probs, ids, weights, mask, seq_len)


def top_p(
    logits: jax.Array,
    mask: jax.Array | None,
    cfg: MoEConfig,
    bias=None,
    seq_len: int | None = None,
    ranks: jax.Array | None = None,
) -> Routing:
    _no_bias(bias, "top_p")
    probs = jax.nn.softmax(logits, axis=-1)
    choice = restrict_choice(jax.lax.stop_gradient(probs), logits, ranks)
    ids = jax.lax.top_k(choice, routing_slots(cfg))[1]  # ties: lower id
    sorted_probs = allowed_weights(take_experts(probs, ids), choice, ids, ranks)
    weights = jnp.where(top_p_mask(sorted_probs, cfg.top_p), sorted_probs, 0.0)
    return finish_routing(cfg, logits, probs, ids, weights, mask, seq_len)


def limit_groups(
    choice: jax.Array, n_group: int, topk_group: int, fill: float, per_group: int = 2
) -> jax.Array:
    """Group-limited routing: `choice[T, E]` with the experts outside each token's
    `topk_group` best groups set to `fill`. A group (E / n_group consecutive experts) scores
    the sum of its `per_group` largest choice values (DeepSeek-V3: 2, or its one value when
    groups have one expert; DeepSeek-V2: 1, its maximum)."""
    t, e = choice.shape
    grouped = choice.reshape(t, n_group, e // n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, min(per_group, e // n_group))[0], axis=-1)
    _, best = jax.lax.top_k(group_scores, topk_group)  # [T, topk_group]
    keep = jnp.any(jax.nn.one_hot(best, n_group, dtype=jnp.bool_), axis=1)  # [T, n_group]
    return jnp.where(keep[:, :, None], grouped, fill).reshape(t, e)


GROUP_MASK_FILL = {"zero": 0.0, "neg_inf": -jnp.inf}


def sigmoid_bias(
    logits: jax.Array,
    mask: jax.Array | None,
    cfg: MoEConfig,
    bias: jax.Array | None = None,
    seq_len: int | None = None,
    ranks: jax.Array | None = None,
) -> Routing:
    """DeepSeek-V3 routing (module docstring); `bias[E]` (None = zeros) steers the choice."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        choice = limit_groups(choice, cfg.n_group, cfg.topk_group, GROUP_MASK_FILL[cfg.group_mask])
    choice = restrict_choice(choice, logits, ranks)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    weights = allowed_weights(take_experts(scores, ids), choice, ids, ranks)
    if cfg.renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    affinities = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return finish_routing(cfg, logits, affinities, ids, weights, mask, seq_len)


def routing_slots(cfg: MoEConfig) -> int:
    """k of the Routing arrays `[T, k]`: `top_k`, or for top-p min(top_k, ceil(top_p * E))
    (see the module docstring)."""
    if cfg.selection == "top_p":
        return max(1, min(cfg.top_k, math.ceil(cfg.top_p * cfg.num_experts - 1e-9)))
    return cfg.top_k


def selection_bias(
    module: nn.Module,
    cfg: MoEConfig,
    collection: str = ROUTER_BIAS,
    expert_axis: str = "expert",
) -> jax.Array | None:
    """The per-expert bias `[E]` (float32, zeros at init) of a router whose rule takes one:
    the variable "bias" of the non-trainable `router_bias` collection, in `module`'s scope
    (the router), so the Transformer's layer scan stacks it like the parameters. None for the
    other rules. Training moves it by the sign rule of `moejax.train.state_rules` (never by
    gradients). LoRA expert routers keep theirs in their own `collection` (`lora_bias`)."""
    if cfg.selection not in BIASED_RULES:
        return None
    init = nn.with_logical_partitioning(jnp.zeros, (expert_axis,))
    return module.variable(collection, "bias", init, (cfg.num_experts,), jnp.float32).value


Rule = Callable[..., Routing]
SELECTIONS: dict[str, Rule] = {
    "softmax_topk": softmax_topk,
    "top_p": top_p,
    "sigmoid_bias": sigmoid_bias,
}
BIASED_RULES = ("sigmoid_bias",)


def report_bias_load(module: nn.Module, bias: jax.Array | None, load: jax.Array) -> None:
    """Sows the step's `load[E]` beside a router's sign-rule bias (`balance_load`, same scope
    and name as the bias, so the load tree mirrors the bias tree); nothing without a bias."""
    if bias is not None:
        sow_value(module, BALANCE_LOAD, "bias", load)
