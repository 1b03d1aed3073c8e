"""Checkpoint layouts of the training state, and how an older one reads into today's.

Today a checkpoint's `state` item is a `TrainState`: `step`, `params`, `opt_state` and
`collections`, the one mapping of the model's non-trainable collections (collection name ->
tree: `router_bias`, `lora_bias`, `lora_frozen`; None when the model has none). Adapter base
directories (`moejax.train.adapter_checkpoint`) hold `params` and `collections` alike.

Layout v0 (moejax up to commit 3d6c7c8) kept the same trees in two fields: `router_bias`
(DeepSeek-V3's bias collection, or None) and `lora_state` (the adapters' collections,
name -> tree, or None). A v0 checkpoint is recognised by those keys; it is restored onto the
v0 shape of today's target (`v0_target`), leaf for leaf the same arrays, and the result is
regrouped (`from_v0`). Nothing is converted on disk: an old run directory stays readable by
the moejax that wrote it.

The `expert_layout` collection (re-sharded FSSDP, `moejax.moe.expert_layout`) may be
missing from a checkpoint whose target has it: a run saved before the collection existed,
or weights converted from Hugging Face or edited by `moejax.compress`, all in expert-id
order. It is restored without it (`without_missing_layout`) and starts at the identity
(`with_initial_layout`).

A checkpoint whose routed experts are stored in a different number of rows than the
target's (saved with another `moe.fssdp_spare_rows`, or in id order without a layout, into
a model with spare rows) is restored onto its own rows (`saved_rows_target`): a whole state
is then moved onto the target's rows in their initial layout
(`moejax.train.expert_relayout.onto_rows`), subtrees stay in their saved rows for the
caller's logical view (an adapter run's base).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.moe.expert_layout import EXPERTS, ROW_EXPERT, initial_layout, logical_layout
from moejax.nn.collections import EXPERT_LAYOUT, ROUTER_BIAS

COLLECTIONS = "collections"
V0_FIELDS = ("router_bias", "lora_state")


def is_v0(saved_keys) -> bool:
    """Whether a state whose top-level keys are `saved_keys` was written in layout v0."""
    keys = set(saved_keys)
    return COLLECTIONS not in keys and bool(keys & set(V0_FIELDS))


def fields_of(tree: Any) -> dict[str, Any]:
    """The top-level entries of a dataclass or dict state."""
    if dataclasses.is_dataclass(tree):
        return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    return dict(tree)


def split_collections(collections: Any) -> dict[str, Any]:
    """`collections` as the two v0 fields."""
    rest = dict(collections or {})
    router_bias = rest.pop(ROUTER_BIAS, None)
    return {"router_bias": router_bias, "lora_state": rest or None}


def join_collections(router_bias: Any, lora_state: Any) -> Any:
    """The two v0 fields as one `collections` mapping (None when both are empty)."""
    collections = {} if router_bias is None else {ROUTER_BIAS: router_bias}
    collections.update(lora_state or {})
    return collections or None


def v0_target(target: Any) -> dict[str, Any]:
    """A today's state (TrainState or dict with `collections`) in the v0 shape, as a dict."""
    fields = fields_of(target)
    if COLLECTIONS in fields:
        fields.update(split_collections(fields.pop(COLLECTIONS)))
    return fields


def from_v0(restored: dict[str, Any], target: Any) -> Any:
    """A state restored in the v0 shape, regrouped into `target`'s type."""
    fields = {k: v for k, v in restored.items() if k not in V0_FIELDS}
    if any(k in restored for k in V0_FIELDS):
        fields[COLLECTIONS] = join_collections(
            restored.get("router_bias"), restored.get("lora_state")
        )
    if dataclasses.is_dataclass(target):
        return dataclasses.replace(target, **fields)
    return fields


def without_missing_layout(target: Any, saved: Any) -> tuple[Any, Any]:
    """`(target, layout)`: `target` (a TrainState or dict with `collections`) without its
    `expert_layout` and that layout's abstract tree when the `saved` tree has none; else
    `(target, None)`."""
    fields = fields_of(target)
    cols = fields.get(COLLECTIONS)
    if not isinstance(saved, dict) or not cols or EXPERT_LAYOUT not in cols:
        return target, None  # (no tree metadata: the restore reports what differs)
    if EXPERT_LAYOUT in (saved.get(COLLECTIONS) or {}):
        return target, None
    rest = {k: v for k, v in cols.items() if k != EXPERT_LAYOUT} or None
    if dataclasses.is_dataclass(target):
        return dataclasses.replace(target, **{COLLECTIONS: rest}), cols[EXPERT_LAYOUT]
    return {**fields, COLLECTIONS: rest}, cols[EXPERT_LAYOUT]


def with_initial_layout(state: Any, layout: Any) -> Any:
    """`state` with the initial `expert_layout` of `layout`'s shapes added (the identity
    when its rows are E; None: as is)."""
    if layout is None:
        return state
    fields = fields_of(state)
    cols = {**(fields.get(COLLECTIONS) or {}), EXPERT_LAYOUT: initial_layout(layout)}
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(state, **{COLLECTIONS: cols})
    return {**fields, COLLECTIONS: cols}


def layout_of(state: Any) -> Any:
    """The `expert_layout` tree of a state (TrainState or dict), or None."""
    return (fields_of(state).get(COLLECTIONS) or {}).get(EXPERT_LAYOUT)


def _in_rows(key: tuple, scopes: list[tuple]) -> bool:
    """Whether the flat key names a leaf stored in expert rows: a routed-expert parameter
    (or an optimizer leaf mirroring one) or a layout's `row_expert`."""
    key = tuple(str(k) for k in key)
    for scope in scopes:
        n = len(scope)
        for i in range(len(key) - n):
            if key[i : i + n] == scope and key[i + n] in (EXPERTS, ROW_EXPERT):
                return True
    return False


def _placed_like(leaf: Any, shape: tuple) -> jax.ShapeDtypeStruct:
    """`leaf`'s dtype and sharding at another shape (replicated where its shards would not
    divide it)."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        try:
            sharding.shard_shape(shape)
        except ValueError:
            sharding = NamedSharding(sharding.mesh, P())
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


def saved_rows_target(target: Any, saved: Any) -> Any:
    """`target` (abstract) with every leaf stored in expert rows given its shape in the
    `saved` tree when the row counts differ (module docstring); None when they agree, or
    when the target keeps no layout."""
    layout = layout_of(target)
    if layout is None or not isinstance(saved, dict):
        return None
    scopes = [
        tuple(str(k) for k in key[:-1])
        for key in traverse_util.flatten_dict(layout)
        if key[-1] == ROW_EXPERT
    ]
    wanted, have = ocp.tree.to_flat_dict(target), ocp.tree.to_flat_dict(saved)
    changed = False
    for key, leaf in wanted.items():
        if key not in have or not _in_rows(key, scopes):
            continue
        shape, now = tuple(have[key].shape), tuple(leaf.shape)
        # Only the row axis may differ; any other difference is the mismatch it is.
        if len(shape) == len(now) and sum(a != b for a, b in zip(shape, now)) == 1:
            wanted[key] = _placed_like(leaf, shape)
            changed = True
    return ocp.tree.from_flat_dict(wanted, target=target) if changed else None


def in_id_order(layout: Any) -> Any:
    """A missing layout's abstract tree for weights saved in id order (E rows)."""
    return None if layout is None else logical_layout(layout)
