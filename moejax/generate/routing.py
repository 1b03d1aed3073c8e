"""Router-delta trees: the `router_delta` collection (`moejax.moe.router_delta`) of a model,
built, filled and indexed by MoE layer, for the decoding-time routing methods.

    delta = zero_delta(model, variables)         # logits 0, every rank allowed: no change
    weak = rank_delta(delta, ranks=(2,))         # SCMoE's rank-2 routing in every MoE layer
    mask = layer_mask(delta, layers=(-2, -1))    # 1 on the last two MoE layers' logits
    logits, _ = model.apply({**variables, "router_delta": weak}, tokens)

The tree mirrors the routers' scopes with the layer axis of each scanned stack first (as
`router_bias`): `logits` and `ranks` are `[L, E]` in a stack of L MoE layers (`[E]`
unscanned), so any layout (`moe_layers`, `moe_periods`, per-layer runs `runs_<r>` with
their own expert counts) works. `moe_layer_leaves` orders the MoE layers as the model runs
them (stacks in order, then along their layer axis).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.transformer import Transformer
from moejax.nn.collections import CACHE, ROUTER_DELTA


def _name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def zero_delta(model: Transformer, variables: dict) -> dict:
    """The model's neutral router delta (zero logits, every rank allowed), from the shapes
    of one traced apply that builds the collection. ValueError for a model without routers."""

    def build(v):
        _, state = model.clone(decode=False).apply(
            v, jnp.zeros((1, 1), jnp.int32), mutable=[ROUTER_DELTA]
        )
        return state.get(ROUTER_DELTA, {})

    base = without_decoding_state(variables)
    shapes = jax.eval_shape(build, base)
    if not jax.tree.leaves(shapes):
        raise ValueError("the model has no MoE layer: decoding-time routing needs routers.")
    return jax.tree_util.tree_map_with_path(
        lambda p, s: (jnp.ones if _name(p) == "ranks" else jnp.zeros)(s.shape, s.dtype), shapes
    )


def _natural(keys: tuple[str, ...]) -> tuple:
    return tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)) for k in keys)


def moe_layer_leaves(delta: dict, name: str = "logits") -> list[tuple[tuple[str, ...], int | None]]:
    """(path of the `name` leaf, index on its layer axis or None unscanned) of every MoE
    layer, in the order the model runs them."""
    leaves = [
        (_keys(p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(delta)[0]
        if _name(p) == name
    ]
    out = []
    for keys, leaf in sorted(leaves, key=lambda kv: _natural(kv[0])):
        if leaf.ndim == 1:
            out.append((keys, None))
        else:
            out.extend((keys, i) for i in range(leaf.shape[0]))
    return out


def num_moe_layers(delta: dict) -> int:
    return len(moe_layer_leaves(delta))


def resolve_layers(delta: dict, layers: Sequence[int] | None) -> list[int]:
    """MoE-layer indices (negative from the end; None: all), checked against the model."""
    n = num_moe_layers(delta)
    if layers is None:
        return list(range(n))
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"MoE layer {i} does not exist: the model has {n} MoE layers.")
        out.append(i % n)
    return sorted(set(out))


def _map_layers(delta: dict, name: str, fn) -> dict:
    """`delta` with each `name` leaf replaced by fn(leaf as a NumPy array [L, E], the model
    indices of its rows)."""
    order = moe_layer_leaves(delta, name)
    rows: dict[tuple[str, ...], list[int]] = {}
    for index, (keys, _) in enumerate(order):
        rows.setdefault(keys, []).append(index)

    def visit(path, leaf):
        keys = _keys(path)
        if _name(path) != name:
            return leaf
        value = np.array(leaf).reshape((-1, leaf.shape[-1]))
        return jnp.asarray(fn(value, rows[keys]).reshape(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(visit, delta)


def rank_delta(delta: dict, ranks: Sequence[int], layers: Sequence[int] | None = None) -> dict:
    """`delta` whose rank masks keep only the rule's choices at `ranks` (1-based: rank r is
    the rule's r-th choice) in the MoE `layers` (None: all)."""
    chosen = set(resolve_layers(delta, layers))
    for r in ranks:
        if r < 1:
            raise ValueError(f"rank {r} must be >= 1 (rank 1 is the router's first choice).")

    def fill(value, indices):
        for row, layer in enumerate(indices):
            if layer in chosen:
                if max(ranks) > value.shape[-1]:
                    raise ValueError(
                        f"rank {max(ranks)} exceeds the {value.shape[-1]} experts of MoE "
                        f"layer {layer}."
                    )
                value[row] = 0.0
                value[row, [r - 1 for r in ranks]] = 1.0
        return value

    return _map_layers(delta, "ranks", fill)


def layer_mask(delta: dict, layers: Sequence[int] | None) -> dict:
    """A tree like `delta`: ones on the `logits` rows of the MoE `layers` (None: all), zeros
    elsewhere and on every `ranks` leaf (what a gradient step on the delta may move)."""
    chosen = set(resolve_layers(delta, layers))

    def fill(value, indices):
        return np.stack([np.full(value.shape[-1], float(i in chosen)) for i in indices])

    mask = _map_layers(delta, "logits", fill)
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: jnp.zeros_like(leaf) if _name(p) == "ranks" else leaf, mask
    )


def without_decoding_state(variables: dict) -> dict:
    """The variables without a decoding cache or a router delta (what a run stores)."""
    return {k: v for k, v in variables.items() if k not in (CACHE, ROUTER_DELTA)}


def with_delta(variables: dict, delta: Any) -> dict:
    """`variables` routing with `delta` (replacing any delta they held)."""
    return {**variables, ROUTER_DELTA: delta}
