"""Expert usage statistics of one MoE layer from its routing: assignment counts per expert
(`count_assignments`, over the slots with a nonzero combine weight of real tokens) and their
summary (`usage_statistics`), in the definitions of `moejax.analysis.metrics` (OLMoE,
Muennighoff et al., 2024, section 5): each expert's share of the layer's assignments, the
coefficient of variation of the counts (population std / mean), the max load (max share x E;
1 = balanced), the dead experts (no assignment) and the entropy of the shares in bits
(log2 E = balanced)."""

from __future__ import annotations

import numpy as np


def count_assignments(
    expert_ids: np.ndarray, weights: np.ndarray, real: np.ndarray, num_experts: int
) -> np.ndarray:
    """int64[E]: how often each expert was chosen, `expert_ids` / `weights` [..., k] and
    `real` [...] (bool: a token the model processed, not padding). A slot of weight 0 is
    unused (padding, top-p's empty slots, the padded k of a smaller layer)."""
    used = (np.asarray(weights) > 0) & np.asarray(real, bool)[..., None]
    return np.bincount(np.asarray(expert_ids)[used].ravel(), minlength=num_experts)[
        :num_experts
    ].astype(np.int64)


def usage_statistics(counts: np.ndarray) -> dict:
    """The summary of one layer's `counts[E]` (module docstring)."""
    counts = np.asarray(counts, np.float64)
    e, total = len(counts), float(counts.sum())
    share = counts / total if total else np.zeros(e)
    mean = counts.mean() if e else 0.0
    nz = share[share > 0]
    return {
        "num_experts": e,
        "assignments": int(total),
        "share": share.tolist(),
        "load_cv": float(counts.std() / mean) if mean else float("nan"),
        "max_load": float(share.max() * e) if total else float("nan"),
        "dead_experts": int(np.sum(counts == 0)),
        "entropy_bits": float(-(nz * np.log2(nz)).sum()),
    }
