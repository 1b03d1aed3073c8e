"""Which parameters an adapter run trains: the one predicate, and params split by it.

LoRA fine-tuning (Hu et al., 2021) freezes the base model and trains the adapters only.
`is_trainable(path)` says which leaves get gradients and optimizer state: every leaf inside
an adapter module (`is_adapter_path`, a path component `lora_*`), except the leaves a
variant declares frozen in `FROZEN_ADAPTER_LEAVES` (e.g. FlyLoRA's fixed random `A`). A
variant that keeps a frozen adapter leaf registers its name there, so the optimizer, the
train step and the tests all see the same split.

The train step splits the params by it with the one tree partition helper
(`moejax.nn.trees.split_tree` / `join_trees`) and differentiates with respect to the
trainable part only. Adapter weights that never train and are not params (FlyLoRA's sparse
random A) live in the non-trainable `lora_frozen` collection instead.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import traverse_util

from moejax.lora.targets import is_adapter_path

# (adapter module name or "*", leaf name) pairs that stay frozen although they live inside an
# adapter module. Variants add theirs, e.g. ("*", "a_frozen") for a fixed random projection.
FROZEN_ADAPTER_LEAVES: frozenset[tuple[str, str]] = frozenset()

TRAINABLE, FROZEN = "trainable", "frozen"


def _keys(path: Sequence[Any]) -> list[str]:
    """The string keys of a path of dict keys or jax key entries (box attributes dropped)."""
    out = []
    for entry in path:
        key = getattr(entry, "key", entry)
        if isinstance(key, str):
            out.append(key)
    return out


def is_trainable(path: Sequence[Any]) -> bool:
    """Whether the parameter at `path` is trained in an adapter run (see the module doc)."""
    if not is_adapter_path(path):
        return False
    keys = _keys(path)
    module = next((k for k in reversed(keys[:-1]) if k.startswith("lora_")), "")
    leaf = keys[-1] if keys else ""
    return (module, leaf) not in FROZEN_ADAPTER_LEAVES and ("*", leaf) not in FROZEN_ADAPTER_LEAVES


def labels(params: Any) -> Any:
    """A tree like `params` with "trainable" / "frozen" at each leaf (optax.multi_transform)."""

    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAINABLE if is_trainable(path) else FROZEN, params
    )


def count(params: Any) -> int:
    """Number of trainable scalars in `params`."""

    flat = traverse_util.flatten_dict(params)
    return sum(math.prod(getattr(v, "shape", ())) for k, v in flat.items() if is_trainable(k))
