"""Routing-analysis metrics over traces: pure functions from a trace DataFrame to a tidy one.

A trace (`moejax.analysis.trace`) has one row per (token, MoE layer) and at least the
columns `step`, `layer`, `seq`, `segment`, `position`, `token_id`, `target_id`,
`predicted_id`, `source`, `loss`, `experts` (the token's experts at that layer, in the
router's rank order), `weights`, `router_entropy`. Each function below reads the columns it
needs and returns one row per group (step, layer, ...), so results of several runs or
checkpoints concatenate and plot directly. `num_experts` defaults to the trace's
`attrs["num_experts"]` (set by `read_trace`), else the largest expert id + 1. A model whose
MoE layers have their own expert counts (`model.layer_kinds`, a pruned model) records them
in `attrs["layer_num_experts"]` ("64,48,..." by traced MoE layer): `expert_load` and
`load_balance` then count each layer's own experts (its dead ones and its uniform share);
the other functions use the largest count.

Definitions, after OLMoE (Muennighoff et al., 2024, "OLMoE: Open Mixture-of-Experts Language
Models", section 5; allenai/OLMoE scripts/run_moe_analysis.py and run_routing_analysis.py)
and Mixtral (Jiang et al., 2024, "Mixtral of Experts", section 5):

- `expert_load`: each expert's assignments at a layer, as a share of the layer's assignments
  (uniform: 1/E) and per token (uniform: k/E).
- `load_balance`: the coefficient of variation of those counts (population std / mean, as
  `moejax.moe.losses.coefficient_of_variation`), the max load (max share x E; 1 = balanced)
  and the dead experts (no assignment at all).
- `router_saturation` (OLMoE 5.1): for each token, |top-k experts at step s ∩ top-k at the
  final step| / k, averaged over the same tokens, per layer; `top=1` compares first choices.
- `coactivation` (OLMoE 5.2): P(b | a) = the tokens that route to both a and b / those that
  route to a, over every pair of a token's experts (OLMoE's script counts only neighbours in
  the ranked list; here all pairs).
- `domain_specialization` (OLMoE 5.3): each expert's assignments from a source per token of
  that source (uniform: k/E); `domain_mutual_information`: I(source; expert) in bits over
  the assignments, 0 when every source routes alike.
- `vocab_specialization` (OLMoE 5.4): for each token id seen at least `min_count` times, the
  fraction of its occurrences routed to its most frequent expert (an expert in the token's
  set counts, so random routing gives k/E; `top=1` uses first choices only, as OLMoE's
  script: 1/E), for input (`token_id`), target (`target_id`) or predicted (`predicted_id`)
  tokens.
- `layer_transitions`: P(first choice e' at the next MoE layer | e at this one) on the same
  token, and `transition_mutual_information` in bits.
- `consecutive_locality` (Mixtral section 5): over consecutive tokens of one document, the
  fraction with the same first choice (uniform random: 1/E) and with at least one expert in
  common (uniform random: 1 - C(E-k, k) / C(E, k)).
- `experts_vs_loss`: experts per token (top-p routing varies it) and router entropy against
  the token's loss, by loss quantile; `experts_loss_correlation`: Pearson r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

KEY = ("seq", "segment", "position")  # one token of a trace (with `layer`: one row)


def read_trace(path) -> pd.DataFrame:
    """A trace written by `moejax.analysis.trace` with `attrs` from its metadata
    (`num_experts`, `top_k`, `workdir`, ...)."""
    table = pq.read_table(str(path))
    df = table.to_pandas()
    meta = table.schema.metadata or {}
    for key, value in meta.items():
        key = key.decode()
        if key.startswith("moejax."):
            text = value.decode()
            df.attrs[key[len("moejax.") :]] = int(text) if text.lstrip("-").isdigit() else text
    return df


def _num_experts(trace: pd.DataFrame, num_experts: int | None) -> int:
    if num_experts:
        return int(num_experts)
    per_layer = _layer_num_experts(trace)
    if per_layer:
        return max(per_layer)
    if trace.attrs.get("num_experts"):
        return int(trace.attrs["num_experts"])
    flat = _flat_experts(trace, None)[1]
    return int(flat.max()) + 1 if len(flat) else 0


def _layer_num_experts(trace: pd.DataFrame) -> list[int]:
    """Each traced MoE layer's expert count from `attrs["layer_num_experts"]` ([] if absent)."""
    text = str(trace.attrs.get("layer_num_experts", "") or "")
    return [int(x) for x in text.split(",") if x.strip()]


