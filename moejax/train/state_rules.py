"""Post-update rules of the non-trainable collections: the sign rule of auxiliary-loss-free
load balancing, one implementation for DeepSeek-V3's router bias and the LoRA experts' biases.

DeepSeek-V3 (Liu et al., 2024, arXiv 2412.19437, section 2.1.2) moves each MoE router's
per-expert selection bias after every optimizer step,

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)

so an overloaded expert loses gamma and an underloaded one gains it; SMoRA (Zhao et al.,
2025, StyxXuan/smora) and FlyLoRA (Zou et al., 2025, gfyddha/FlyLoRA) balance their LoRA
experts the same way. Every router with such a bias sows its step's `load[E]` into
`balance_load` at the bias's own scope and name (`moejax.nn.collections`), so the load tree
mirrors the bias tree (stacked over scanned layers exactly as the bias is), and
`sign_rule_update` pairs them leaf by leaf. `RULES` maps each collection to the rule that
moves it, `rule(tree, side_outputs, model) -> tree` (the model's side outputs of the step,
`moejax.models.side_outputs`, and the model, which knows its rates), and `rule.report(tree)`
the metrics logged for it (DeepSeek-V3's bias per MoE layer); collections without a
rule, such as `lora_frozen`, never change. The `expert_layout` collection's rule is not a
sign rule: it sums each step's sown loads into the window its re-layout reads. The train
step runs the rules over `TrainState.collections` with no knowledge of which collection is
which.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from moejax.nn.collections import ADAPTER_BIAS, BALANCE_LOAD, EXPERT_LAYOUT, ROUTER_BIAS
from moejax.train.expert_relayout import WindowRule
from moejax.train.router_bias import router_bias_metrics


def sign_rule(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """One update of `bias[..., E]` from `load[..., E]` (module docstring)."""
    load = jax.lax.stop_gradient(load.astype(jnp.float32))
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def sign_rule_update(biases: Any, loads: Any, rate: float, collection: str) -> Any:
    """`biases` (a collection tree) after one step; `loads` is the sown `balance_load` tree,
    which holds a load of the same shape at the path of every bias."""
    flat_loads = traverse_util.flatten_dict(loads or {})
    out = {}
    for key, bias in traverse_util.flatten_dict(biases).items():
        load = flat_loads.get(key)
        if load is None or load.shape != bias.shape:
            raise ValueError(
                f"{collection} {'/'.join(key)} of shape {bias.shape} has no load of that shape "
                f"among the routers' reports {sorted('/'.join(k) for k in flat_loads)}."
            )
        out[key] = sign_rule(bias, load, rate).astype(bias.dtype) if rate else bias
    return traverse_util.unflatten_dict(out)


@dataclasses.dataclass(frozen=True)
class SignRule:
    """The sign rule of one collection, at the rate `rate_of(model)`; `report(tree)` gives
    the metrics logged for the collection after the step ({} by default)."""

    collection: str
    rate_of: Callable[[Any], float]
    report: Callable[[Any], dict[str, Any]] = lambda tree: {}

    def __call__(self, biases: Any, side_outputs: dict[str, Any], model: Any) -> Any:
        loads = side_outputs[BALANCE_LOAD]
        return sign_rule_update(biases, loads, self.rate_of(model), self.collection)


# Collection -> the post-update rule that moves it: the sign rules, and the expert layout's
# load window (`moejax.train.expert_relayout`).
RULES: dict[str, Callable[[Any, dict[str, Any], Any], Any]] = {
    ROUTER_BIAS: SignRule(
        ROUTER_BIAS, lambda model: model.moe.bias_update_rate, report=router_bias_metrics
    ),
    ADAPTER_BIAS: SignRule(ADAPTER_BIAS, lambda model: model.adapters.bias_update_rate),
    EXPERT_LAYOUT: WindowRule(),
}
