"""LoRA weights and scale (Hu et al., 2021, arXiv 2106.09685): initialisers of A and B, the
experts' stacked `a[E, d_in, r]`, `b[E, r, d_out]`, and the scale s of `s * B A x`.

A starts uniform in +-1/sqrt(d_in) (peft's kaiming-uniform with a = sqrt(5)) and B at zero,
so an untrained adapter leaves the base model exactly as it was. `rslora` scales by
`alpha / sqrt(n)` (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning
with LoRA"); FlyLoRA's A is sparse, random and frozen (`sparse_random_a`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig
from moejax.nn.collections import ADAPTER_FROZEN

AXES_A = ("lora_experts", "lora_in", "lora_rank")
AXES_B = ("lora_experts", "lora_rank", "lora_out")
# LoRA on the routed experts: split along the experts' own `expert` axis, like their weights.
ROUTED_AXES_A = ("expert", "lora_in", "lora_rank")
ROUTED_AXES_B = ("expert", "lora_rank", "lora_out")


def lora_scale(cfg: LoRAConfig) -> float:
    """s = alpha / n, n = r ("rank"), top_k r ("active", SMoRA) or E r ("total", FlyLoRA);
    sqrt(n) with `rslora`."""
    n = {
        "rank": cfg.rank,
        "active": cfg.top_k * cfg.rank,
        "total": cfg.num_experts * cfg.rank,
    }[cfg.scaling]
    return cfg.alpha / (math.sqrt(n) if cfg.rslora else n)


def uniform_fan_in(key, shape, dtype):
    """U(-1/sqrt(d_in), 1/sqrt(d_in)) with d_in the second-to-last axis of `a[E, d_in, r]`."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def sparse_random_a(key, shape, density: float, dtype=jnp.float32):
    """FlyLoRA's frozen A: each of the E*r rank rows (an `a[E, d_in, r]` column) has
    max(1, int(d_in * density)) non-zeros at random inputs, drawn N(0, 1/R^2) with R = E r
    the total rank."""
    e, d_in, r = shape
    k_idx, k_val = jax.random.split(key)
    nnz = max(1, int(d_in * density))
    order = jnp.argsort(jax.random.uniform(k_idx, (e, r, d_in)), axis=-1)
    mask = jnp.argsort(order, axis=-1) < nnz  # the rank of each input in a random order
    values = jax.random.normal(k_val, (e, r, d_in), dtype) / (e * r)
    return jnp.where(mask, values, 0.0).astype(dtype).transpose(0, 2, 1)


def trainable_a(module: nn.Module, shape, param_dtype, axes=AXES_A) -> jax.Array:
    """The parameter `a` (uniform fan-in init) of an adapter module."""
    return module.param("a", nn.with_logical_partitioning(uniform_fan_in, axes), shape, param_dtype)


def zero_b(module: nn.Module, shape, param_dtype, axes=AXES_B) -> jax.Array:
    """The parameter `b` (zeros) of an adapter module."""
    init = nn.with_logical_partitioning(nn.initializers.zeros, axes)
    return module.param("b", init, shape, param_dtype)


def frozen_weight(module: nn.Module, name: str, init, shape, param_dtype, axes) -> jax.Array:
    """A weight `name` of an adapter module in the non-trainable `lora_frozen` collection
    (`lora.frozen_experts`: loaded experts that never train)."""
    value = nn.with_logical_partitioning(
        lambda: init(module.make_rng("params"), shape, param_dtype), axes
    )
    return module.variable(ADAPTER_FROZEN, name, value).value


class ExpertLoRAWeights(nn.Module):
    """`a[E, d_in, r]` (uniform +-1/sqrt(d_in)) and `b[E, r, d_out]` (zeros) of one
    projection's E experts."""

    num_experts: int
    rank: int
    d_in: int
    d_out: int
    param_dtype: str = "float32"
    routed: bool = False  # LoRA on routed experts: the expert axis is the experts' `expert`

    @nn.compact
    def __call__(self):
        e, r, pdt = self.num_experts, self.rank, jnp.dtype(self.param_dtype)
        axes_a, axes_b = (ROUTED_AXES_A, ROUTED_AXES_B) if self.routed else (AXES_A, AXES_B)
        return (
            trainable_a(self, (e, self.d_in, r), pdt, axes_a),
            zero_b(self, (e, r, self.d_out), pdt, axes_b),
        )
