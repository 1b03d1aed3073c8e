"""LoRA-LEGO (`moejax.lora.lego`, Zhao et al., 2024, arXiv 2409.16167): equal to a float64
NumPy re-implementation written with loops (units pooled, k-means from the same initial
centroids, parameter and output reweighting) to 1e-10; one adapter merged with k = r returns
its own units up to permutation; adapter param trees (scanned layers, routed experts) merge
per projection, deterministically for a seed."""

import dataclasses
import math

import numpy as np
import pytest
from flax import traverse_util

from moejax.config_section import ConfigError
from moejax.lora.config import LoRAConfig
from moejax.lora.lego import lego_merge, lego_merge_units
from moejax.lora.weights import lora_scale


def reference(factors, k, seed, iters=100):
    """The paper's three steps, one point and one cluster at a time."""
    units, ranks = [], []
    for a, b, s in factors:
        ranks.append(a.shape[1])
        for i in range(a.shape[1]):
            units.append(np.concatenate([a[:, i] * np.sqrt(s), b[i, :] * np.sqrt(s)]))
    n, d_in = len(units), factors[0][0].shape[0]
    start = np.random.default_rng(seed).choice(n, size=k, replace=False)
    centroids = [units[i].copy() for i in start]
    labels = [-1] * n
    for _ in range(iters):
        new = []
        for u in units:
            best, best_d = 0, None
            for j, c in enumerate(centroids):
                d = float(np.sum((u - c) ** 2))
                if best_d is None or d < best_d:
                    best, best_d = j, d
            new.append(best)
        if new == labels:
            break
        labels = new
        for j in range(k):
            members = [u for u, lab in zip(units, labels) if lab == j]
            if members:
                centroids[j] = np.sum(members, axis=0) / len(members)
    for j in range(k):
        norms = [np.sqrt(np.sum(u**2)) for u, lab in zip(units, labels) if lab == j]
        if norms:
            centroids[j] = (
                centroids[j] * (sum(norms) / len(norms)) / np.sqrt(np.sum(centroids[j] ** 2))
            )
    merged = np.stack(centroids)
    return merged[:, :d_in].T, merged[:, d_in:], np.sqrt(np.mean(ranks) / k), labels


def _adapters(rng, ranks, d_in=6, d_out=5):
    return [
        (rng.normal(size=(d_in, r)), rng.normal(size=(r, d_out)), float(rng.uniform(0.5, 2.0)))
        for r in ranks
    ]


@pytest.mark.parametrize("ranks,k,seed", [((4, 4, 4), 5, 0), ((2, 3, 5), 4, 7), ((3,), 2, 1)])
def test_lego_equals_the_float64_numpy_reference(ranks, k, seed):
    factors = _adapters(np.random.default_rng(seed), ranks)
    got = lego_merge_units(factors, k, seed=seed)
    a, b, scale, labels = reference(factors, k, seed)
    assert got.a.shape == (6, k) and got.b.shape == (k, 5)
    np.testing.assert_allclose(got.a, a, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.b, b, rtol=0, atol=1e-10)
    assert got.labels.tolist() == labels and len(set(labels)) > 1
    assert abs(got.scale - scale) < 1e-12
    # the merged units keep their cluster's mean norm (parameter reweighting)
    pool = np.concatenate([np.concatenate([x.T, y], 1) * np.sqrt(s) for x, y, s in factors])
    for j in set(labels):
        mean = np.linalg.norm(pool[got.labels == j], axis=1).mean()
        assert abs(np.linalg.norm(np.concatenate([got.a[:, j], got.b[j]])) - mean) < 1e-10


def test_one_adapter_with_k_equal_r_returns_its_units():
    a, b, s = _adapters(np.random.default_rng(3), (4,))[0]
    got = lego_merge_units([(a, b, s)], k=4, seed=5)
    assert got.scale == 1.0 and sorted(got.labels.tolist()) == [0, 1, 2, 3]
    # cluster labels[i] holds unit i alone: A'[:, labels[i]] = sqrt(s) a_i
    np.testing.assert_allclose(got.a[:, got.labels], np.sqrt(s) * a, atol=1e-12)
    np.testing.assert_allclose(got.b[got.labels], np.sqrt(s) * b, atol=1e-12)
    np.testing.assert_allclose(got.scale * got.a @ got.b, s * a @ b, atol=1e-12)


def test_param_trees_merge_per_projection_and_layer():
    rng = np.random.default_rng(0)
    cfgs = [
        LoRAConfig(method="lora", rank=3, alpha=6.0),
        LoRAConfig(method="lora", rank=2, alpha=1.0, rslora=True),
    ]

    def tree(r):  # 2 scanned layers; attention wq (E = 1) and 4 routed experts' w_up
        return {
            "layers": {
                "attn": {
                    "wq": np.zeros((2, 6, 2, 3), np.float32),
                    "lora_wq": {
                        "a": rng.normal(size=(2, 1, 6, r)).astype(np.float32),
                        "b": rng.normal(size=(2, 1, r, 6)).astype(np.float32),
                    },
                },
                "experts": {
                    "lora_w_up": {
                        "a": rng.normal(size=(2, 4, 6, r)).astype(np.float32),
                        "b": rng.normal(size=(2, 4, r, 5)).astype(np.float32),
                    }
                },
            }
        }

    trees = [tree(3), tree(2)]
    params, cfg = lego_merge(list(zip(trees, cfgs)), k=3, seed=2)
    assert (cfg.rank, cfg.rslora) == (3, False)
    assert math.isclose(lora_scale(cfg), math.sqrt(2.5 / 3))
    flat = traverse_util.flatten_dict(params, sep="/")
    assert flat["layers/attn/lora_wq/a"].shape == (2, 1, 6, 3)
    assert flat["layers/experts/lora_w_up/b"].shape == (2, 4, 3, 5)
    assert flat["layers/attn/wq"] is trees[0]["layers"]["attn"]["wq"]
    scales = [lora_scale(c) for c in cfgs]
    for layer, expert in [(0, 0), (1, 3)]:
        want = lego_merge_units(
            [
                (
                    t["layers"]["experts"]["lora_w_up"]["a"][layer, expert],
                    t["layers"]["experts"]["lora_w_up"]["b"][layer, expert],
                    s,
                )
                for t, s in zip(trees, scales)
            ],
            k=3,
            seed=2,
        )
        np.testing.assert_allclose(
            flat["layers/experts/lora_w_up/a"][layer, expert], want.a, rtol=1e-6, atol=1e-6
        )
    again, _ = lego_merge(list(zip(trees, cfgs)), k=3, seed=2)
    for key, value in traverse_util.flatten_dict(again, sep="/").items():
        np.testing.assert_array_equal(value, flat[key])  # deterministic for a seed

    with pytest.raises(ConfigError, match="k=9 clusters of 5"):
        lego_merge(list(zip(trees, cfgs)), k=9)
    mixture = dataclasses.replace(cfgs[0], method="moe", num_experts=2)
    with pytest.raises(ConfigError, match="method='moe'"):
        lego_merge([(trees[0], mixture)], k=2)
