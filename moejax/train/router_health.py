"""Router health warnings from the per-layer `moe/*` metrics the train step already returns.

At each logging step the trainer hands `RouterHealth.observe` the metrics of the steps since
the previous one. Per MoE layer it averages over those steps (steps whose update was skipped
as non-finite are left out) and warns when

  - an expert received no tokens (`moe/load[e] == 0`) in each of `train.dead_expert_logs`
    consecutive logged intervals (a dead expert: it gets no gradient, so it stays dead);
  - the dropped fraction (`moe/dropped_fraction`, the capacity dispatcher's assignments
    past capacity) exceeds `train.max_dropped_fraction`;
  - the load coefficient of variation (`moe/load_cv`, std / mean of the expert loads)
    exceeds `train.max_load_cv` or is not finite. CV 1 is, e.g., half of the experts idle
    while the other half take twice the mean load; a balanced router sits near 0.

Each condition warns once when it starts and again only after it has cleared, so a long
episode is one line, not one per log step. The remedy named follows the run's balancing:
`moe.balance_coef` for a loss-balanced router, `moe.bias_update_rate` for the aux-loss-free
bias of `moe.selection="sigmoid_bias"` (DeepSeek-V3), which has no balance loss to raise.
Warnings are strings for the trainer to print; `counts` tallies them per kind. Layers are
numbered among the MoE layers (as in the `moe/<name>/layer<i>` metrics). With per-layer
expert counts (`model.layer_kinds`), `layer_experts` keeps a layer's zero-padded experts
out of the dead-expert check.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class RouterHealth:
    def __init__(
        self,
        *,
        dead_expert_logs: int,
        max_dropped_fraction: float,
        max_load_cv: float,
        bias_balanced: bool = False,
        layer_experts: Sequence[int] | None = None,
    ):
        self.dead_expert_logs = dead_expert_logs
        # Each MoE layer's expert count where they differ (model.layer_kinds): the `moe/load`
        # rows of the smaller layers are zero-padded, and a padded expert is not dead.
        self.layer_experts = None if layer_experts is None else list(layer_experts)
        # How the router is balanced, for the remedy the warnings name.
        if bias_balanced:
            self.remedy = (
                "Raise moe.bias_update_rate (the aux-loss-free bias's step; "
                "moe.seq_balance_coef adds a sequence-wise loss)"
            )
        else:
            self.remedy = (
                "Raise moe.balance_coef, or balance with a bias (moe.selection='sigmoid_bias')"
            )
        self.max_dropped_fraction = max_dropped_fraction
        self.max_load_cv = max_load_cv
        self._dead_runs: np.ndarray | None = None  # [L, E] consecutive intervals at 0 load
        self._active: set[tuple] = set()  # conditions currently warned about
        self.counts: collections.Counter[str] = collections.Counter()

    def observe(self, step: int, interval: Sequence[Mapping[str, Any]]) -> list[str]:
        """Warnings for the logged interval ending at `step` (fetched step metrics)."""
        rows = [m for m in interval if not float(np.asarray(m.get("nonfinite", 0.0))) > 0]
        if not rows or "moe/load" not in rows[0]:
            return []  # a dense model, or only skipped steps
        warnings: list[str] = []
        load = np.mean([np.asarray(m["moe/load"], np.float64) for m in rows], axis=0)  # [L, E]
        if self.dead_expert_logs:
            if self._dead_runs is None or self._dead_runs.shape != load.shape:
                self._dead_runs = np.zeros(load.shape, np.int64)
            self._dead_runs = np.where(load == 0, self._dead_runs + 1, 0)
            for layer in range(load.shape[0]):
                runs = self._dead_runs[layer]
                if self.layer_experts is not None:
                    runs = runs[: self.layer_experts[layer]]
                dead = np.flatnonzero(runs >= self.dead_expert_logs)
                self._update(
                    ("dead", layer),
                    len(dead) > 0,
                    warnings,
                    step,
                    f"MoE layer {layer}: expert(s) {dead.tolist()} received no tokens "
                    f"in the last {self.dead_expert_logs} logged intervals "
                    f"(train.dead_expert_logs); a dead expert gets no gradient. {self.remedy}.",
                )
        if "moe/dropped_fraction" in rows[0]:
            dropped = np.mean(
                [np.asarray(m["moe/dropped_fraction"], np.float64) for m in rows], axis=0
            ).reshape(-1)
            for layer, frac in enumerate(dropped):
                self._update(
                    ("dropped", layer),
                    frac > self.max_dropped_fraction,
                    warnings,
                    step,
                    f"MoE layer {layer}: {frac:.1%} of the expert assignments "
                    f"were dropped (> train.max_dropped_fraction="
                    f"{self.max_dropped_fraction}); raise moe.capacity_factor or use a "
                    f"dropless dispatcher (moe.dispatcher='ragged').",
                )
        if "moe/load_cv" in rows[0]:
            cv = np.mean([np.asarray(m["moe/load_cv"], np.float64) for m in rows], axis=0).reshape(
                -1
            )
            for layer, value in enumerate(cv):
                bad = not np.isfinite(value) or value > self.max_load_cv
                self._update(
                    ("load_cv", layer),
                    bad,
                    warnings,
                    step,
                    f"MoE layer {layer}: expert load CV {value:.3g} "
                    f"(> train.max_load_cv={self.max_load_cv}): the router is "
                    f"collapsing onto few experts. {self.remedy}, or lower "
                    f"train.learning_rate.",
                )
        return warnings

    def _update(self, key: tuple, bad: bool, warnings: list[str], step: int, message: str) -> None:
        if bad and key not in self._active:
            self._active.add(key)
            self.counts[key[0]] += 1
            warnings.append(f"router health @ step {step}: {message}")
        elif not bad:
            self._active.discard(key)
