"""Routing stability: how many tokens change their first-choice expert between evaluations.

Every evaluation reads the same validation batches, so the first-choice expert of each
(MoE layer, token) can be compared with the previous evaluation's. The fraction that changed
shows when routing settles (routing fluctuation, as studied by StableMoE, Dai et al., 2022);
a router that keeps reshuffling tokens late in training wastes what the experts learned.
The comparison covers loss tokens only (`top1_expert = -1` elsewhere) and starts at the
second evaluation of a process (the previous assignment is not checkpointed).
"""

from __future__ import annotations

import numpy as np


class RoutingStability:
    """Holds the previous evaluation's top-1 experts `[num_moe_layers, tokens]`."""

    def __init__(self):
        self.previous: np.ndarray | None = None

    def update(self, top1: np.ndarray) -> dict[str, np.ndarray]:
        """Compares with the previous call and keeps `top1`; returns
        `{"moe/top1_changed": [num_moe_layers]}` (fraction of tokens), or {} on the first
        call or when the evaluation set changed shape."""
        top1 = np.asarray(top1)
        previous, self.previous = self.previous, top1
        if previous is None or previous.shape != top1.shape:
            return {}
        valid = (top1 >= 0) & (previous >= 0)
        changed = np.sum((top1 != previous) & valid, axis=1)
        return {"moe/top1_changed": changed / np.maximum(np.sum(valid, axis=1), 1)}
