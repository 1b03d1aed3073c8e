"""`experiments/fssdp_sim.py` (Hecate's FSDP / EP / FSSDP comparison at pod scale) against a
hand-computed 2-device case, the heterogeneous layout rule, and the bytes read from the
TPU-compiled sparse all-gather (`experiments/results/fssdp/compiled_bytes_v5p_P*.json`)."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from testing_utils import REPO

_spec = importlib.util.spec_from_file_location("fssdp_sim", REPO / "experiments/fssdp_sim.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules["fssdp_sim"] = sim  # dataclasses look their module up
_spec.loader.exec_module(sim)


def test_two_devices_by_hand():
    # W = 3 bytes per expert, A = 1 byte per row, 4 tokens per device, k = 1; bandwidth 1 B/s,
    # no latency, compute 1 s per assignment (18 d f / peak = 1).
    shape = sim.Shape(d=1, f=1, k=1, tokens=4, weight_bytes=1, act_bytes=1)
    link = sim.Link(1.0, 0.0)
    loads = np.asarray([[6.0, 1.0, 1.0, 0.0]])
    res = sim.simulate(loads, 2, shape, link, 1, 1, 0, 4, 18.0, 1.0)
    # EP: device 0 owns e0, e1 (7 rows), device 1 e2, e3 (1 row). Each exchange: a device
    # sends 4 rows, half off-device (2); device 0 receives 7 / 2 = 3.5: 4 x 3.5 = 14 s.
    ep = res["ep"]
    assert ep["token_bytes"] == 14 and ep["time_tokens"] == 14 and ep["time_compute"] == 7
    assert ep["device_tokens_max_over_mean"] == pytest.approx(7 / 4)
    # FSSDP: e0 is replicated on device 1 (1 + 3 < 7); then e2 -> device 0 would not lower
    # the straggler (4 + 0.5 > 4): tokens 4 / 4. Weights: device 1 receives e0 (3 B)
    # forward, device 0 its gradient backward: 3 B received per device, within the compiled
    # bound (S + R) W = 6 B; each direction takes 3 s.
    fs = res["fssdp"]
    assert fs["device_tokens_max_over_mean"] == 1.0
    assert fs["weight_bytes"] == 3 and sim.fssdp_weight_bound(1, 1, shape.expert_set) == 6
    assert fs["time_weights"] == 6 and fs["time_tokens"] == 8 and fs["time_compute"] == 4
    assert ep["time"] / fs["time"] == pytest.approx(21 / 18)
    # FSDP: all-gather + reduce-scatter of E W (P - 1) / P = 6 B each; balanced compute.
    fsdp = res["fsdp"]
    assert fsdp["weight_bytes"] == 12 and fsdp["time"] == 12 + 4
    row = {"skew": 0.0, "P": 2, "E": 4, "strategies": res, "ep_over_fssdp": 21 / 18}
    row["ep_over_fssdp_het"] = ep["time"] / res["fssdp_het"]["time"]
    table = sim.markdown({"rows": [row]}).splitlines()
    assert len(table) == 3 and "| 1.17 |" in table[2] and "| 1.75 |" in table[2]


def test_heterogeneous_layout_gives_the_hot_expert_a_device_of_its_own():
    # Largest first to the least-loaded device with room (3 experts per device at most):
    # e0 -> d0; e1, e2, e3 -> d1, d2, d3 (10 each); e4 -> d1, e5 -> d2 (20); e6, e7 -> d3.
    load = np.asarray([40.0, 10, 10, 10, 10, 10, 5, 5])
    owner = sim.balanced_owner(load, 4, 3)
    np.testing.assert_array_equal(owner, [0, 1, 2, 3, 1, 2, 3, 3])
    np.testing.assert_array_equal(np.bincount(owner, weights=load), [40, 20, 20, 20])
    # With 2 per device d3 is full after e6: e7 goes to d0, the only device with room.
    np.testing.assert_array_equal(sim.balanced_owner(load, 4, 2), [0, 1, 2, 3, 1, 2, 3, 0])


def test_simulated_weight_traffic_stays_within_the_compiled_bound():
    shape = sim.Shape(d=8, f=8, k=2, tokens=64)
    loads = sim.zipf_loads(4, 16, 64 * 2 * 8, 1.2, 1, seed=0)
    res = sim.simulate(loads, 8, shape, sim.LINKS["ici"], 2, 4, 2, 4, 1e12, 7.0)
    assert 0 < res["fssdp"]["weight_bytes"] <= sim.fssdp_weight_bound(2, 4, shape.expert_set)
    assert res["fssdp"]["device_tokens_max_over_mean"] < res["ep"]["device_tokens_max_over_mean"]


def test_closed_form_matches_the_tpu_compiled_bytes():
    files = sorted((REPO / "experiments/results/fssdp").glob("compiled_bytes_v5p_P*.json"))
    assert files, "run experiments/fssdp_bytes.py (see experiments/README.md)"
    for path in files:
        for row in json.loads(path.read_text())["rows"]:
            bound = sim.fssdp_weight_bound(row["S"], row["R"], row["expert_set_bytes"])
            assert row["ragged"]["weight_bytes"] == bound, (path.name, row["P"])
            assert (
                row["padded"]["weight_bytes"] == 2 * row["P"] * row["S"] * row["expert_set_bytes"]
            )


def test_recorded_loads_from_metrics_jsonl(tmp_path):
    # The router's per-expert fractions of each logged step, scaled to the step's assignments.
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "train/moe/load/layer0": [0.5, 0.25, 0.125, 0.125]}, {"step": 2}]
    rows.append({"step": 3, "train/moe/load/layer0": [1.0, 1.0, 1.0, 1.0]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    np.testing.assert_array_equal(sim.metrics_loads(path, 0, 16), [[8, 4, 2, 2], [4, 4, 4, 4]])
