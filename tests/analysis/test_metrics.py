"""The routing metrics on hand-built traces with known answers (closed form), and against
brute-force float64 references written with Python sets on random traces."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from moejax.analysis import metrics


def make_trace(rows, num_experts=4):
    """rows: dicts with at least `experts`; the other columns get defaults."""
    defaults = dict(
        step=10,
        layer=0,
        seq=0,
        segment=1,
        position=0,
        token_id=0,
        target_id=0,
        predicted_id=0,
        source="a",
        loss=1.0,
        router_entropy=0.5,
    )
    df = pd.DataFrame([{**defaults, "weights": [1.0] * len(r["experts"]), **r} for r in rows])
    df.attrs["num_experts"] = num_experts
    return df


def random_trace(rng, tokens=60, layers=2, steps=(1, 2), e=6, k=3):
    rows = []
    for step in steps:
        for t in range(tokens):
            for layer in range(layers):
                experts = rng.choice(e, size=k, replace=False).tolist()
                rows.append(
                    dict(
                        step=step,
                        layer=layer,
                        seq=t // 10,
                        segment=1,
                        position=t % 10,
                        token_id=int(rng.integers(4)),
                        target_id=int(rng.integers(4)),
                        source="ab"[t % 2],
                        experts=experts,
                        loss=float(rng.random()),
                    )
                )
    return make_trace(rows, e)


def test_expert_load_and_balance():
    trace = make_trace([{"experts": [0, 1]}, {"experts": [0, 2]}, {"experts": [0, 1]}])
    load = metrics.expert_load(trace)
    assert load["assignments"].tolist() == [3, 2, 1, 0]
    np.testing.assert_allclose(load["share"], [0.5, 1 / 3, 1 / 6, 0.0])
    np.testing.assert_allclose(load["token_share"], [1.0, 2 / 3, 1 / 3, 0.0])
    bal = metrics.load_balance(trace).iloc[0]
    counts = np.array([3, 2, 1, 0], np.float64)
    assert bal["load_cv"] == pytest.approx(counts.std() / counts.mean())
    assert bal["max_load"] == pytest.approx(0.5 * 4)
    assert bal["dead_experts"] == 1 and bal["dead_fraction"] == 0.25 and bal["tokens"] == 3


def test_layers_with_their_own_expert_counts():
    """A pruned model: layer 0 keeps 4 experts, layer 1 only 2. Layer 1's experts are all
    used (none dead, uniform share 1/2); an explicit num_experts overrides the per-layer
    counts."""
    rows = [{"layer": 0, "experts": [0, 1]}, {"layer": 1, "experts": [0, 1]}]
    trace = make_trace(rows + [{"layer": 1, "experts": [1, 0]}])
    trace.attrs["layer_num_experts"] = "4,2"
    bal = metrics.load_balance(trace).set_index("layer")
    assert bal.loc[0, "dead_experts"] == 2 and bal.loc[0, "dead_fraction"] == 0.5
    assert bal.loc[1, "dead_experts"] == 0 and bal.loc[1, "load_cv"] == 0.0
    assert bal.loc[1, "max_load"] == pytest.approx(1.0)
    assert len(metrics.expert_load(trace).query("layer == 1")) == 2
    forced = metrics.load_balance(trace, num_experts=4).set_index("layer")
    assert forced.loc[1, "dead_experts"] == 2


def test_router_saturation_top_k_and_top_1():
    final = [
        {"step": 20, "position": 0, "experts": [0, 1]},
        {"step": 20, "position": 1, "experts": [2, 3]},
    ]
    early = [
        {"step": 10, "position": 0, "experts": [1, 2]},  # 1 of 2 in common
        {"step": 10, "position": 1, "experts": [3, 2]},
    ]  # both, other order
    trace = make_trace(final + early)
    sat = metrics.router_saturation(trace).set_index("step")["saturation"]
    assert sat[10] == pytest.approx(0.75) and sat[20] == 1.0
    top1 = metrics.router_saturation(trace, top=1).set_index("step")["saturation"]
    assert top1[10] == 0.0  # first choices 1 vs 0, 3 vs 2


def test_router_saturation_matches_a_set_reference():
    trace = random_trace(np.random.default_rng(0))
    got = metrics.router_saturation(trace, final_step=2)
    final = {
        (r.layer, r.seq, r.segment, r.position): set(r.experts)
        for r in trace[trace.step == 2].itertuples()
    }
    for (step, layer), part in trace.groupby(["step", "layer"]):
        want = np.mean(
            [
                len(set(r.experts) & final[(r.layer, r.seq, r.segment, r.position)]) / 3
                for r in part.itertuples()
            ]
        )
        row = got[(got.step == step) & (got.layer == layer)].iloc[0]
        assert row["saturation"] == pytest.approx(want, abs=1e-12)


def test_coactivation_counts_every_pair_not_only_neighbours():
    trace = make_trace([{"experts": [0, 1, 2]}, {"experts": [0, 1]}, {"experts": [0, 3]}])
    co = metrics.coactivation(trace).set_index(["expert_a", "expert_b"])["p_b_given_a"]
    assert co[(0, 1)] == pytest.approx(2 / 3)
    assert co[(1, 0)] == 1.0
    assert co[(0, 2)] == pytest.approx(1 / 3)  # not adjacent in the ranked list [0, 1, 2]
    assert co[(1, 2)] == pytest.approx(1 / 2)
    assert co[(2, 3)] == 0.0
    assert math.isnan(metrics.coactivation_matrix(metrics.coactivation(trace), 10, 0)[1, 1])


def test_coactivation_matches_a_pair_count_reference():
    trace = random_trace(np.random.default_rng(1))
    got = metrics.coactivation(trace)
    for (step, layer), part in trace.groupby(["step", "layer"]):
        single, pairs = np.zeros(6), np.zeros((6, 6))
        for r in part.itertuples():
            for a in r.experts:
                single[a] += 1
            for a, b in itertools.permutations(r.experts, 2):
                pairs[a, b] += 1
        mine = got[(got.step == step) & (got.layer == layer)]
        want = pairs[mine.expert_a, mine.expert_b] / single[mine.expert_a]
        np.testing.assert_allclose(mine["p_b_given_a"], want, rtol=0, atol=1e-12)


def test_domain_specialization_and_mutual_information():
    split = make_trace(
        [{"source": "a", "experts": [0]}] * 3 + [{"source": "b", "experts": [1]}] * 3
    )
    spec = metrics.domain_specialization(split).set_index(["source", "expert"])
    assert spec.loc[("a", 0), "token_share"] == 1.0 and spec.loc[("a", 1), "token_share"] == 0.0
    assert spec.loc[("b", 1), "assignments"] == 3 and spec["baseline"].iloc[0] == 0.25
    assert metrics.domain_mutual_information(split)["mi_bits"].iloc[0] == pytest.approx(1.0)
    alike = make_trace([{"source": s, "experts": [e]} for s in "ab" for e in (0, 1)])
    assert metrics.domain_mutual_information(alike)["mi_bits"].iloc[0] == pytest.approx(0.0)


def test_vocab_specialization_with_the_k_over_e_baseline():
    rows = [{"token_id": 7, "experts": [0, 1]}] * 8 + [{"token_id": 7, "experts": [2, 3]}] * 2
    rows += [{"token_id": 9, "experts": [3, 2]}] * 5  # seen fewer than 10 times
    trace = make_trace(rows)
    spec = metrics.vocab_specialization(trace)
    assert spec["token_id"].tolist() == [7]
    row = spec.iloc[0]
    assert (row["count"], row["expert"]) == (10, 0)
    assert row["share"] == pytest.approx(0.8) and row["baseline"] == pytest.approx(2 / 4)
    top1 = metrics.vocab_specialization(trace, top=1, min_count=5).set_index("token_id")
    assert top1.loc[9, "share"] == 1.0 and top1.loc[9, "expert"] == 3
    assert top1.loc[9, "baseline"] == pytest.approx(1 / 4)
    summary = metrics.vocab_specialization_summary(trace, keys=("token_id",))
    assert summary["lift"].iloc[0] == pytest.approx(0.8 / 0.5)


def test_layer_transitions_of_a_deterministic_map():
    rows = []
    for pos, first in enumerate([0, 1, 0, 1]):
        rows.append({"position": pos, "layer": 0, "experts": [first, 2]})
        rows.append({"position": pos, "layer": 1, "experts": [1 - first, 3]})
    trace = make_trace(rows)
    trans = metrics.layer_transitions(trace).set_index(["expert_from", "expert_to"])
    assert trans.loc[(0, 1), "p_to_given_from"] == 1.0
    assert trans.loc[(0, 0), "count"] == 0 and trans.loc[(1, 0), "count"] == 2
    assert math.isnan(trans.loc[(2, 0), "p_to_given_from"])  # never a first choice
    mi = metrics.transition_mutual_information(trace)["mi_bits"].iloc[0]
    assert mi == pytest.approx(1.0)


def test_consecutive_locality_within_documents_only():
    firsts = [0, 0, 1, 1, 1]
    rows = [{"position": p, "experts": [f, 3]} for p, f in enumerate(firsts)]
    rows += [{"segment": 2, "position": 0, "experts": [1, 2]}]  # next document: no pair
    trace = make_trace(rows)
    loc = metrics.consecutive_locality(trace).iloc[0]
    assert loc["pairs"] == 4
    assert loc["same_first"] == pytest.approx(3 / 4)
    assert loc["any_shared"] == 1.0  # expert 3 every time
    assert loc["baseline_same_first"] == 0.25
    assert loc["baseline_any_shared"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)


def test_experts_against_loss():
    trace = make_trace(
        [{"loss": float(v), "experts": list(range(n))} for v, n in [(1, 1), (2, 1), (3, 3), (4, 3)]]
    )
    bins = metrics.experts_vs_loss(trace, bins=2)
    assert bins["loss"].tolist() == [1.5, 3.5] and bins["experts"].tolist() == [1.0, 3.0]
    r = metrics.experts_loss_correlation(trace)["r"].iloc[0]
    assert r == pytest.approx(4 / math.sqrt(20))  # cov 4 / sqrt(4 * 5), by hand
    fixed = make_trace([{"loss": float(v), "experts": [0, 1]} for v in range(4)])
    assert math.isnan(metrics.experts_loss_correlation(fixed)["r"].iloc[0])
