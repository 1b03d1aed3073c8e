"""LoRA-LEGO: several LoRA adapters merged into one by rank-wise clustering.

Zhao et al., 2024, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to
Extremes Through Rank-Wise Clustering" (arXiv 2409.16167, ICLR 2025), section 4:

1. Minimal Semantic Units. The update of adapter n, s_n A_n B_n = sum_i s_n a_i b_i^T, is a
   sum of rank-1 units (column a_i of A [d_in, r], row b_i of B [r, d_out]); the units are
   permutation invariant, and concatenating adapters along the rank axis sums their updates.
   Every unit of every adapter joins one pool, each as the point

       m = [sqrt(s_n) a_i ; sqrt(s_n) b_i]  in R^(d_in + d_out)

   (the adapter's scale s_n = alpha_n / r_n split evenly between the factors, so that adapters
   of different scales or ranks pool together and m_a m_b^T is the unit's weight update).
2. MSU clustering: k-means of the N_units points into k clusters (Lloyd's algorithm:
   assign each point to its nearest centroid in squared Euclidean distance, ties to the lower
   index; move each centroid to the mean of its points; an empty cluster keeps its centroid;
   stop when no assignment changes or after `iters` rounds), the initial centroids k distinct
   points drawn by `numpy.random.default_rng(seed).choice(N_units, k, replace=False)`.
   The merged adapter of rank k has as unit j the centroid c_j: A'[:, j] = c_j[:d_in],
   B'[j, :] = c_j[d_in:].
3. Dual reweighting:
   - parameter reweighting (norm decay: a mean is shorter than the points it averages):
         c_j <- c_j * (1/|C_j| sum_{m in C_j} ||m||) / ||c_j||
   - output reweighting (variance expansion: the output variance of a LoRA grows with its
     rank, and the merged one has rank k instead of the adapters' r): the merged update is
         Delta W' = sqrt(r / k) A' B'
     with r the mean rank of the merged adapters.

Source note: the paper's text could not be read where this was written (no network); the
steps follow its description (MSUs, k-means of the pooled units, centroids as the merged
units, "parameter reweighting" for norm decay and "output reweighting" for variance
expansion) with the two reweightings in the forms above, each switchable off
(`parameter_reweighting`, `output_reweighting`). Check them against section 4 of the paper
before quoting numbers.

What is verified here: tests/lora/test_lego.py equals a float64 NumPy re-implementation of the
three steps to 1e-10, and merging one adapter with k = r returns its units up to permutation.
Each projection of the param trees (every `lora_<param>` pair; each scanned layer and each
routed expert separately) is merged on its own; only plain LoRA pairs (a, b) merge.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from moejax.config_section import ConfigError
from moejax.lora.config import LoRAConfig
from moejax.lora.merge import check_mergeable
from moejax.lora.targets import ADAPTER_PREFIX
from moejax.lora.weights import lora_scale


@dataclasses.dataclass(frozen=True)
class LegoResult:
    """A'[d_in, k], B'[k, d_out] and the scale of the merged update (`scale * A' B'`);
    `labels[u]` is the cluster of pooled unit u (adapter-major, rank-minor order)."""

    a: np.ndarray
    b: np.ndarray
    scale: float
    labels: np.ndarray


def kmeans(points: np.ndarray, k: int, seed: int, iters: int = 100):
    """Lloyd's k-means of `points[n, d]` (float64): (centroids[k, d], labels[n])."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"LoRA-LEGO: k={k} clusters of {n} rank-1 units; pick 1 <= k <= {n}.")
    init = np.random.default_rng(seed).choice(n, size=k, replace=False)
    centroids = points[init].copy()
    labels = None
    for _ in range(iters):
        dist = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        new = np.argmin(dist, axis=1)  # the first index on ties
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centroids[j] = members.mean(axis=0)
    return centroids, labels


