"""FSSDP's sparse all-gather, compiled for v5p (libtpu, nothing runs): the bytes of the
collective that carries the replicated experts, forward and backward, equal Hecate's closed
form, (S + R) expert weight sets per device with no term in P (S slots received, the R-row
buffer an owner receives their gradients into), where the padded all_to_all moves 2 P S.
Read from the compiled HLO by `experiments/fssdp_bytes.py` (`moejax.sharding.hlo_collectives`)."""

import importlib.util

import pytest
from testing_utils import REPO

pytest.importorskip("libtpu", reason="the TPU-compile tests need the `tpu` extra")

_spec = importlib.util.spec_from_file_location("fssdp_bytes", REPO / "experiments/fssdp_bytes.py")
fssdp_bytes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fssdp_bytes)


def test_sparse_all_gather_moves_s_plus_r_expert_sets_on_4_chips():
    row = fssdp_bytes.measure(4, slots=2, max_sends=1, exchanges=("ragged",), d=128, f=128)
    assert row["R"] == 1
    r = row["ragged"]
    assert r["weight_bytes"] == (2 + 1) * row["expert_set_bytes"]
    assert r["weight_sets"] == r["closed_form_sets"] == 3
    # Besides the weights FSSDP adds only the transpose's all_to_all of 2 x [P] int32 offsets.
    assert r["other_extra_bytes"] == 2 * 4 * 4


@pytest.mark.slow
def test_weight_traffic_does_not_grow_with_p_where_the_padded_form_does():
    rows = [fssdp_bytes.measure(p, slots=2, max_sends=4, d=128, f=128) for p in (4, 8)]
    for row in rows:
        p, s = row["P"], row["S"]
        assert row["ragged"]["weight_sets"] == row["ragged"]["closed_form_sets"] == 2 + row["R"]
        assert row["padded"]["weight_sets"] == 2 * p * s
    assert rows[0]["ragged"]["weight_bytes"] == rows[1]["ragged"]["weight_bytes"]  # R = 4 both
    assert rows[1]["padded"]["weight_bytes"] == 2 * rows[0]["padded"]["weight_bytes"]