def _flat_experts(trace: pd.DataFrame, top: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(row index of each assignment, expert id), the first `top` of each row (all: None)."""
    lists = [np.asarray(x, np.int64)[:top] for x in trace["experts"].to_numpy()]
    counts = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    rows = np.repeat(np.arange(len(lists)), counts)
    experts = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    return rows, experts


def _membership(trace: pd.DataFrame, num_experts: int, top: int | None) -> np.ndarray:
    """bool[rows, E]: which experts each row's token routes to."""
    rows, experts = _flat_experts(trace, top)
    out = np.zeros((len(trace), num_experts), bool)
    out[rows, experts] = True
    return out


def _groups(trace: pd.DataFrame, by: Sequence[str]):
    """(key tuple, sub-frame) for each group, in sorted key order."""
    for key, part in trace.groupby(list(by), sort=True):
        yield (key if isinstance(key, tuple) else (key,)), part


def expert_load(trace: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """step, layer, expert, assignments, share (of the layer's assignments; uniform 1/E),
    token_share (per token; uniform k/E)."""
    e_all = _num_experts(trace, num_experts)
    per_layer = [] if num_experts else _layer_num_experts(trace)
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        e = per_layer[layer] if layer < len(per_layer) else e_all
        _, experts = _flat_experts(part, None)
        counts = np.bincount(experts, minlength=e)[:e].astype(np.float64)
        total = max(counts.sum(), 1.0)
        for expert in range(e):
            rows.append(
                (
                    step,
                    layer,
                    expert,
                    int(counts[expert]),
                    counts[expert] / total,
                    counts[expert] / max(len(part), 1),
                )
            )
    return pd.DataFrame(
        rows, columns=["step", "layer", "expert", "assignments", "share", "token_share"]
    )


def load_balance(trace: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """step, layer, tokens, load_cv, max_load, dead_experts, dead_fraction."""
    load = expert_load(trace, num_experts)
    tokens = trace.groupby(["step", "layer"]).size()
    rows = []
    for (step, layer), part in load.groupby(["step", "layer"], sort=True):
        counts = part["assignments"].to_numpy(np.float64)
        mean = counts.mean()
        cv = float(counts.std() / mean) if mean > 0 else float("nan")
        dead = int(np.sum(counts == 0))
        rows.append(
            (
                step,
                layer,
                int(tokens[(step, layer)]),
                cv,
                float(part["share"].max() * len(part)),
                dead,
                dead / len(part),
            )
        )
    return pd.DataFrame(
        rows,
        columns=["step", "layer", "tokens", "load_cv", "max_load", "dead_experts", "dead_fraction"],
    )


def router_saturation(
    trace: pd.DataFrame, final_step: int | None = None, top: int | None = None
) -> pd.DataFrame:
    """step, layer, tokens, saturation: per token |S_step ∩ S_final| / |S_final| (the first
    `top` experts of each; None: all), averaged over the tokens both steps traced.
    `final_step` defaults to the last step in the trace (its own saturation is 1)."""
    final_step = int(trace["step"].max()) if final_step is None else final_step
    final = trace[trace["step"] == final_step]
    if final.empty:
        raise ValueError(
            f"the trace has no step {final_step}; its steps: {sorted(trace['step'].unique())}."
        )
    final_sets = {
        key: set(np.asarray(x)[:top].tolist())
        for key, x in zip(
            map(tuple, final[["layer", *KEY]].to_numpy()), final["experts"].to_numpy()
        )
    }
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        ratios = []
        for key, x in zip(map(tuple, part[["layer", *KEY]].to_numpy()), part["experts"]):
            target = final_sets.get(key)
            if target:
                ratios.append(len(set(np.asarray(x)[:top].tolist()) & target) / len(target))
        if ratios:
            rows.append((step, layer, len(ratios), float(np.mean(ratios))))
    return pd.DataFrame(rows, columns=["step", "layer", "tokens", "saturation"])


def coactivation(trace: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """step, layer, expert_a, expert_b, both (tokens routed to a and b), count_a (tokens
    routed to a), p_b_given_a; every ordered pair a != b."""
    e = _num_experts(trace, num_experts)
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        member = _membership(part, e, None).astype(np.float64)
        both = member.T @ member  # [E, E]; the diagonal counts each expert's tokens
        count = np.diag(both)
        for a in range(e):
            for b in range(e):
                if a != b:
                    p = both[a, b] / count[a] if count[a] else float("nan")
                    rows.append((step, layer, a, b, int(both[a, b]), int(count[a]), p))
    return pd.DataFrame(
        rows, columns=["step", "layer", "expert_a", "expert_b", "both", "count_a", "p_b_given_a"]
    )


def coactivation_matrix(coact: pd.DataFrame, step: int, layer: int) -> np.ndarray:
    """The [E, E] matrix of P(b | a) (rows a, columns b; NaN on the diagonal) of one step
    and layer of `coactivation`'s result, for a heatmap."""
    part = coact[(coact["step"] == step) & (coact["layer"] == layer)]
    e = int(max(part["expert_a"].max(), part["expert_b"].max())) + 1
    out = np.full((e, e), np.nan)
    out[part["expert_a"].to_numpy(), part["expert_b"].to_numpy()] = part["p_b_given_a"]
    return out


def _experts_per_token(trace: pd.DataFrame, top: int | None) -> float:
    lengths = [min(len(x), top) if top else len(x) for x in trace["experts"].to_numpy()]
    return float(np.mean(lengths)) if lengths else 0.0


def domain_specialization(
    trace: pd.DataFrame, num_experts: int | None = None, by: str = "source"
) -> pd.DataFrame:
    """step, layer, <by>, expert, assignments, tokens (of that source), token_share
    (assignments / tokens; uniform routing: k/E), baseline (mean experts per token / E)."""
    e = _num_experts(trace, num_experts)
    rows = []
    for (step, layer, source), part in _groups(trace, ["step", "layer", by]):
        _, experts = _flat_experts(part, None)
        counts = np.bincount(experts, minlength=e)[:e]
        baseline = _experts_per_token(part, None) / e
        for expert in range(e):
            rows.append(
                (
                    step,
                    layer,
                    source,
                    expert,
                    int(counts[expert]),
                    len(part),
                    counts[expert] / len(part),
                    baseline,
                )
            )
    return pd.DataFrame(
        rows,
        columns=["step", "layer", by, "expert", "assignments", "tokens", "token_share", "baseline"],
    )


def mutual_information_bits(counts: np.ndarray) -> float:
    """I(X; Y) in bits of the joint counts `counts[x, y]`."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts / total
    px, py = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / (px @ py)[nz])))


def domain_mutual_information(
    trace: pd.DataFrame, num_experts: int | None = None, by: str = "source"
) -> pd.DataFrame:
    """step, layer, mi_bits: I(source; expert) over the assignments (each token's experts
    count once each), 0 when every source routes alike; at most log2(#sources)."""
    spec = domain_specialization(trace, num_experts, by)
    rows = []
    for (step, layer), part in spec.groupby(["step", "layer"], sort=True):
        table = part.pivot(index=by, columns="expert", values="assignments").to_numpy()
        rows.append((step, layer, mutual_information_bits(table)))
    return pd.DataFrame(rows, columns=["step", "layer", "mi_bits"])


def vocab_specialization(
    trace: pd.DataFrame,
    key: str = "token_id",
    min_count: int = 10,
    top: int | None = None,
    num_experts: int | None = None,
) -> pd.DataFrame:
    """step, layer, <key>, count, expert (the id's most frequent expert; ties: the lowest
    id), share (the fraction of its occurrences routed to that expert), baseline (random
    routing: experts per token / E), for the ids with at least `min_count` occurrences.
    `key`: token_id (input), target_id or predicted_id; `top=1`: first choices only."""
    e = _num_experts(trace, num_experts)
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        member = _membership(part, e, top)
        ids = part[key].to_numpy()
        baseline = _experts_per_token(part, top) / e
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        sums = np.add.reduceat(member[order].astype(np.int64), starts, axis=0)  # [ids, E]
        counts = np.diff(np.r_[starts, len(ids)])
        for token, count, per_expert in zip(sorted_ids[starts], counts, sums):
            if count >= min_count:
                best = int(np.argmax(per_expert))
                rows.append(
                    (step, layer, token, int(count), best, per_expert[best] / count, baseline)
                )
    return pd.DataFrame(
        rows, columns=["step", "layer", key, "count", "expert", "share", "baseline"]
    )


def vocab_specialization_summary(
    trace: pd.DataFrame,
    keys: Sequence[str] = ("token_id", "target_id", "predicted_id"),
    min_count: int = 10,
    top: int | None = None,
    num_experts: int | None = None,
) -> pd.DataFrame:
    """step, layer, key, ids, share (mean over the ids), baseline, lift (share / baseline)."""
    rows = []
    for key in keys:
        spec = vocab_specialization(trace, key, min_count, top, num_experts)
        for (step, layer), part in spec.groupby(["step", "layer"], sort=True):
            share, baseline = float(part["share"].mean()), float(part["baseline"].iloc[0])
            rows.append((step, layer, key, len(part), share, baseline, share / baseline))
    return pd.DataFrame(rows, columns=["step", "layer", "key", "ids", "share", "baseline", "lift"])


def _first_choices(trace: pd.DataFrame) -> np.ndarray:
    return np.fromiter(
        (np.asarray(x)[0] for x in trace["experts"].to_numpy()), np.int64, len(trace)
    )


def layer_transitions(trace: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """step, layer_from, layer_to (the next MoE layer), expert_from, expert_to, count,
    p_to_given_from: first choices of the same token at consecutive MoE layers."""
    e = _num_experts(trace, num_experts)
    rows = []
    for step, part in trace.groupby("step", sort=True):
        layers = sorted(part["layer"].unique())
        by_layer = {layer: part[part["layer"] == layer].set_index(list(KEY)) for layer in layers}
        for a, b in zip(layers[:-1], layers[1:]):
            joined = by_layer[a][["experts"]].join(
                by_layer[b][["experts"]], how="inner", lsuffix="_a", rsuffix="_b"
            )
            first_a = _first_choices(joined.rename(columns={"experts_a": "experts"}))
            first_b = _first_choices(joined.rename(columns={"experts_b": "experts"}))
            counts = np.zeros((e, e), np.int64)
            np.add.at(counts, (first_a, first_b), 1)
            totals = counts.sum(axis=1)
            for i in range(e):
                for j in range(e):
                    p = counts[i, j] / totals[i] if totals[i] else float("nan")
                    rows.append((step, a, b, i, j, int(counts[i, j]), p))
    return pd.DataFrame(
        rows,
        columns=[
            "step",
            "layer_from",
            "layer_to",
            "expert_from",
            "expert_to",
            "count",
            "p_to_given_from",
        ],
    )


def transition_mutual_information(
    trace: pd.DataFrame, num_experts: int | None = None
) -> pd.DataFrame:
    """step, layer_from, layer_to, mi_bits: I(first choice here; first choice at the next MoE
    layer), 0 when the next choice does not depend on this one."""
    trans = layer_transitions(trace, num_experts)
    rows = []
    for (step, a, b), part in trans.groupby(["step", "layer_from", "layer_to"], sort=True):
        table = part.pivot(index="expert_from", columns="expert_to", values="count").to_numpy()
        rows.append((step, a, b, mutual_information_bits(table)))
    return pd.DataFrame(rows, columns=["step", "layer_from", "layer_to", "mi_bits"])


def consecutive_locality(trace: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """step, layer, pairs, same_first, any_shared, baseline_same_first (1/E),
    baseline_any_shared (1 - C(E-k, k) / C(E, k), k the mean experts per token rounded):
    over pairs of consecutive tokens of one document (same seq and segment, positions p and
    p + 1)."""
    e = _num_experts(trace, num_experts)
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        part = part.sort_values(list(KEY))
        seq, seg, pos = (part[c].to_numpy() for c in KEY)
        nxt = (seq[1:] == seq[:-1]) & (seg[1:] == seg[:-1]) & (pos[1:] == pos[:-1] + 1)
        member = _membership(part, e, None)
        first = _first_choices(part)
        same = first[1:][nxt] == first[:-1][nxt]
        shared = np.any(member[1:][nxt] & member[:-1][nxt], axis=1)
        k = max(1, round(_experts_per_token(part, None)))
        none_shared = math.comb(e - k, k) / math.comb(e, k) if e >= k else 0.0
        rows.append(
            (
                step,
                layer,
                int(nxt.sum()),
                float(same.mean()) if len(same) else float("nan"),
                float(shared.mean()) if len(shared) else float("nan"),
                1.0 / e,
                1.0 - none_shared,
            )
        )
    return pd.DataFrame(
        rows,
        columns=[
            "step",
            "layer",
            "pairs",
            "same_first",
            "any_shared",
            "baseline_same_first",
            "baseline_any_shared",
        ],
    )


def experts_vs_loss(trace: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """step, layer, bin (loss quantile, 0 = the easiest tokens), tokens, loss, experts (mean
    experts per token), router_entropy (mean)."""
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        loss = part["loss"].to_numpy(np.float64)
        experts = np.fromiter((len(x) for x in part["experts"].to_numpy()), np.float64, len(part))
        entropy = part["router_entropy"].to_numpy(np.float64)
        ranks = np.argsort(np.argsort(loss, kind="stable"), kind="stable")
        which = ranks * bins // max(len(loss), 1)
        for b in range(bins):
            sel = which == b
            if sel.any():
                rows.append(
                    (
                        step,
                        layer,
                        b,
                        int(sel.sum()),
                        float(loss[sel].mean()),
                        float(experts[sel].mean()),
                        float(entropy[sel].mean()),
                    )
                )
    return pd.DataFrame(
        rows, columns=["step", "layer", "bin", "tokens", "loss", "experts", "router_entropy"]
    )


def experts_loss_correlation(trace: pd.DataFrame) -> pd.DataFrame:
    """step, layer, tokens, r: Pearson correlation of experts per token with the loss (NaN
    when either is constant, e.g. top-k routing)."""
    rows = []
    for (step, layer), part in _groups(trace, ["step", "layer"]):
        loss = part["loss"].to_numpy(np.float64)
        experts = np.fromiter((len(x) for x in part["experts"].to_numpy()), np.float64, len(part))
        if len(part) < 2 or loss.std() == 0 or experts.std() == 0:
            r = float("nan")
        else:
            r = float(np.corrcoef(experts, loss)[0, 1])
        rows.append((step, layer, len(part), r))
    return pd.DataFrame(rows, columns=["step", "layer", "tokens", "r"])
