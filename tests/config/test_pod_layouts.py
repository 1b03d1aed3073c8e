"""Pod layouts (moejax/config/pod_layout.py): every `size=pod` config, on every topology it
names, is a valid config for that many chips (validated without compiling), and
experiments/pod_table.py turns a report into the README row.

Whether each layout fits its chips' HBM is a real XLA:TPU compile of minutes per row
(experiments/pod_table.py, the README table); the slow test below re-checks the default
layout of DeepSeekMoE."""

import math

import pytest
from testing_utils import REPO, load_config_module

from moejax.config.files import load_config_file
from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.sharding.topology import parse_topology

pod_table = load_config_file(REPO / "experiments" / "pod_table.py")

CASES = [(row, topology) for row in pod_table.ROWS for topology in pod_table.topologies(row)]


@pytest.mark.parametrize("row, topology", CASES)
def test_every_pod_layout_is_a_valid_config_for_its_chips(row, topology):
    path, arg, _ = pod_table.ROWS[row]
    config = load_config_file(REPO / path).get_config(f"{arg},topology={topology}")
    chips = parse_topology(topology).chips
    s = validate(config, num_devices=chips)
    assert s.mesh.topology == topology
    assert math.prod(v for v in s.mesh.sizes.values() if v > 0) == chips
    assert s.data.global_batch_size % (s.train.grad_accum * s.mesh.data * s.mesh.fsdp) == 0
    micro_tokens = s.data.global_batch_size // s.train.grad_accum * s.data.seq_len
    if s.train.loss_chunk:  # chunks that divide the micro-batch: no padding, no permutes
        assert micro_tokens % s.train.loss_chunk == 0


def test_the_first_layout_is_the_default_and_others_are_named():
    deepseekmoe = load_config_module("deepseekmoe")
    first = next(iter(deepseekmoe.POD_LAYOUTS))
    assert deepseekmoe.get_config("size=pod").mesh.topology == first
    with pytest.raises(ConfigError, match=r"topology='v5e:16x16'.*pod layouts for \['v5p:4x4x8'"):
        deepseekmoe.get_config("size=pod,topology=v5e:16x16")
    with pytest.raises(ValueError, match="use it with size=pod"):
        deepseekmoe.get_config("topology=v5p:4x4x8")


def _report(peak_gib: float, hbm_gib: float = 95.74) -> dict:
    gib = 2**30
    return {
        "row": "deepseekmoe",
        "topology": {"name": "v5p:4x4x8", "num_slices": 1},
        "devices": 128,
        "num_params": 16_375_728_128,
        "mesh": {"data": 1, "fsdp": 16, "expert": 8, "tensor": 1},
        "grad_accum": 9,
        "remat": "dots",
        "dispatch_plan": {"dispatcher": "expert_parallel", "gmm_impl": "pallas"},
        "peak_bytes": int(peak_gib * gib),
        "hbm_bytes": int(hbm_gib * gib),
        "fits_hbm": peak_gib <= hbm_gib,
        "cost": {"flops": 2.5e15, "per_step": True},
        "collectives": {
            "all-to-all": {"bytes": gib // 2},
            "ragged-all-to-all": {"bytes": 2 * gib},
        },
        "mfu_bound": 0.4567,
    }


def test_the_table_row_reads_the_report():
    row = pod_table.table_row(_report(40.0))
    assert row == (
        "| deepseekmoe | v5p:4x4x8 (128) | 16.38B | fsdp=16 expert=8, accum 9, remat dots | "
        "expert_parallel/pallas | 40.0 / 95.74 | yes | 320 | 2.50 (bound) | 0.46 |"
    )
    # Over the layout headroom (15% of HBM) but under HBM: tight; over HBM: no.
    assert "| tight |" in pod_table.table_row(_report(90.0))
    assert "| NO |" in pod_table.table_row(_report(100.0))


@pytest.mark.slow  # minutes: the 16B-parameter step compiled for 128 v5p chips
def test_the_default_deepseekmoe_layout_fits_with_headroom():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra")
    from moejax.config.pod_layout import HBM_HEADROOM
    from moejax.train.collective_report import collective_report

    report = collective_report(
        load_config_module("deepseekmoe").get_config("size=pod"), extrapolate_cost=False
    )
    assert report["topology"]["name"] == "v5p:4x4x8" and report["devices"] == 128
    assert report["dispatch_plan"]["gmm_impl"] == "pallas"
    assert report["fits_hbm"]
    assert report["peak_bytes"] <= (1 - HBM_HEADROOM) * report["hbm_bytes"]
