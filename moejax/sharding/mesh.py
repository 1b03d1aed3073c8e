"""`make_mesh`: a `jax.sharding.Mesh` over the axes (data, fsdp, expert, tensor)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from moejax.config_section import ConfigError
from moejax.sharding.config import MESH_AXES, MeshConfig


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Replaces the single -1 by what is left of `num_devices`; errors name the field."""
    sizes = cfg.sizes
    free = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]} must be a positive size or -1.")
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {free}; give the others sizes.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axis sizes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; change mesh.{'/'.join(MESH_AXES)}."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh shape {sizes} uses {math.prod(sizes.values())} devices but "
            f"{num_devices} are available; set one axis to -1 or fix the sizes."
        )
    return sizes


def _granules(devices) -> tuple[int, bool]:
    """(number of slower-network groups, whether they are processes rather than slices)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        return len(slices), False
    processes = {getattr(d, "process_index", 0) for d in devices}
    return len(processes), len(processes) > 1


def device_grid(cfg: MeshConfig, devices) -> np.ndarray:
    """Devices arranged as the (data, fsdp, expert, tensor) mesh.

    One slice (one host, or one TPU slice): `mesh_utils.create_device_mesh`, which orders
    devices by the physical interconnect where it knows it (TPU, GPU). Devices that span
    several TPU slices (DCN between them), or several processes: a hybrid mesh whose `data`
    axis is split over the slices/processes and whose other axes stay inside one, since
    data parallelism sends the least per step (one gradient reduction); so `mesh.data` must
    be a multiple of the number of slices. Processes that do not divide `data` fall back to
    the single-slice order.
    """
    from jax.experimental import mesh_utils

    devices = list(devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    groups, by_process = _granules(devices)
    if groups > 1 and (sizes["data"] % groups == 0 or not by_process):
        if sizes["data"] % groups:
            raise ConfigError(
                f"mesh.data={sizes['data']} must be a multiple of the {groups} slices the "
                f"devices span: the data axis crosses slices (DCN), the others stay inside "
                f"one. Set mesh.data to a multiple of {groups}."
            )
        inner = (sizes["data"] // groups,) + shape[1:]
        outer = (groups,) + (1,) * (len(shape) - 1)
        return mesh_utils.create_hybrid_device_mesh(
            inner, outer, devices=devices, process_is_granule=by_process
        )
    try:
        return mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / unusual topologies: plain row-major order.
        return np.asarray(devices).reshape(shape)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(device_grid(cfg, devices), MESH_AXES)
