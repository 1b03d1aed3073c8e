"""Sharded loading: a Hugging Face checkpoint straight onto a device mesh.

`place(plan, abstract, mesh, rules, param_dtype)` builds every moejax leaf as a sharded
`jax.Array` (`jax.make_array_from_callback`) from the sources a `moejax.hf.weights.ShardPlan`
collected: for each device of this process the callback reads, layer by layer, only the box
of each checkpoint tensor that device's shard needs (safetensors `get_slice`; a transposed,
reshaped or rotary-permuted weight reads the bounding box of its indices), for fused
(`experts.gate_up_proj`) and per-expert layouts alike. Nothing holds the whole model on the
host: besides the device buffers, the peak is one shard of one leaf (replicated devices
reuse the last shard read).
"""

from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from moejax.hf.weights import ShardPlan
from moejax.sharding.partitioning import check_divisible, logical_shardings


def _leaf(shape, sharding, dtype, sources: dict[tuple[int, ...], Any]) -> jax.Array:
    stack = len(next(iter(sources)))  # leading layer axes
    last: dict[str, Any] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        ranges = [np.arange(*s.indices(n)) for s, n in zip(index, shape)]
        key = repr([(int(r[0]), len(r)) if len(r) else (0, 0) for r in ranges])
        if last.get("key") == key:  # replicated devices: the same shard again
            return last["value"]
        out = np.empty([len(r) for r in ranges], np.float32)
        for pos in itertools.product(*(range(len(r)) for r in ranges[:stack])):
            layer = tuple(int(ranges[j][p]) for j, p in enumerate(pos))
            out[pos] = sources[layer].box(tuple(ranges[stack:]))
        value = out.astype(dtype)
        last.update(key=key, value=value)
        return value

    return jax.make_array_from_callback(tuple(shape), sharding, read)


def place(plan: ShardPlan, abstract_boxed: Any, mesh, rules, param_dtype) -> dict[str, Any]:
    """The variables of `plan` as `jax.Array`s laid out on `mesh` by the logical `rules`
    (the model's `nn.Partitioned` names, as the trainer places them)."""
    check_divisible(abstract_boxed, mesh, rules)
    shardings = flax.traverse_util.flatten_dict(
        logical_shardings(abstract_boxed, mesh, rules), sep="/"
    )
    shapes = flax.traverse_util.flatten_dict(nn.unbox(abstract_boxed), sep="/")
    pdt = jnp.dtype(param_dtype)
    flat = {
        key: _leaf(
            shapes[key].shape,
            shardings[key],
            pdt if key.startswith("params/") else np.float32,
            plan.sources[key],
        )
        for key in plan.shapes
    }
    return flax.traverse_util.unflatten_dict(flat, sep="/")
