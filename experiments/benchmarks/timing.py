"""Timing helpers shared by the benchmarks: interleaved repeats, summaries, the device line.

Repeats are interleaved and rotated across the cases (repeat r runs every case once, starting
from case r), so load from other processes hits every case alike; ratios are then taken
within one process, never against numbers from another run.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import jax


def measure(
    steps: dict[str, Callable], repeats: int, log: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Milliseconds per call of every case, repeats interleaved and rotated."""
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if log is not None:
            log(
                f"repeat {r + 1}/{repeats}: "
                + ", ".join(f"{n}={times[n][-1]:.1f}ms" for n in names)
            )
    return times


def back_to_back(fn: Callable, args: tuple, inner: int) -> Callable[[], None]:
    """One timed sample for `measure`: `inner` calls back to back, blocked on the last (divide
    the sample by `inner` for the time per call; on GPU this keeps host dispatch out)."""

    def step():
        for _ in range(inner - 1):
            fn(*args)
        jax.block_until_ready(fn(*args))

    return step


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (ratios span 1e-3 to 1e2)."""
    return float(f"{x:.{digits}g}")


def summary(samples: list[float]) -> dict:
    return {"ms": round(statistics.median(samples), 3), "ms_min": round(min(samples), 3)}


def device_name() -> str:
    dev = jax.devices()[0]
    return (
        f"{dev.platform} ({dev.device_kind}, {len(jax.devices())} device(s), "
        f"{os.cpu_count()} host cores)"
    )
