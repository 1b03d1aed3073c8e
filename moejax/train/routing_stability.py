"""Routing stability: how many tokens change their first-choice expert between evaluations,
compared on device.

Every evaluation reads the same validation batches, so the first-choice expert of each
(MoE layer, token) can be compared with the previous evaluation's. The fraction that changed
shows when routing settles (routing fluctuation, as studied by StableMoE, Dai et al., 2022);
a router that keeps reshuffling tokens late in training wastes what the experts learned.
The comparison covers loss tokens only (`top1 = -1` elsewhere) and starts at the second
evaluation of a process (the previous assignment is not checkpointed).

Nothing per token leaves the devices: the eval step (`moejax.train.step.eval_step`) takes the
previous evaluation's top-1 experts of its batch, `[num_moe_layers, B, L]` in the narrowest
integer dtype that holds the expert ids (`top1_dtype`) and split over B like the batch (all
-1 when there is none, so one compiled program serves every evaluation), and returns the
new ones, kept split, with `top1_changes`: per MoE layer the loss tokens whose top-1 changed
and the loss tokens compared. `RoutingStability` keeps the per-batch arrays from one
evaluation to the next and turns the summed counts into `moe/top1_changed` fractions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def top1_dtype(num_experts: int) -> np.dtype:
    """The narrowest signed integer dtype holding expert ids 0..num_experts-1 and -1."""
    for dtype in (np.int8, np.int16, np.int32):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"top1_dtype: {num_experts} experts do not fit an int32")


def top1_changes(previous: jax.Array, top1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[num_moe_layers, ...]` top-1 experts of two evaluations (-1: not a loss token) ->
    (tokens whose expert changed, tokens compared), int32[num_moe_layers] each."""
    valid = (top1 >= 0) & (previous >= 0)
    axes = tuple(range(1, top1.ndim))
    changed = jnp.sum((top1 != previous) & valid, axis=axes, dtype=jnp.int32)
    return changed, jnp.sum(valid, axis=axes, dtype=jnp.int32)


def minus_ones(like: jax.ShapeDtypeStruct) -> jax.Array:
    """All -1 ("no previous top-1") with `like`'s shape, dtype and sharding (if any),
    created in place on the devices."""
    return jnp.full(like.shape, -1, like.dtype, device=like.sharding)


class RoutingStability:
    """Holds the previous evaluation's top-1 experts, one device array per batch.

    Per evaluation: `start()`; for each batch, `previous(like)` (what the eval step takes)
    and `add(top1)` (what it returned); then `finish(changed, compared)` with the counts
    summed over the batches."""

    def __init__(self):
        self._previous: list[jax.Array | None] = []
        self._current: list[jax.Array] = []
        self._comparable = False

    def start(self) -> None:
        """Begins an evaluation."""
        self._current = []
        self._comparable = bool(self._previous)

    def previous(self, like: jax.ShapeDtypeStruct) -> jax.Array:
        """The previous evaluation's top-1 of the next batch, handed over (the eval step may
        donate it); all -1 shaped like `like` when there is none of that shape and dtype (the
        first evaluation, another evaluation set), and then this evaluation reports nothing."""
        i = len(self._current)
        prev = self._previous[i] if i < len(self._previous) else None
        if prev is not None and prev.shape == like.shape and prev.dtype == like.dtype:
            self._previous[i] = None
            return prev
        self._comparable = False
        return minus_ones(like)

    def add(self, top1: jax.Array) -> None:
        """Keeps the batch's new top-1 for the next evaluation."""
        self._current.append(top1)

    def finish(self, changed, compared) -> dict[str, np.ndarray]:
        """`{"moe/top1_changed": [num_moe_layers]}` (the fraction of compared tokens whose
        top-1 changed) from the counts summed over this evaluation's batches, or {} on the
        first evaluation or when the evaluation set changed shape."""
        comparable = self._comparable and len(self._current) == len(self._previous)
        self._previous, self._current = self._current, []
        if not comparable:
            return {}
        changed, compared = np.asarray(changed, np.float64), np.asarray(compared, np.float64)
        return {"moe/top1_changed": changed / np.maximum(compared, 1.0)}
