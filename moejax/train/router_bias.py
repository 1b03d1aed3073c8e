"""DeepSeek-V3's router bias in the train step: the logged metrics.

Liu et al., 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), section 2.1.2: the
`sigmoid_bias` rule selects experts by s_{i,t} + b_i (eq. 16) and, at the end of each
training step, every MoE layer moves its bias towards balance,

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)

so an overloaded expert (load above the mean) loses gamma and an underloaded one gains it.
`load[E]` is the step's fraction of (real token, slot) assignments per expert (the `load`
routing metric, `moejax.moe.losses.expert_load`); gamma is `moe.bias_update_rate`. The bias
is the non-trainable `router_bias` collection, carried in `TrainState.collections`:
the update runs outside the gradient, after the optimizer step, by the sign rule shared with
the LoRA experts' biases (`moejax.train.state_rules`).

The collection holds one leaf per MoE-layer stack: `[num_moe_layers, E]` with scanned layers,
or one `[E]` per layer (`<stack>_<i>`) with `model.scan_layers=False`; the `moe/*` metrics
have a leading MoE-layer axis in the same layer order.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

LOG_FULL_BIAS_MAX_EXPERTS = 16  # log the bias vector itself up to this many experts


def _natural_key(path) -> list:
    """Sort key for leaf paths that orders `moe_layers_10` after `moe_layers_9`."""
    text = jax.tree_util.keystr(path)
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _layers_of(router_bias: Any) -> tuple[jax.Array, Any]:
    """The biases as `[num_moe_layers, E]` in layer order, and how to put such an array back
    into the collection's tree."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(router_bias)
    order = sorted(range(len(with_path)), key=lambda i: _natural_key(with_path[i][0]))
    leaves = [with_path[i][1] for i in order]
    rows = [leaf.reshape(-1, leaf.shape[-1]) for leaf in leaves]
    stacked = jnp.concatenate(rows, axis=0)

    def unstack(array: jax.Array) -> Any:
        out = [None] * len(leaves)
        start = 0
        for i, leaf, r in zip(order, leaves, rows):
            out[i] = array[start : start + r.shape[0]].reshape(leaf.shape).astype(leaf.dtype)
            start += r.shape[0]
        return jax.tree_util.tree_unflatten(treedef, out)

    return stacked, unstack


def router_bias_metrics(router_bias: Any) -> dict[str, jax.Array]:
    """`moe/router_bias_abs_mean` (per MoE layer, in layer order) and, for at most
    `LOG_FULL_BIAS_MAX_EXPERTS` experts, `moe/router_bias` itself; {} without a bias."""
    if router_bias is None:
        return {}
    bias, _ = _layers_of(router_bias)
    metrics = {"moe/router_bias_abs_mean": jnp.mean(jnp.abs(bias), axis=-1)}
    if bias.shape[-1] <= LOG_FULL_BIAS_MAX_EXPERTS:
        metrics["moe/router_bias"] = bias
    return metrics
