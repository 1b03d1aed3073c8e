"""TPU topology names (`moejax.sharding.topology`): the grid form, Cloud names (v4/v5p count
TensorCores, v5e/v6e chips), multi-slice, and one clear error for each bad name. No libtpu."""

import pytest

from moejax.sharding.topology import CHIPS, parse_topology


@pytest.mark.parametrize(
    "name, grid_name, chips",
    [
        ("v5p:4x4x8", "v5p:4x4x8", 128),
        ("v5p-256", "v5p:4x4x8", 128),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-16", "v5p:2x2x2", 8),
        ("v5p-64", "v5p:2x4x4", 32),
        ("v5p-1024", "v5p:8x8x8", 512),
        ("v6e-256", "v6e:16x16", 256),
        ("v6e-32", "v6e:4x8", 32),
        ("v5e-64", "v5e:8x8", 64),
        ("v5litepod-16", "v5e:4x4", 16),
        ("v4-128", "v4:4x4x4", 64),
    ],
)
def test_names_resolve_to_the_standard_slice(name, grid_name, chips):
    topo = parse_topology(name)
    assert (topo.name, topo.chips) == (grid_name, chips)


def test_slices_multiply_the_chips():
    assert parse_topology("v5p-256", num_slices=4).chips == 512


@pytest.mark.parametrize(
    "name, says",
    [
        ("v7:2x2", "GEN one of"),
        ("v5p:4x4", "v5p grids have 3 dimensions"),
        ("v5p-12", "6 chips is not a standard slice"),
        ("v5p-9", "counts 2 cores per chip"),
        ("tpu", "expected GEN:AxB[xC]"),
    ],
)
def test_a_bad_name_is_one_clear_error(name, says):
    with pytest.raises(ValueError, match="topology") as e:
        parse_topology(name)
    assert says in str(e.value)


def test_chip_table_covers_what_jax_reports():
    # device_kind strings as libtpu reports them (v5p is "TPU v5", v5e "TPU v5 lite").
    assert {CHIPS[k].name for k in ("TPU v4", "TPU v5", "TPU v5 lite", "TPU v6 lite")} == {
        "v4",
        "v5p",
        "v5e",
        "v6e",
    }
    assert (
        CHIPS["TPU v5"].hbm_bytes > CHIPS["TPU v6 lite"].hbm_bytes > CHIPS["TPU v5 lite"].hbm_bytes
    )


@pytest.mark.parametrize(
    "kind, peak",
    [("TPU v5", 459.0), ("TPU v5 lite", 197.0), ("TPU v6 lite", 918.0), ("TPU v4", 275.0)],
)
def test_mfu_peak_of_each_tpu_kind(kind, peak):
    # v5p reports "TPU v5": it must not take v5e's peak.
    from types import SimpleNamespace

    from moejax.train.mfu import device_peak_tflops

    assert device_peak_tflops(device=SimpleNamespace(device_kind=kind, platform="tpu"))[0] == peak
