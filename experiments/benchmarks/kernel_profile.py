"""Where a compiled step's device time goes: the kernels of a `jax.profiler` trace, summed.

`profile_step(step, calls)` runs `step()` `calls` times under `jax.profiler.trace`, reads the
trace back with `jax.profiler.ProfileData` (the XSpace protobuf the profiler writes) and sums
the device events by name: those of the plane's "XLA Ops" line where it has one (one event
per HLO op), else every event of its lines, which on a GPU are the kernels of each stream
(on the H200 with jax 0.11: `nvjet_*` cuBLAS matmuls, `anonymous_mosaic_gpu_kernel` for
Pallas Mosaic GPU calls, `loop_*_fusion` / `input_*_fusion` for XLA's, cuDNN's attention
kernels, `MemcpyD2D`). It answers questions the totals of `moe_layer.py` cannot, e.g. what
share of the MoE layer is the grouped matmuls, the permutation, the sort, or the casts.
CPUs have no device plane: the result says so.

Used by `moe_layer.py --profile CASE,...` and `train_step.py --profile CASE,...`; the JSON
(per case) holds `device_ms_per_call` (the summed kernel time, below the wall time where the
device idles between launches), `ops` (distinct names) and `top`: the heaviest names with
`ms_per_call`, `share` and `count` (launches per call)."""

from __future__ import annotations

import collections
import glob
import tempfile
from typing import Callable, Iterable

import jax


def device_plane(space):
    """The first accelerator plane of a `ProfileData` (GPU or TPU), or None (CPU)."""
    for plane in space.planes:
        if plane.name.startswith(("/device:GPU", "/device:TPU")):
            return plane
    return None


def op_events(plane) -> list[tuple[str, float]]:
    """(name, duration ms) of the plane's ops: its "XLA Ops" line when it has one, else the
    events of every line (GPU kernels of each stream)."""
    lines = list(plane.lines)
    ops = [line for line in lines if line.name == "XLA Ops"]
    return [(e.name, e.duration_ns / 1e6) for line in (ops or lines) for e in line.events]


def summarize(events: Iterable[tuple[str, float]], calls: int, top: int) -> dict:
    """Per-call totals by op name, heaviest first."""
    total, count = collections.Counter(), collections.Counter()
    for name, ms in events:
        total[name] += ms
        count[name] += 1
    device_ms = sum(total.values())
    return {
        "device_ms_per_call": round(device_ms / calls, 4),
        "ops": len(total),
        "top": [
            {
                "name": name,
                "ms_per_call": round(ms / calls, 4),
                "share": round(ms / device_ms, 4) if device_ms else 0.0,
                "count": count[name] // calls,
            }
            for name, ms in total.most_common(top)
        ],
    }


def profile_step(step: Callable[[], object], calls: int = 5, top: int = 15) -> dict:
    """Traces `calls` runs of `step` (compiled and warmed up already) and summarizes them."""
    try:
        return _profile(step, calls, top)
    except Exception as e:  # noqa: BLE001 -- a profiler failure must not sink the benchmark
        return {"available": False, "reason": f"{type(e).__name__}: {str(e)[:300]}"}


def _profile(step: Callable[[], object], calls: int, top: int) -> dict:
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                jax.block_until_ready(step())
        paths = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))
        if not paths:
            return {"available": False, "reason": "the profiler wrote no .xplane.pb"}
        plane = device_plane(ProfileData.from_file(paths[-1]))
        if plane is None:
            return {"available": False, "reason": "no device plane (CPU run)"}
        return {"available": True, "plane": plane.name, **summarize(op_events(plane), calls, top)}
