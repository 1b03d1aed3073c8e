"""Applying a model with its sown side outputs, collected once.

Adapters report their weighted aux losses, scalar routing metrics and per-expert loads with
`Module.sow` (`moejax.nn.collections`: `adapter_aux`, `adapter_metrics`, `balance_load`), at
their own scope paths and stacked over scanned layers. `apply_model` applies the model with
those collections mutable and folds them into the model's `extras`:

- `aux_losses["lora_<name>"]`: every adapter's `<name>` loss summed over adapters and layers,
  and added to `aux_loss` (the training loss term);
- `lora_metrics[<name>]`: the mean of every adapter's scalar `<name>` over adapters and
  layers;
- `balance_load`: the sown load tree, which mirrors the trees of the sign-rule biases
  (`router_bias`, `lora_bias`), for `moejax.train.state_rules`;
- `layout_load`: the sown loads of the layers with an expert layout, which mirror its
  `window_load` tree (`moejax.moe.expert_layout`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from moejax.nn.collections import (
    ADAPTER_AUX,
    ADAPTER_METRICS,
    BALANCE_LOAD,
    LAYOUT_LOAD,
    SIDE_OUTPUTS,
)


def _by_name(tree: Any) -> dict[str, list[jax.Array]]:
    """The leaves of a sown collection grouped by their variable name (the last key)."""
    groups: dict[str, list[jax.Array]] = {}
    for path, leaf in traverse_util.flatten_dict(tree or {}).items():
        groups.setdefault(path[-1], []).append(leaf)
    return groups


def collect_side_outputs(extras: dict[str, Any], sown: Any) -> dict[str, Any]:
    """`extras` with the sown collections folded in (module docstring)."""
    aux_losses = dict(extras["aux_losses"])
    for name, leaves in _by_name(sown.get(ADAPTER_AUX)).items():
        aux_losses[f"lora_{name}"] = sum(jnp.sum(v) for v in leaves)
    metrics = {
        name: jnp.mean(jnp.concatenate([jnp.ravel(v) for v in leaves]))
        for name, leaves in _by_name(sown.get(ADAPTER_METRICS)).items()
    }
    return {
        **extras,
        "aux_losses": aux_losses,
        "aux_loss": sum(aux_losses.values(), jnp.zeros((), jnp.float32)),
        "lora_metrics": metrics,
        BALANCE_LOAD: dict(sown.get(BALANCE_LOAD, {})),
        LAYOUT_LOAD: dict(sown.get(LAYOUT_LOAD, {})),
    }


def apply_model(model, variables: dict[str, Any], *args, **kwargs) -> tuple[Any, dict[str, Any]]:
    """`model.apply(variables, *args, **kwargs)` with its side outputs collected into
    `extras`."""
    (logits, extras), sown = model.apply(variables, *args, **kwargs, mutable=list(SIDE_OUTPUTS))
    return logits, collect_side_outputs(extras, sown)
