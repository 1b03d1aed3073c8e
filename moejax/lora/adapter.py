"""Low-rank adapters on a frozen projection: LoRA (Hu et al., 2021, arXiv 2106.09685).

    y = x W + s * (x A) B,   A: [d_in, r],  B: [r, d_out],  s = alpha / r

`rslora` scales by `alpha / sqrt(r)` instead (Kalajdzievski, 2023, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA"). A starts uniform in +-1/sqrt(d_in) (peft's
kaiming-uniform with a = sqrt(5)), B at zero, so an untrained adapter leaves the base model
exactly as it was.

Parameter contract (what training, checkpoints, merging and the peft import rely on): the
adapter of projection `<param>` of module `<module>` is the child module `lora_<param>` of
that module, holding `a[E, d_in, r]` and `b[E, r, d_out]` (E = 1 for plain LoRA; d_in and
d_out are the projection's flattened input and output sizes, e.g. `attn.wq[d, H, D]` has
d_in = d and d_out = H * D in (head, dim) order). Every adapter leaf therefore has a path
component starting with `lora_` (`is_adapter_path`), and the base parameters keep exactly
the names and shapes of the model without adapters.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig

ADAPTER_PREFIX = "lora_"


def target_patterns(cfg: LoRAConfig) -> tuple[str, ...]:
    return tuple(p.strip() for p in cfg.targets.split(",") if p.strip())


def is_target(cfg: LoRAConfig | None, module: str, param: str) -> bool:
    """Whether `<module>.<param>` (e.g. `attn.wq`) matches one of `cfg.targets`."""
    if cfg is None or cfg.method == "none":
        return False
    return any(fnmatch.fnmatchcase(f"{module}.{param}", p) for p in target_patterns(cfg))


def lora_scale(cfg: LoRAConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


def is_adapter_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path (keys or jax key entries) lies inside an adapter module."""
    for entry in path:
        key = getattr(entry, "key", entry)
        if isinstance(key, str) and key.startswith(ADAPTER_PREFIX):
            return True
    return False


def _uniform_fan_in(key, shape, dtype):
    bound = 1.0 / math.sqrt(shape[-2])  # fan-in: the d_in axis of a[E, d_in, r]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRAAdapter(nn.Module):
    """`delta(x[..., d_in]) -> [..., d_out]`: the low-rank update of one projection."""
    cfg: LoRAConfig
    d_out: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d_in = self.cfg, x.shape[-1]
        pdt, dt = jnp.dtype(self.param_dtype), jnp.dtype(self.dtype)
        shape_a, shape_b = (1, d_in, cfg.rank), (1, cfg.rank, self.d_out)
        a = self.param("a", nn.with_logical_partitioning(
            _uniform_fan_in, ("lora_experts", "lora_in", "lora_rank")), shape_a, pdt)
        b = self.param("b", nn.with_logical_partitioning(
            nn.initializers.zeros, ("lora_experts", "lora_rank", "lora_out")), shape_b, pdt)
        x = x.astype(dt)
        return lora_scale(cfg) * ((x @ a[0].astype(dt)) @ b[0].astype(dt))


def lora_delta(module: nn.Module, cfg: LoRAConfig | None, param: str, x: jax.Array,
               out_shape: Sequence[int], dtype: str, param_dtype: str) -> jax.Array | None:
    """The adapter output `[..., *out_shape]` for `module.param` if it is targeted, else None.

    `x[..., d_in]` is the projection's input with its input axes flattened. Call inside the
    module's compact method; the adapter becomes its child `lora_<param>`.
    """
    if not is_target(cfg, module.name, param):
        return None
    d_out = math.prod(out_shape)
    delta = LoRAAdapter(cfg, d_out, dtype, param_dtype, name=ADAPTER_PREFIX + param)(x)
    return delta.reshape(delta.shape[:-1] + tuple(out_shape))


def add_delta(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta.astype(y.dtype)


def split_adapters(params: Any) -> tuple[Any, Any]:
    """`params -> (base, adapters)`: two nested dicts, the adapter leaves and the others."""
    from flax import traverse_util
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not is_adapter_path(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter_path(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join_adapters(base: Any, adapters: Any) -> Any:
    """The inverse of `split_adapters`."""
    from flax import traverse_util
    flat = dict(traverse_util.flatten_dict(base))
    flat.update(traverse_util.flatten_dict(adapters))
    return traverse_util.unflatten_dict(flat)
