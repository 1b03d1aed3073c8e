"""Pod layouts: how a `size=pod` config sits on each TPU slice it was compiled for.

A layout is what has to change with the slice while the model, the data and the global
batch stay the same: the mesh sizes, the number of gradient-accumulation micro-batches and
the remat policy. Each pod config lists one layout per topology it supports, the first
being its default, and takes the topology as a config arg:

    python -m moejax.train --config=configs/deepseekmoe.py:size=pod,topology=v6e:16x16 ...

The choice sets `mesh.topology`, so the collective report compiles for that slice by
default (`python -m moejax.train.collective_report --config=configs/deepseekmoe.py:size=pod`).
A layout is "supported" only once the report has compiled it with the real XLA:TPU compiler
and found it fits the chip's HBM (`experiments/pod_table.py` re-checks every one and writes
the README table): the fewest micro-batches that fit with headroom
(`HBM_HEADROOM`), since each extra micro-batch repeats the weight gathers.
"""

from __future__ import annotations

import dataclasses

from moejax.config_section import ConfigError

# A layout must leave this fraction of HBM free in the compiled step: XLA's memory analysis
# is static, and the runtime adds its own buffers (collectives' scratch, the checkpoint
# manager's host transfers, the eval step's buffers).
HBM_HEADROOM = 0.15


@dataclasses.dataclass(frozen=True)
class PodLayout:
    """Mesh sizes, micro-batches per step and remat of a pod config on one topology."""

    mesh: dict
    grad_accum: int = 1
    remat: str = "dots"


def apply_pod_layout(c, layouts: dict[str, PodLayout], topology: str) -> None:
    """Sets `c`'s mesh, `train.grad_accum`, `model.remat` and `mesh.topology` from the
    layout of `topology` ("" = the first of `layouts`)."""
    name = topology or next(iter(layouts))
    if name not in layouts:
        raise ConfigError(
            f"topology={name!r}: this config has pod layouts for {list(layouts)}; pass one of "
            f"them (e.g. size=pod,topology={next(iter(layouts))}), or set mesh.*, "
            f"train.grad_accum, model.remat and mesh.topology yourself and check the step "
            f"fits with `python -m moejax.train.collective_report --topology={name}`."
        )
    layout = layouts[name]
    c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    c.mesh.update(**layout.mesh, topology=name)
    c.train.grad_accum = layout.grad_accum
    c.model.remat = layout.remat
