"""Gates of LoRA experts: which experts (or ranks) a token uses, and with what weight.

Every rule here ends in a `Routing` (moejax.moe.routing) or a dense gate matrix `g[T, E]`;
the selection itself reuses `moejax.moe.selection` (top-k, top-p, DeepSeek-V3's biased
sigmoid, the balance/z losses and routing metrics), so there is one routing implementation:

- `router_config`: the `MoEConfig` an adapter's `LinearRouter` and the dispatchers see,
  built from the `lora` fields.
- `dynmole`: DynMoLE (Li et al., 2025, "DynMoLE: Boosting Mixture of LoRA Experts
  Fine-Tuning with a Hybrid Routing Mechanism", reference code mikecovlee/DynMoLE
  `moe_peft/adapters/dynmole/model.py`): softmax probabilities; in decreasing order, the
  experts whose running sum (inclusive) stays <= `top_p` (0.75), and at least `min_experts`
  (2); every expert when the token's normalised Tsallis entropy S_q / S_q,max (q =
  `tsallis_q`, 1.1) exceeds `entropy_threshold` (0.9); weights are the probabilities, not
  renormalised. Loss: `entropy_coef` (0.01) x mean normalised Tsallis entropy +
  `balance_coef` (0.001) x Switch balance. Differences from the reference: its entropy
  adds eps = 1e-5 to p, and its balance loss uses the mean routing weight per expert where
  moejax's Switch loss counts the assignments.
- `flylora`: FlyLoRA (Zou et al., 2025, NeurIPS, reference code gfyddha/FlyLoRA
  `flylora.py`): the frozen projection y = A x is its own router; a token activates the
  k ranks with the largest |y + d| (d: the per-rank balancing bias), with gate 1.
- `cv_squared_loss`: LoRAMoE's balance (Dou et al., 2024, "LoRAMoE: Alleviating World
  Knowledge Forgetting in Large Language Models via MoE-Style Plugin"): the squared
  coefficient of variation of the experts' importance (summed gate weights over tokens).
- `dense_gates`: Routing -> g[T, E] (zeros for the experts a token does not use).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig
from moejax.moe.config import MoEConfig
from moejax.moe.losses import coefficient_of_variation, expert_load, routing_metrics
from moejax.moe.routing import Routing
from moejax.moe.selection import finish_routing


def router_config(lo: LoRAConfig, num_experts: int) -> MoEConfig:
    """The MoE section an adapter's router and dispatcher run with."""
    dynmole_rule = lo.router == "dynmole"
    return MoEConfig(
        num_experts=num_experts,
        top_k=num_experts if dynmole_rule else lo.top_k,
        d_expert=lo.rank,
        selection="top_p" if dynmole_rule else lo.router,
        renormalize=lo.renormalize,
        balance_coef=lo.balance_coef,
        z_loss_coef=lo.z_loss_coef,
        entropy_coef=0.0 if dynmole_rule else lo.entropy_coef,
        top_p=lo.top_p,
        routed_scaling_factor=lo.routed_scale,
        bias_update_rate=lo.bias_update_rate,
        dispatcher="dense_reference" if lo.dispatcher == "none" else lo.dispatcher,
    )


def tsallis_entropy(probs: jax.Array, q: float) -> jax.Array:
    """S_q(p) = (1 - sum_i p_i^q) / (q - 1) per token, and its maximum over E experts,
    (1 - E^(1-q)) / (q - 1), reached by the uniform distribution."""
    p = probs.astype(jnp.float32)
    e = p.shape[-1]
    s = (1.0 - jnp.sum(p**q, axis=-1)) / (q - 1.0)
    return s, (1.0 - e ** (1.0 - q)) / (q - 1.0)


def dynmole(
    logits: jax.Array,
    mask: jax.Array | None,
    cfg: MoEConfig,
    bias=None,
    seq_len: int | None = None,
    *,
    lo: LoRAConfig,
) -> Routing:
    """DynMoLE's hybrid rule (module docstring); a `LinearRouter` rule, E static slots."""
    del bias
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    sorted_p, ids = jax.lax.top_k(probs, probs.shape[-1])
    keep = (jnp.cumsum(sorted_p, axis=-1) <= lo.top_p) | (
        jnp.arange(probs.shape[-1]) < lo.min_experts
    )
    entropy, max_entropy = tsallis_entropy(probs, lo.tsallis_q)
    entropy = entropy / max_entropy
    keep = keep | (entropy > lo.entropy_threshold)[:, None]
    routing = finish_routing(cfg, logits, probs, ids, jnp.where(keep, sorted_p, 0.0), mask, seq_len)
    m = jnp.ones_like(entropy) if mask is None else mask.astype(jnp.float32)
    mean_entropy = jnp.sum(entropy * m) / jnp.maximum(jnp.sum(m), 1.0)
    aux = dict(routing.aux_losses)
    if lo.entropy_coef:
        aux["entropy"] = lo.entropy_coef * mean_entropy
    return routing.replace(
        aux_losses=aux, metrics={**routing.metrics, "tsallis_entropy": mean_entropy}
    )


def flylora(y: jax.Array, bias: jax.Array, top_k: int, mask: jax.Array | None = None) -> Routing:
    """FlyLoRA's implicit routing of `y = A x` [T, R] (module docstring): binary gates;
    padding tokens (`mask` 0) still get their ranks but are not counted in the load."""
    choice = jnp.abs(y.astype(jnp.float32) + bias.astype(jnp.float32))
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.ones(ids.shape, jnp.float32)
    scores = jax.nn.softmax(choice, axis=-1)  # only for the logged statistics
    load = expert_load(ids, y.shape[-1], mask)
    metrics = routing_metrics(scores, ids, weights, mask, load=load)
    return Routing(
        expert_ids=ids.astype(jnp.int32), combine_weights=weights, aux_losses={}, metrics=metrics
    )


def dense_gates(routing: Routing, num_experts: int) -> jax.Array:
    """g[T, E]: each token's combine weight per expert (0 where unused)."""
    t = routing.expert_ids.shape[0]
    g = jnp.zeros((t, num_experts), jnp.float32)
    return g.at[jnp.arange(t)[:, None], routing.expert_ids].add(
        routing.combine_weights.astype(jnp.float32)
    )


def cv_squared_loss(gates: jax.Array) -> jax.Array:
    """LoRAMoE's balance: cv(importance)^2, importance_e = sum_t g[t, e]."""
    return coefficient_of_variation(jnp.sum(gates.astype(jnp.float32), axis=0)) ** 2
