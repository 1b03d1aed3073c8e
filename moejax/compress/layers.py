"""A model's variables layer by layer: `unstack` cuts every stacked collection (params,
`router_bias`, ...) into one tree per model layer; `restack` builds the stacks of another
layer layout from such per-layer trees.

The stacks are those of `moejax.models.transformer` (scanned layers; `layer_slot` of
`moejax.hf.layout` says where layer i lives: `dense_layers[i]`, `moe_layers[p]`,
`moe_periods/dense[p, r]`, `moe_periods/moe_block[p]` or `runs_<r>[j]`); every layer's tree
is a `Block`'s (attn, attn_norm, ffn_norm, mlp or moe), whatever stack held it, so a layer
moves between layouts unchanged. An edited model (pruned or merged experts, its MoE layers
now with their own expert counts, `model.layer_kinds` `moe:e=N`) is the per-layer trees of
the original with some MoE subtrees replaced, restacked for the new layout. The top-level
leaves (embedding, final norm, lm_head, RMoE's shared GRU cell) are kept as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from moejax.config_section import ConfigError
from moejax.hf.layout import layer_slot
from moejax.models.config import ModelConfig
from moejax.models.transformer import is_stack


def subtree(tree: dict, path: str) -> Any:
    """The node at `path` ("a/b/c") of a nested dict, None if absent."""
    for key in path.split("/"):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _stack_keys(m: ModelConfig) -> set[str]:
    return {layer_slot(m, i)[0].split("/")[0] for i in range(m.num_layers)}


def check_scanned(m: ModelConfig) -> None:
    if not m.scan_layers:
        raise ConfigError(
            "moejax.compress edits the scanned layer layout (model.scan_layers=True); this "
            "run has model.scan_layers=False."
        )


def unstack(tree: dict, m: ModelConfig) -> tuple[list[Any], dict]:
    """(per-layer trees, top-level rest) of one collection; a layer without variables in it
    (a dense layer in `router_bias`) is None."""
    check_scanned(m)
    layers = []
    for i in range(m.num_layers):
        path, index = layer_slot(m, i)
        sub = subtree(tree, path)
        layers.append(None if sub is None else jax.tree.map(lambda a: np.asarray(a)[index], sub))
    stacks = _stack_keys(m)
    rest = {k: v for k, v in tree.items() if k not in stacks and not is_stack(k)}
    return layers, rest


def restack(layers: list[Any], rest: dict, m: ModelConfig) -> dict:
    """The inverse of `unstack` for the layout of `m` (len(layers) == m.num_layers)."""
    check_scanned(m)
    if len(layers) != m.num_layers:
        raise ValueError(f"{len(layers)} layer trees for a model of {m.num_layers} layers.")
    groups: dict[str, dict[tuple[int, ...], Any]] = {}
    for i, layer in enumerate(layers):
        path, index = layer_slot(m, i)
        groups.setdefault(path, {})[index] = layer
    out = dict(rest)
    for path, by_index in groups.items():
        if all(v is None for v in by_index.values()):
            continue
        if any(v is None for v in by_index.values()):
            raise ValueError(
                f"stack {path}: some layers have variables in this collection, some not."
            )
        shape = tuple(max(ix[d] for ix in by_index) + 1 for d in range(len(next(iter(by_index)))))

        def build(prefix: tuple[int, ...]):
            if len(prefix) == len(shape):
                return by_index[prefix]
            parts = [build(prefix + (j,)) for j in range(shape[len(prefix)])]
            return jax.tree.map(lambda *xs: np.stack(xs), *parts)

        node = out
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = build(())
    return out
