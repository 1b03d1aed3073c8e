"""`make_mesh`: a `jax.sharding.Mesh` over the axes (data, fsdp, expert, tensor)."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from moejax.config.sections import ConfigError
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
                f"{num_devices} devices; change mesh.{'/'.join(MESH_AXES)}.")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh shape {sizes} uses {math.prod(sizes.values())} devices but "
            f"{num_devices} are available; set one axis to -1 or fix the sizes.")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / unusual topologies: plain row-major order.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
