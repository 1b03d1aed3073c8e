"""Merging a static LoRA into its base for inference (Hu et al., 2021, section 4.1).

    W' = W + s * A B,   A: [d_in, r],  B: [r, d_out],  s = alpha / r (alpha / sqrt(r) rsLoRA)

`W` is the projection reshaped to its flattened `[d_in, d_out]` (the adapter contract of
`moejax.lora.adapter`: `attn.wq[d, H, D]` has d_out = H * D in (head, dim) order, `attn.wo
[H, D, d]` has d_in = H * D), with any leading layer axes of the scanned layout kept. LoRA
on the routed experts (`experts/lora_<w>`: `a[E, d_in, r]`, `b[E, r, d_out]`, one pair per
expert) folds into each expert: `W_e' = W_e + s A_e B_e`. The
merged params have exactly the base names and shapes, so `Transformer(model, moe)` without
adapters computes what the adapted model computes, at the base's cost.

Only static adapters merge: a method whose update does not depend on the input (plain LoRA,
rsLoRA: one expert, no router). Routed mixtures are refused with an error naming the method.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from moejax.config_section import ConfigError
from moejax.lora.config import LoRAConfig
from moejax.lora.targets import ADAPTER_PREFIX
from moejax.lora.weights import lora_scale

# Methods whose adapters are input-independent weight updates `a[1, d_in, r] b[1, r, d_out]`.
STATIC_METHODS = ("lora",)


def check_mergeable(cfg: LoRAConfig) -> None:
    if cfg.method not in STATIC_METHODS or cfg.num_experts != 1:
        raise ConfigError(
            f"lora.method={cfg.method!r} (lora.num_experts={cfg.num_experts}) routes tokens "
            f"to adapters per input, which no single merged weight expresses; only static "
            f"methods {STATIC_METHODS} with one expert merge. Run the adapted model "
            f"(Transformer(..., adapters=adapters_for(cfg))) for inference instead."
        )


def merge(params: Any, cfg: LoRAConfig) -> dict:
    """Adapted params (base + `lora_*` children) -> base params with `W + s A B` merged."""
    check_mergeable(cfg)
    scale = lora_scale(cfg)
    flat = traverse_util.flatten_dict(params)
    out = {
        k: v
        for k, v in flat.items()
        if not any(isinstance(p, str) and p.startswith(ADAPTER_PREFIX) for p in k)
    }
    for key in flat:
        if len(key) < 2 or key[-1] != "a" or not key[-2].startswith(ADAPTER_PREFIX):
            continue
        parent, name = key[:-2], key[-2][len(ADAPTER_PREFIX) :]
        leaves = {k[-1] for k in flat if k[:-1] == key[:-1]}
        if leaves != {"a", "b"}:
            raise ConfigError(
                f"adapter {'/'.join(key[:-1])} holds {sorted(leaves)}, not the "
                f"plain LoRA pair (a, b); it cannot be merged."
            )
        w = flat[parent + (name,)]
        a, b = flat[key], flat[key[:-1] + ("b",)]
        if parent and parent[-1] == "experts":  # routed experts: one (A_e, B_e) per expert
            delta = jnp.einsum(
                "...eir,...ero->...eio", a.astype(jnp.float32), b.astype(jnp.float32)
            )
            out[parent + (name,)] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
            continue
        lead = a.shape[:-3]  # scanned layer axes
        if a.shape[-3] != 1:
            raise ConfigError(
                f"adapter {'/'.join(key[:-1])} has {a.shape[-3]} experts; only one merges."
            )
        delta = (
            jnp.einsum(
                "...ir,...ro->...io",
                a[..., 0, :, :].astype(jnp.float32),
                b[..., 0, :, :].astype(jnp.float32),
            )
            * scale
        )
        out[parent + (name,)] = (
            w.astype(jnp.float32) + delta.reshape(lead + w.shape[len(lead) :])
        ).astype(w.dtype)
    return traverse_util.unflatten_dict(out)
