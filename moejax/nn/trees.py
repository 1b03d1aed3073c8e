"""The one tree partition helper: nested dicts split by a predicate on leaf paths, and joined.

`split_tree(tree, selected) -> (selected leaves, the others)` and `join_trees(*trees)` work on
nested dicts of any leaves (arrays, ShapeDtypeStructs, boxed `nn.Partitioned`). Adapter runs
use it for the base / adapter split (`moejax.lora.adapter.is_adapter_path`) and for the
trainable / frozen split of the train step (`moejax.lora.trainable.is_trainable`).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import traverse_util


def split_tree(tree: Any, selected: Callable[[tuple], bool]) -> tuple[dict, dict]:
    """`tree -> (the leaves whose key path satisfies `selected`, the others)`."""
    parts: tuple[dict, dict] = ({}, {})
    for path, leaf in traverse_util.flatten_dict(tree).items():
        parts[0 if selected(path) else 1][path] = leaf
    return traverse_util.unflatten_dict(parts[0]), traverse_util.unflatten_dict(parts[1])


def join_trees(*trees: Any) -> dict:
    """The union of nested dicts with disjoint leaves (the inverse of `split_tree`)."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)
