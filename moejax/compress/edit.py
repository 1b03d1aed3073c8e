"""Editing the routed experts of a model's MoE layers: new expert weights, router columns
and biases per layer, and the model and config that hold them.

`LayerEdit` is what a compression method decides for one MoE layer: the new stacked expert
weights `[E', ...]`, the router's output kernel `[..., E']` (the last axis of `router/kernel`
indexes the experts for every scorer: `linear`'s `[d, E]`, RMoE's `[h, E]`), the
`sigmoid_bias` rule's per-expert bias `[E']` (the `router_bias` collection, DeepSeek-V3),
and the layer's top-k. Everything else of the layer (attention, norms, the shared experts
and their gate) is kept. `apply_edits` returns the edited `Transformer` and its variables:
the config's expert counts become per-layer (`model.layer_kinds` `moe:e=E':k=k'`) when the
layers differ, else the moe section's `num_experts` / `top_k` with the layout unchanged (a
model every HF architecture of `moejax.hf` can still express); the variables are the
original per-layer trees (`moejax.compress.layers`) with the MoE subtrees replaced,
restacked for the new layout, and checked against the new model's own shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.compress.layers import restack, unstack
from moejax.config_section import ConfigError
from moejax.models.config import LayerKind, ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.collections import EXPERT_LAYOUT, NON_TRAINABLE, ROUTER_BIAS


@dataclasses.dataclass
class LayerEdit:
    """The new routed experts of one MoE layer (module docstring)."""

    experts: dict[str, np.ndarray]
    router_kernel: np.ndarray
    top_k: int
    router_bias: np.ndarray | None = None

    @property
    def num_experts(self) -> int:
        return int(self.router_kernel.shape[-1])


def edited_configs(
    m: ModelConfig, moe: MoEConfig, edits: dict[int, LayerEdit]
) -> tuple[ModelConfig, MoEConfig]:
    """The model and moe sections of the edited model (module docstring)."""
    layout = list(m.layer_layout)
    shapes = {}
    for i, kind in enumerate(layout):
        if kind.moe:
            edit = edits.get(i)
            shapes[i] = (
                (edit.num_experts, edit.top_k)
                if edit is not None
                else (kind.num_experts or moe.num_experts, kind.top_k or moe.top_k)
            )
    moe = dataclasses.replace(moe, balance_devices=0)  # re-derived from the mesh
    if len(set(shapes.values())) <= 1:
        if shapes:
            e, k = next(iter(shapes.values()))
            moe = dataclasses.replace(moe, num_experts=e, top_k=k)
        if m.layer_kinds.strip():
            m = dataclasses.replace(m, layer_kinds=",".join(str(LayerKind(k.moe)) for k in layout))
        return m, moe
    if moe.selection == "sigmoid_bias":
        raise ConfigError(
            f"the MoE layers would keep different expert counts {sorted(set(shapes.values()))} "
            f"(experts, top-k), which moe.selection='sigmoid_bias' does not support (its "
            f"router_bias collection stacks the layers); keep the same number in every layer."
        )
    kinds = [
        str(LayerKind(True, *shapes[i])) if kind.moe else str(LayerKind(False))
        for i, kind in enumerate(layout)
    ]
    m = dataclasses.replace(m, layer_kinds=",".join(kinds), first_k_dense=0, moe_every=1)
    return m, moe


def _edited_layer(layer: Any, edit: LayerEdit, collection: str) -> Any:
    layer = jax.tree.map(lambda a: a, layer)  # a copy of the dict structure
    if collection == "params":
        layer["moe"]["experts"] = {k: np.asarray(v) for k, v in edit.experts.items()}
        layer["moe"]["router"]["kernel"] = np.asarray(edit.router_kernel)
    elif collection == ROUTER_BIAS:
        if edit.router_bias is None:
            raise ValueError("a sigmoid_bias router needs a router_bias in its LayerEdit.")
        layer["moe"]["router"]["bias"] = np.asarray(edit.router_bias, np.float32)
    return layer


def apply_edits(
    model: Transformer, variables: dict[str, Any], edits: dict[int, LayerEdit]
) -> tuple[Transformer, dict[str, Any]]:
    """(edited model, its variables) for `edits` {model layer: LayerEdit}."""
    if model.adapters is not None:
        raise ConfigError(
            "moejax.compress edits base models; this run has adapters (lora.method): merge "
            "them into the base weights first."
        )
    m, moe = model.model, model.moe
    new_m, new_moe = edited_configs(m, moe, edits)
    new_model = Transformer(new_m, new_moe)
    out = {}
    for name, tree in variables.items():
        # The expert layout is dropped: edited experts are in id order (the identity).
        if name not in ("params", *NON_TRAINABLE) or name == EXPERT_LAYOUT:
            continue
        layers, rest = unstack(tree, m)
        for i, edit in edits.items():
            if layers[i] is not None:
                layers[i] = _edited_layer(layers[i], edit, name)
        out[name] = restack(layers, rest, new_m)
    abstract = nn.unbox(
        jax.eval_shape(new_model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), out)
    want = {k: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), abstract[k]) for k in out}
    if got != want:
        raise ValueError(f"edited variables do not fit the edited model: {got} != {want}")
    return new_model, jax.tree.map(jnp.asarray, out)
