"""Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak.

`Throughput` turns the tokens trained in a logging interval into tokens/s, TFLOP/s per
device and MFU; `measured_flops_per_token` is the training FLOPs per token from the measured
experts per token, where routing makes it vary (top-p).

Peaks are dense bf16 matmul TFLOP/s per device from vendor data sheets (per chip for TPUs,
per GPU for NVIDIA). CPUs have no fixed peak: we measure one by timing a float32 matmul at
start-up, so MFU on CPU reads as "fraction of what this machine's BLAS reaches".
`train.peak_tflops > 0` overrides both.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config.validation import Sections
from moejax.models.flops import train_flops_per_token

# Substring of `device.device_kind` -> peak dense bf16 TFLOP/s per device.
PEAK_TFLOPS = (
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5" (v5e reports "TPU v5 lite", matched above)
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
)


def measure_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """Best float32 TFLOP/s of an n x n matmul on the default device."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def device_peak_tflops(configured: float = 0.0, device=None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if configured > 0:
        return configured, "train.peak_tflops"
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key, peak in PEAK_TFLOPS:
        if key.lower() in kind.lower():
            return peak, f"table ({kind})"
    if device.platform == "cpu":
        return measure_matmul_tflops(), "measured float32 matmul"
    return 0.0, f"unknown device {kind!r}; set train.peak_tflops"


def measured_flops_per_token(s: Sections, metrics: dict[str, Any]) -> float | None:
    """Training FLOPs per token from the measured experts per token, where routing makes it
    vary (top-p); None (the static count) otherwise."""
    if not s.model.num_moe_layers or s.moe.selection != "top_p":
        return None
    used = float(np.mean(metrics["moe/experts_per_token"]))
    return train_flops_per_token(s.model, s.moe, s.data.seq_len, experts_per_token=used)


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over a logging interval."""

    def __init__(self, flops_per_token: float, num_devices: int, peak_tflops: float):
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak_tflops
        self.reset()

    def reset(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int):
        self.tokens += tokens

    def read(self, flops_per_token: float | None = None) -> dict[str, float]:
        """`flops_per_token` overrides the static count (top-p: from measured experts).
        Empty when no step was timed since the last reset (an interval of the compiling
        first step alone): no figure rather than a 0 that reads as a stalled run."""
        if not self.tokens:
            self.reset()
            return {}
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        tflops = tps * (flops_per_token or self.flops_per_token) / self.num_devices / 1e12
        out = {"perf/tokens_per_sec": tps, "perf/tflops_per_device": tflops}
        if self.peak > 0:
            out["perf/mfu"] = tflops / self.peak
        self.reset()
        return out
