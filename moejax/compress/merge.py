"""Sub-MoE expert merging (Li et al. 2025, "Sub-MoE: Efficient Mixture-of-Expert LLMs
Compression via Subspace Expert Merging", arXiv 2506.23266): each MoE layer's E experts
become `keep` merged experts.

1. Adaptive expert clustering: the experts are grouped by K-means on the cosine similarity
   of their outputs on the same calibration inputs (`moejax.compress.calibrate`'s recorded
   FFN inputs h_t): expert e's feature is its per-token unit outputs E_e(h_t) / ||E_e(h_t)||
   over the N inputs, scaled by 1/sqrt(N), so two features' dot product is the mean token
   cosine. The centres start at the `keep` most frequently chosen experts; assignment and
   centroid steps repeat until the clusters stop changing (an emptied cluster takes the
   member least similar to its own centre from the largest cluster).
2. Subspace expert merging, per projection (W_gate, W_up, W_down) of a cluster of n experts
   with activation frequencies f_i (assignment counts, normalised; uniform if all zero):
   the experts' matrices in the [out, in] layout side by side, [W_1 ... W_n] = U S [V_1^T
   ... V_n^T] (one joint SVD: U, the output subspace, is shared; V_i is expert i's part of
   the right singular vectors), truncated to rank r; the merged expert is
   W = U_r S_r (sum_i f_i V_i,r)^T (`subspace_merge`). At full rank this is the
   frequency-weighted average sum_i f_i W_i; below it, each expert's component outside the
   cluster's shared top-r output subspace is dropped before averaging. A cluster of one
   expert is kept unchanged.
3. The router: the merged expert's router column (and DeepSeek-V3's selection bias) is the
   frequency-weighted average of its members'; the layer's top-k becomes min(k, keep) unless
   given.

What was verified: the two stages, the joint SVD of concatenated expert weights with a shared
U and expert-specific V, frequency-based merging of the V matrices and reconstruction from
the merged V, from the paper's abstract (the full text was not reachable, nor its code,
lliai/MoERazor). Not verified, and chosen here: the concatenation axis (the output space is
shared), K-means' initialisation, the treatment of singleton clusters, and the router
remapping. Merging identical experts (with identical router columns) changes nothing: the
joint SVD of [W, ..., W] returns W for any frequencies and rank >= rank(W).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from moejax.compress.calibrate import Calibration, expert_weights, swiglu
from moejax.compress.edit import LayerEdit, apply_edits
from moejax.compress.layers import unstack
from moejax.compress.prune import parse_keep
from moejax.config_section import ConfigError
from moejax.nn.collections import ROUTER_BIAS

PROJECTIONS = ("w_gate", "w_up", "w_down")  # stored [E, in, out]


@dataclasses.dataclass
class MergePlan:
    """One MoE layer's merge: the member ids of each merged expert, the experts' activation
    frequencies `[E]`, the rank (a fraction of full rank if float, else a count) and the
    layer's new top-k."""

    clusters: list[np.ndarray]
    frequencies: np.ndarray
    rank: float | int = 1.0
    top_k: int = 0


def parse_rank(text: str | float | int) -> float | int:
    """`--rank`: a fraction in (0, 1] written with a point (0.5, 1.0) or a count (16)."""
    s = str(text)
    try:
        value = float(s)
    except ValueError:
        value = -1.0
    if "." in s and 0 < value <= 1:
        return value
    if "." not in s and value >= 1:
        return int(value)
    raise ConfigError(f"--rank={text!r}: a fraction in (0, 1] (0.5, 1.0) or a count >= 1.")


def resolve_rank(rank: float | int, full: int) -> int:
    if isinstance(rank, float):
        return max(1, min(full, math.ceil(rank * full - 1e-9)))
    return max(1, min(full, int(rank)))


def subspace_merge(ws_out_in, freqs, rank: float | int = 1.0):
    """The Sub-MoE merge of n matrices `ws_out_in` [n, out, in] with weights `freqs` [n]
    (module docstring, step 2), float32 in JAX: [out, in]."""
    ws = jnp.asarray(ws_out_in, jnp.float32)
    n, out, inp = ws.shape
    f = jnp.asarray(freqs, jnp.float32)
    f = f / jnp.sum(f)
    joint = jnp.concatenate(list(ws), axis=1)  # [out, n * in] = U S [V_1^T ... V_n^T]
    u, s, vt = jnp.linalg.svd(joint, full_matrices=False)
    r = resolve_rank(rank, min(out, n * inp))
    v_parts = vt[:r].reshape(r, n, inp)  # V_i,r^T = v_parts[:, i]
    merged_vt = jnp.einsum("i,rin->rn", f, v_parts)
    return (u[:, :r] * s[:r]) @ merged_vt


