"""Expert pruning: keep the most important experts of every MoE layer, drop the rest.

    cal = calibrate(model, variables, batches)
    keep = select(cal, "easy_ep", 6, n_group=model.moe.n_group)   # {model layer: ids}
    model2, variables2 = prune(model, variables, keep)

Importance per expert (`IMPORTANCE`, from `moejax.compress.calibrate`):

- `frequency`: how often the router chose it (assignment count);
- `gate_mass`: the sum of its combine weights;
- `output_norm`: EASY-EP's output-aware importance alone, sum of g ||E_e(h)||;
- `easy_ep`: EASY-EP (Dong et al. 2025; definitions checked against RUCAIBox/EASYEP, see
  `moejax.compress.calibrate`): the output-aware importance weighted by each token's
  expert-level contribution max(1 - cos(x, x + r), 0), over a few domain demonstrations.

A pruned layer keeps its experts' weights and router columns in their original order
(`router/kernel[..., keep]`, the `router_bias` of DeepSeek-V3's `sigmoid_bias` likewise),
its shared experts and their gate, and its top-k, lowered to the number of experts kept if
fewer. Ties in importance keep the lower id. With `moe.n_group` > 1 (group-limited routing)
each group keeps the same number of experts, its most important ones, so the groups stay
equal (`keep` must then be a multiple of n_group).

What stays exact: the logits of a token none of whose layers routed to a dropped expert are
unchanged (up to float rounding) when the selection rule's weights of the kept experts do
not depend on the dropped ones: `softmax_topk` with `renormalize` (the softmax denominator
cancels), `sigmoid_bias` (per-expert sigmoids; with `renormalize` over the chosen ones). With
`renormalize=False` softmax weights (GShard, DeepSeekMoE, Qwen2-MoE's norm_topk_prob=False)
the dropped experts' probability mass leaves the denominator, so every weight grows a
little; top-p and group scores also see the missing experts.
"""

from __future__ import annotations

import numpy as np

from moejax.compress.calibrate import Calibration, expert_weights
from moejax.compress.edit import LayerEdit, apply_edits
from moejax.compress.layers import unstack
from moejax.config_section import ConfigError
from moejax.nn.collections import ROUTER_BIAS

IMPORTANCE = {
    "frequency": "counts",
    "gate_mass": "gate_mass",
    "output_norm": "weighted_norm",
    "easy_ep": "easy_ep",
}


def importance(cal: Calibration, method: str) -> list[np.ndarray]:
    """Each MoE layer's importance `[E]` by `method` (a key of `IMPORTANCE`)."""
    if method not in IMPORTANCE:
        raise ConfigError(f"--method={method!r}: one of {sorted(IMPORTANCE)}.")
    return [np.asarray(getattr(c, IMPORTANCE[method]), np.float64) for c in cal.layers]


def top_experts(scores: np.ndarray, keep: int, n_group: int = 1) -> np.ndarray:
    """The ids (ascending) of the `keep` highest `scores`, ties to the lower id; with
    `n_group` > 1, keep / n_group per group of consecutive experts."""
    e = len(scores)
    if not 1 <= keep <= e:
        raise ConfigError(f"cannot keep {keep} of {e} experts: keep between 1 and {e}.")
    if n_group > 1:
        if keep % n_group:
            raise ConfigError(
                f"moe.n_group={n_group}: each group keeps the same number of experts, so "
                f"keep={keep} must be a multiple of {n_group}."
            )
        size = e // n_group
        return np.concatenate(
            [
                g * size + top_experts(scores[g * size : (g + 1) * size], keep // n_group)
                for g in range(n_group)
            ]
        )
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.sort(order[:keep])


def parse_keep(text: str | int | float, experts: list[int]) -> list[int]:
    """`--keep`: a count (every layer), a fraction in (0, 1) of each layer's experts
    (rounded, at least 1), or one count per MoE layer (comma-separated)."""
    parts = [p for p in str(text).split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or (len(values) != 1 and len(values) != len(experts)):
        raise ConfigError(
            f"--keep={text!r}: a count, a fraction in (0, 1), or one count per MoE layer "
            f"({len(experts)} layers of {experts} experts)."
        )
    if len(values) == 1:
        values = values * len(experts)
    out = []
    for v, e in zip(values, experts):
        out.append(max(1, round(v * e)) if 0 < v < 1 else int(v))
        if out[-1] != v and not 0 < v < 1:
            raise ConfigError(f"--keep={text!r}: {v} is neither a whole count nor a fraction.")
    return out


def select(cal: Calibration, method: str, keep, n_group: int = 1) -> dict[int, np.ndarray]:
    """{model layer: the expert ids to keep} by `method`'s importance; `keep` as
    `parse_keep` reads it."""
    scores = importance(cal, method)
    counts = parse_keep(keep, [len(s) for s in scores])
    return {
        c.model_layer: top_experts(s, n, n_group) for c, s, n in zip(cal.layers, scores, counts)
    }


def prune(model, variables, keep: dict[int, np.ndarray]):
    """(pruned model, its variables): MoE layer `i` keeps the experts `keep[i]`."""
    m = model.model
    weights = expert_weights(variables, m)
    params, _ = unstack(variables["params"], m)
    biases = unstack(variables[ROUTER_BIAS], m)[0] if ROUTER_BIAS in variables else None
    edits = {}
    for i, ids in keep.items():
        ids = np.asarray(ids, np.int64)
        e = weights[i]["w_gate"].shape[0]
        if len(set(ids.tolist())) != len(ids) or ids.min() < 0 or ids.max() >= e:
            raise ConfigError(f"layer {i}: expert ids {ids.tolist()} are not distinct ids < {e}.")
        experts = params[i]["moe"]["experts"]
        kernel = np.asarray(params[i]["moe"]["router"]["kernel"])
        k = next(kind.top_k for j, kind in enumerate(m.layer_layout) if j == i) or model.moe.top_k
        bias = None
        if biases is not None and biases[i] is not None:
            bias = np.asarray(biases[i]["moe"]["router"]["bias"])[ids]
        edits[i] = LayerEdit(
            experts={name: np.asarray(w)[ids] for name, w in experts.items()},
            router_kernel=kernel[..., ids],
            top_k=min(k, len(ids)),
            router_bias=bias,
        )
    return apply_edits(model, variables, edits)