def lego_merge_units(
    factors: Sequence[tuple[Any, Any, float]],
    k: int,
    seed: int = 0,
    iters: int = 100,
    parameter_reweighting: bool = True,
    output_reweighting: bool = True,
) -> LegoResult:
    """Merges adapters `[(A_n [d_in, r_n], B_n [r_n, d_out], s_n), ...]` of one projection
    into one of rank k (module docstring); float64 throughout."""
    points, ranks = [], []
    for a, b, s in factors:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConfigError(
                f"LoRA-LEGO: factors of shapes {a.shape} and {b.shape} are not A [d_in, r], "
                f"B [r, d_out]."
            )
        root = math.sqrt(s)
        points.append(np.concatenate([root * a.T, root * b], axis=1))  # [r, d_in + d_out]
        ranks.append(a.shape[1])
    d_in = np.asarray(factors[0][0]).shape[0]
    if len({p.shape[1] for p in points}) != 1:
        raise ConfigError("LoRA-LEGO: the adapters adapt projections of different shapes.")
    pool = np.concatenate(points, axis=0)
    centroids, labels = kmeans(pool, k, seed, iters)
    if parameter_reweighting:
        norms = np.linalg.norm(pool, axis=1)
        for j in range(k):
            members = labels == j
            length = np.linalg.norm(centroids[j])
            if members.any() and length > 0:
                centroids[j] *= norms[members].mean() / length
    scale = math.sqrt(float(np.mean(ranks)) / k) if output_reweighting else 1.0
    return LegoResult(centroids[:, :d_in].T.copy(), centroids[:, d_in:].copy(), scale, labels)


def _pairs(flat: dict) -> list[tuple]:
    keys = []
    for key in flat:
        if len(key) >= 2 and key[-1] == "a" and key[-2].startswith(ADAPTER_PREFIX):
            leaves = {k[-1] for k in flat if k[:-1] == key[:-1]}
            if leaves != {"a", "b"}:
                raise ConfigError(
                    f"adapter {'/'.join(key[:-1])} holds {sorted(leaves)}, not the plain "
                    f"LoRA pair (a, b); LoRA-LEGO merges plain LoRA only."
                )
            keys.append(key[:-1])
    return sorted(keys)


def lego_merge(
    adapters: Sequence[tuple[Any, LoRAConfig]],
    k: int,
    seed: int = 0,
    iters: int = 100,
    parameter_reweighting: bool = True,
    output_reweighting: bool = True,
) -> tuple[dict, LoRAConfig]:
    """LoRA-LEGO of several adapted param trees `[(params, lora_config), ...]` (plain LoRA on
    the same targets of the same base) -> `(params, lora_config)` of one rank-k adapter.

    Every `lora_<param>` pair `a[..., E, d_in, r_n]`, `b[..., E, r_n, d_out]` is merged per
    leading index (scanned layer, expert) by `lego_merge_units`. The returned params hold the
    merged adapters and the first tree's other leaves; the returned config has rank k and
    alpha = scale * k (so `lora_scale` is the output reweighting's sqrt(mean r / k); every
    projection's scale is the same as it only depends on the ranks).
    """
    if not adapters:
        raise ConfigError("LoRA-LEGO: no adapters to merge.")
    for _, cfg in adapters:
        check_mergeable(cfg)
    flats = [traverse_util.flatten_dict(params) for params, _ in adapters]
    pairs = _pairs(flats[0])
    for i, flat in enumerate(flats[1:], 1):
        if _pairs(flat) != pairs:
            raise ConfigError(
                f"LoRA-LEGO: adapter {i} adapts {['/'.join(p) for p in _pairs(flat)]}, "
                f"adapter 0 {['/'.join(p) for p in pairs]}; merge adapters of the same targets."
            )
    scales = [lora_scale(cfg) for _, cfg in adapters]
    out = dict(flats[0])
    scale = None
    for pair in pairs:
        a_all = [np.asarray(flat[pair + ("a",)]) for flat in flats]
        b_all = [np.asarray(flat[pair + ("b",)]) for flat in flats]
        lead = a_all[0].shape[:-2]
        if any(a.shape[:-2] != lead or b.shape[:-2] != lead for a, b in zip(a_all, b_all)):
            raise ConfigError(f"LoRA-LEGO: {'/'.join(pair)} has other leading axes per adapter.")
        new_a = np.zeros(lead + (a_all[0].shape[-2], k), a_all[0].dtype)
        new_b = np.zeros(lead + (k, b_all[0].shape[-1]), b_all[0].dtype)
        for idx in np.ndindex(*lead):
            got = lego_merge_units(
                [(a[idx], b[idx], s) for a, b, s in zip(a_all, b_all, scales)],
                k,
                seed,
                iters,
                parameter_reweighting,
                output_reweighting,
            )
            new_a[idx], new_b[idx], scale = got.a, got.b, got.scale
        out[pair + ("a",)], out[pair + ("b",)] = new_a, new_b
    cfg = adapters[0][1]
    scale = 1.0 if scale is None else scale
    merged = dataclasses.replace(cfg, rank=k, alpha=scale * k, rslora=False, scaling="rank")
    return traverse_util.unflatten_dict(out), merged