def expert_features(w: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """[E, N * d]: each expert's unit outputs on `inputs` [N, d], over sqrt(N)."""
    feats = []
    for e in range(w["w_gate"].shape[0]):
        out = swiglu(w, e, inputs).astype(np.float64)
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        feats.append(out.ravel() / math.sqrt(max(len(inputs), 1)))
    return np.stack(feats)


def cluster_experts(features: np.ndarray, frequencies: np.ndarray, keep: int) -> list[np.ndarray]:
    """K-means on the cosine of `features` [E, D] into `keep` clusters (module docstring,
    step 1); the clusters' member ids, ordered by their smallest id."""
    e = len(features)
    if not 1 <= keep <= e:
        raise ConfigError(f"cannot merge {e} experts into {keep}: keep between 1 and {e}.")
    unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    seeds = np.argsort(-np.asarray(frequencies, np.float64), kind="stable")[:keep]
    centres = unit[seeds]
    assign = None
    for _ in range(100):
        sim = unit @ centres.T
        new = np.argmax(sim, axis=1)
        new[seeds] = np.arange(keep) if assign is None else new[seeds]
        for c in range(keep):  # an empty cluster takes the worst-fitting member of the largest
            if not np.any(new == c):
                big = np.argmax(np.bincount(new, minlength=keep))
                members = np.flatnonzero(new == big)
                new[members[np.argmin(sim[members, big])]] = c
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for c in range(keep):
            mean = unit[assign == c].mean(axis=0)
            centres[c] = mean / max(np.linalg.norm(mean), 1e-12)
    clusters = [np.flatnonzero(assign == c) for c in range(keep)]
    return sorted(clusters, key=lambda c: int(c[0]))


def plan_merge(
    model, variables, cal: Calibration, keep, rank: str | float | int = 1.0, top_k: int = 0
) -> dict[int, MergePlan]:
    """{model layer: MergePlan} from the calibration: `keep` merged experts per MoE layer
    (as `moejax.compress.prune.parse_keep` reads it), `rank` (`parse_rank`), `top_k`
    (0: min(k, keep))."""
    rank = parse_rank(rank)
    if model.moe.n_group > 1:
        raise ConfigError(
            f"moe.n_group={model.moe.n_group}: group-limited routing scores groups of "
            f"consecutive experts, which merging across groups would break; merge supports "
            f"n_group=1 only (prune keeps the groups equal)."
        )
    weights = expert_weights(variables, model.model)
    counts = parse_keep(keep, [c.num_experts for c in cal.layers])
    plans = {}
    for c, n in zip(cal.layers, counts):
        if not len(c.inputs):
            raise ConfigError(f"layer {c.model_layer}: the calibration recorded no inputs.")
        feats = expert_features(weights[c.model_layer], c.inputs)
        clusters = cluster_experts(feats, c.counts, n)
        plans[c.model_layer] = MergePlan(clusters, np.asarray(c.counts, np.float64), rank, top_k)
    return plans


def _weights_of(freqs: np.ndarray) -> np.ndarray:
    freqs = np.asarray(freqs, np.float64)
    return freqs / freqs.sum() if freqs.sum() > 0 else np.full(len(freqs), 1.0 / len(freqs))


def merge(model, variables, plans: dict[int, MergePlan]):
    """(merged model, its variables) for `plans` {model layer: MergePlan}."""
    m = model.model
    params, _ = unstack(variables["params"], m)
    biases = unstack(variables[ROUTER_BIAS], m)[0] if ROUTER_BIAS in variables else None
    edits = {}
    for i, plan in plans.items():
        experts = {k: np.asarray(v) for k, v in params[i]["moe"]["experts"].items()}
        e = experts["w_gate"].shape[0]
        members = np.concatenate(plan.clusters) if plan.clusters else np.array([], np.int64)
        if sorted(members.tolist()) != list(range(e)):
            raise ConfigError(
                f"layer {i}: the clusters {[c.tolist() for c in plan.clusters]} must hold "
                f"every expert 0..{e - 1} exactly once."
            )
        kernel = np.asarray(params[i]["moe"]["router"]["kernel"])
        bias = None
        if biases is not None and biases[i] is not None:
            bias = np.asarray(biases[i]["moe"]["router"]["bias"], np.float64)
        new = {name: [] for name in PROJECTIONS}
        columns, new_bias = [], []
        for ids in plan.clusters:
            f = _weights_of(plan.frequencies[ids])
            for name in PROJECTIONS:
                w = experts[name][ids]  # [n, in, out]
                if len(ids) == 1:
                    new[name].append(w[0])
                else:
                    merged = subspace_merge(np.swapaxes(w, 1, 2), f, plan.rank)
                    new[name].append(np.asarray(merged).T.astype(w.dtype))
            columns.append(np.tensordot(kernel[..., ids], f, axes=([-1], [0])))
            if bias is not None:
                new_bias.append(float(bias[ids] @ f))
        k = next(kind.top_k for j, kind in enumerate(m.layer_layout) if j == i) or model.moe.top_k
        if plan.top_k > len(plan.clusters):
            raise ConfigError(
                f"--top_k={plan.top_k} is more than the {len(plan.clusters)} merged experts."
            )
        edits[i] = LayerEdit(
            experts={name: np.stack(ws) for name, ws in new.items()},
            router_kernel=np.stack(columns, axis=-1).astype(kernel.dtype),
            top_k=plan.top_k or min(k, len(plan.clusters)),
            router_bias=None if bias is None else np.asarray(new_bias, np.float32),
        )
    return apply_edits(model, variables, edits)
