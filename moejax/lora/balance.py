"""Sign-rule balancing of the LoRA experts' routing biases (the `lora_bias` collection).

SMoRA (Zhao et al., 2025, "Each Rank Could be an Expert: Single-Ranked Mixture of Experts
LoRA for Multi-Task Learning", reference code StyxXuan/smora `tuners/srmole/layer.py`) and
FlyLoRA (Zou et al., 2025, reference code gfyddha/FlyLoRA `flylora.py`) balance their experts
as DeepSeek-V3 does (Liu et al., 2024, arXiv 2412.19437, section 2.1.2):

    d_i <- d_i + u * sign(mean_j c_j - c_i)

with c_i the number of (token, slot) assignments of expert i in the step and u
`lora.bias_update_rate`; only the choice of experts sees d. The update runs after the
optimizer step, outside the gradient, like `moejax.train.router_bias` for the MoE layers.
Each adapter reports its `load[E]` (c / sum c, same signs) under the scope path of its
bias (`moejax.lora.collect`), stacked over scanned layers exactly as the bias is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


def sign_rule(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """One update of `bias[..., E]` from `load[..., E]` (module docstring)."""
    load = jax.lax.stop_gradient(load.astype(jnp.float32))
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_lora_bias(lora_bias: Any, loads: dict[str, jax.Array], rate: float) -> Any:
    """The `lora_bias` collection after one step; `loads` maps each bias's module path
    ("/"-joined) to its load (the Transformer's `extras["lora_load"]`)."""
    flat = traverse_util.flatten_dict(lora_bias)
    out = {}
    for key, bias in flat.items():
        path = "/".join(key[:-1])
        if path not in loads or loads[path].shape != bias.shape:
            raise ValueError(
                f"lora_bias {'/'.join(key)} of shape {bias.shape} has no load of "
                f"that shape among the adapters' reports {sorted(loads)}."
            )
        out[key] = sign_rule(bias, loads[path], rate).astype(bias.dtype)
    return traverse_util.unflatten_dict(out)
