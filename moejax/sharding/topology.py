"""TPU topologies for ahead-of-time compilation from any host, and what their chips hold.

`tpu_devices("v5p:4x4x8")` returns the compile-only devices of that slice, from libtpu's
topology description (`jax.experimental.topologies.get_topology_desc`): a `jit(...).lower(
...).compile()` over a mesh of them runs the real XLA:TPU compiler (Mosaic included) on a
host without a TPU, as MaxText's `train_compile.py` does. Nothing runs; memory comes from
`memory_analysis()`, FLOPs and bytes from `cost_analysis()`, collectives from the HLO.

Names: `GEN:AxB[xC]` (the chip grid, e.g. `v5p:4x4x8`, `v6e:16x16`) or a Cloud TPU name
`GEN-N` (`v5p-256`, `v6e-256`, `v5e-256`, `v5litepod-256`, `v4-128`). v4 and v5p count
TensorCores in Cloud names (2 per chip: `v5p-256` is 128 chips, `4x4x8`); v5e and v6e count
chips. `num_slices > 1` gives that many copies joined by DCN (multi-slice; devices carry a
`slice_index`, which `moejax.sharding.mesh` turns into a hybrid mesh).

`CHIPS` holds each chip's HBM as XLA:TPU reports it available to a program (libtpu 0.0.42:
v4 30.75 GiB, v5e 15.75, v5p 95.74, v6e 31.25), and its bf16 peak and HBM bandwidth (Cloud
TPU documentation).
"""

from __future__ import annotations

import dataclasses
import math
import re

from moejax.libtpu_env import quiet_libtpu_without_chips

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: `hbm_bytes` per chip, `peak_flops` (bf16 FLOP/s), `hbm_bandwidth` (B/s)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


# device_kind (as jax reports it) -> Chip
CHIPS = {
    "TPU v4": Chip("v4", int(30.75 * GiB), 275e12, 1.228e12),
    "TPU v5 lite": Chip("v5e", int(15.75 * GiB), 197e12, 0.819e12),
    "TPU v5": Chip("v5p", int(95.74 * GiB), 459e12, 2.765e12),
    "TPU v6 lite": Chip("v6e", int(31.25 * GiB), 918e12, 1.640e12),
}
# Cloud generation name -> (libtpu's name, TensorCores per chip in Cloud names, grid rank)
GENERATIONS = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v5litepod": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology: libtpu's generation name, the chip grid, and the slice count."""

    generation: str
    grid: tuple[int, ...]
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def chips(self) -> int:
        return math.prod(self.grid) * self.num_slices


def _grid_for(chips: int, rank: int) -> tuple[int, ...]:
    """The standard slice shape of `chips` chips: 3-D tori grow 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, 4x4x8, ... (the last of the smallest dimensions doubles); 2-D grids 1x1, 1x2, 2x2,
    2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
    grid = [2, 2, 1] if rank == 3 else [1, 1]
    if chips < math.prod(grid) or chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a standard slice (a power of two, >= 4 in 3-D)")
    while math.prod(grid) < chips:
        smallest = min(grid)
        i = max(j for j, g in enumerate(grid) if g == smallest)
        grid[i] *= 2
    return tuple(grid)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`GEN:AxB[xC]` or `GEN-N` (module docstring) -> Topology; one clear error otherwise."""
    gens = ", ".join(GENERATIONS)
    usage = (
        f"topology {name!r}: expected GEN:AxB[xC] (e.g. v5p:4x4x8, v6e:16x16) or a Cloud TPU "
        f"name GEN-N (e.g. v5p-256, v6e-256), GEN one of {gens}"
    )
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    grid_form = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name)
    cloud_form = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    match = grid_form or cloud_form
    if match is None or match.group(1) not in GENERATIONS:
        raise ValueError(usage)
    generation, cores_per_chip, rank = GENERATIONS[match.group(1)]
    if grid_form:
        grid = tuple(int(g) for g in match.group(2).split("x"))
        if len(grid) != rank:
            raise ValueError(f"{usage}; {generation} grids have {rank} dimensions")
    else:
        cores = int(match.group(2))
        if cores % cores_per_chip:
            raise ValueError(f"{usage}; {name} counts {cores_per_chip} cores per chip")
        try:
            grid = _grid_for(cores // cores_per_chip, rank)
        except ValueError as e:
            raise ValueError(f"{usage}; {e}") from None
    return Topology(generation, grid, num_slices)


def tpu_devices(topology: str | Topology, num_slices: int = 1) -> list:
    """The compile-only devices of `topology` (a name or a parsed `Topology`)."""
    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    try:
        import libtpu  # noqa: F401  (the `tpu` extra)
    except ImportError:
        raise RuntimeError(
            f"compiling for {topo.name} needs libtpu: pip install -e '.[tpu]' "
            "(it brings jax[tpu]; no TPU is needed)"
        ) from None
    from jax.experimental import topologies

    quiet_libtpu_without_chips()
    kwargs = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    if topo.generation == "v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as v5p by default
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, **kwargs)
    return list(desc.devices)


def chip_of(device) -> Chip:
    """The `Chip` of a TPU device (by `device_kind`); a clear error for other devices."""
    kind = getattr(device, "device_kind", "")
    if kind not in CHIPS:
        raise ValueError(f"no chip data for device kind {kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]
