"""Device grids: one slice keeps mesh_utils' order; devices spanning slices (or processes)
split the `data` axis across them and keep every other axis inside one."""

import dataclasses

import numpy as np
import pytest

from moejax.config_section import ConfigError
from moejax.sharding.config import MeshConfig
from moejax.sharding.mesh import device_grid


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int = 0
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_one_slice_is_the_row_major_grid():
    devices = [FakeDevice(i) for i in range(8)]
    grid = device_grid(MeshConfig(data=2, fsdp=4), devices)
    assert grid.shape == (2, 4, 1, 1)
    assert [d.id for d in grid.reshape(-1)] == list(range(8))


@pytest.mark.parametrize("granule", ["slice_index", "process_index"])
def test_data_axis_spans_slices_and_the_rest_stays_inside_one(granule):
    # Interleaved ids so that a plain reshape would mix the slices along fsdp.
    devices = [FakeDevice(i, **{granule: i % 2}) for i in range(8)]
    grid = device_grid(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    assert grid.shape == (2, 2, 1, 2)
    for row in range(2):  # each data index is one slice, holding all its fsdp x tensor
        assert {getattr(d, granule) for d in grid[row].reshape(-1)} == {row}
    assert sorted(d.id for d in grid.reshape(-1)) == list(range(8))


def test_data_axis_must_cover_the_slices():
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
    with pytest.raises(ConfigError, match="mesh.data=1 must be a multiple of the 2 slices"):
        device_grid(MeshConfig(data=1, fsdp=8), devices)


def test_processes_that_do_not_divide_data_keep_the_single_slice_order():
    devices = [FakeDevice(i, process_index=i // 4) for i in range(8)]
    grid = device_grid(MeshConfig(data=1, fsdp=8), devices)
    np.testing.assert_array_equal([d.id for d in grid.reshape(-1)], range(8))
