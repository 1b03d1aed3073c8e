"""Parameters with logical axis names, stored in `param_dtype` and cast to `dtype` at use.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`,
`expert`, ...) that `moejax.sharding` maps to mesh axes; no module names a mesh axis.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype_of(name: str):
    """The numpy dtype named by a config string ("float32", "bfloat16", ...)."""
    return jnp.dtype(name)


def logical_param(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[str],
    std: float,
    param_dtype,
) -> jax.Array:
    """A normal(std)-initialised parameter with logical axis names (`axes`, one per dim)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))
    return module.param(name, init, tuple(shape), param_dtype)
