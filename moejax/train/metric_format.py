"""Step and evaluation metrics as the training loop writes and prints them.

`flatten_metrics` turns per-MoE-layer arrays into one named entry per layer plus the layer
mean; `interval_metrics` reduces the fetched metrics of one logging interval to the row the
loop writes; `eval_line` is the console line of an evaluation result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def flatten_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-MoE-layer arrays [n_layers, ...] -> one entry per layer plus the layer mean."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name.startswith("moe/") and value.ndim >= 1:
            for i, v in enumerate(value):
                out[f"{prefix}{name}/layer{i}"] = v
            if value.ndim == 1:
                out[f"{prefix}{name}"] = float(value.mean())
        else:
            out[f"{prefix}{name}"] = value
    return out


def interval_metrics(fetched: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `train/` row of a logging interval from its steps' fetched metrics: the latest
    step's metrics, the loss averaged over the interval's finite steps (NaN when none was),
    the number of non-finite steps and the learning rate."""
    last = fetched[-1]
    out = flatten_metrics(
        "train/",
        {k: v for k, v in last.items() if k not in ("loss", "learning_rate", "nonfinite")},
    )
    losses = np.array([float(m["loss"]) for m in fetched])
    bad = np.array([float(m["nonfinite"]) > 0 for m in fetched])
    out["train/loss"] = float(np.mean(losses[~bad])) if (~bad).any() else math.nan
    out["train/nonfinite_steps"] = float(bad.sum())
    out["train/lr"] = float(last.get("learning_rate", 0.0))
    return out


def _routing_summary(result: dict[str, Any]) -> str:
    """Experts per token (when it varies by design, e.g. top-p) and routing stability."""
    parts = []
    if "eval/moe/experts_per_token" in result:
        parts.append(f"experts/token {float(result['eval/moe/experts_per_token']):.2f}")
    if "eval/moe/top1_changed" in result:
        parts.append(f"top-1 changed {100 * float(result['eval/moe/top1_changed']):.1f}%")
    return ("; " + ", ".join(parts)) if parts else ""


def eval_line(step: int, result: dict[str, Any]) -> str:
    """The console line of an evaluation at `step`: loss, bits per byte, loss per domain and
    the routing summary."""
    return (
        f"eval @ {step}: loss {result['eval/loss']:.4f} "
        f"({result['eval/bits_per_byte']:.3f} bits/byte) "
        + " ".join(
            f"{key[len('eval/loss/') :]}={value:.3f}"
            for key, value in result.items()
            if key.startswith("eval/loss/")
        )
        + _routing_summary(result)
    )
