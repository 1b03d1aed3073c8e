"""Sub-MoE merging (`moejax.compress.merge`): the subspace merge equals a float64 NumPy
joint SVD (shared U, per-expert V, frequency-weighted V, rank-r reconstruction), reduces to
the frequency-weighted average at full rank and returns W for identical experts; clustering
pairs up identical experts, and merging identical experts (weights and router columns) of a
model loses nothing."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from compress_models import logits_and_routing, tiny_batch, tiny_model
from testing_utils import rel_err

from moejax.compress.calibrate import calibrate, capture_fn
from moejax.compress.merge import merge, parse_rank, plan_merge, subspace_merge
from moejax.config_section import ConfigError


def reference_merge(ws, freqs, r):
    """Float64: [W_1 ... W_n] = U S [V_1^T ... V_n^T]; U_r S_r (sum_i f_i V_i,r)^T."""
    ws = np.asarray(ws, np.float64)
    n, out, inp = ws.shape
    u, s, vt = np.linalg.svd(np.concatenate(list(ws), axis=1), full_matrices=False)
    f = np.asarray(freqs, np.float64) / np.sum(freqs)
    v_merged = sum(f[i] * vt[:r, i * inp : (i + 1) * inp] for i in range(n))
    return u[:, :r] @ np.diag(s[:r]) @ v_merged


def test_subspace_merge_equals_a_float64_joint_svd():
    rng = np.random.default_rng(0)
    ws = rng.normal(size=(3, 6, 5)).astype(np.float32)
    freqs = np.array([5.0, 1.0, 2.0])
    for rank, r in ((4, 4), (0.5, 3), (1.0, 6)):
        got = np.asarray(subspace_merge(ws, freqs, rank))
        assert rel_err(got, reference_merge(ws, freqs, r)) < 1e-5, rank
    full = np.asarray(subspace_merge(ws, freqs, 1.0))
    assert rel_err(full, np.tensordot(freqs / 8, ws.astype(np.float64), 1)) < 1e-5
    low = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5))  # rank 2
    same = np.stack([low, low, low]).astype(np.float32)
    assert rel_err(np.asarray(subspace_merge(same, freqs, 2)), low) < 1e-5
    assert parse_rank("0.5") == 0.5 and parse_rank("8") == 8
    with pytest.raises(ConfigError, match="--rank"):
        parse_rank("1.5")
    grouped = SimpleNamespace(moe=SimpleNamespace(n_group=2))
    with pytest.raises(ConfigError, match="n_group=2: group-limited routing"):
        plan_merge(grouped, None, None, 2)


def duplicated(variables):
    """Every MoE layer's experts 1 := 0 and 3 := 2 (weights and router columns)."""
    moe = variables["params"]["moe_layers"]["moe"]
    for tree in (moe["experts"], moe["router"]):
        for name, w in tree.items():
            w = np.asarray(w).copy()
            axis = w.ndim - 1 if name == "kernel" else 1
            src = np.take(w, [0, 0, 2, 2], axis=axis)
            tree[name] = src
    return variables


def test_merging_identical_experts_loses_nothing():
    """E=4, top-2, identical pairs: top-2 always picks one whole pair, so the merged model
    (2 experts, top-1) computes the same function."""
    model, variables = tiny_model("moe,moe", num_experts=4, top_k=2)
    variables = duplicated(variables)
    batch = tiny_batch(2)
    capture = capture_fn(model)
    cal = calibrate(model, variables, [batch], capture=capture)
    plans = plan_merge(model, variables, cal, 2, rank=1.0, top_k=1)
    assert [[c.tolist() for c in p.clusters] for p in plans.values()] == [[[0, 1], [2, 3]]] * 2
    merged, new_vars = merge(model, variables, plans)
    assert (merged.moe.num_experts, merged.moe.top_k) == (2, 1)
    want = np.asarray(jax.device_get(capture(variables, batch))[3])
    assert np.allclose(logits_and_routing(merged, new_vars, batch)[0], want, rtol=1e-5, atol=1e-5)
