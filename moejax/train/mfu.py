"""Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak.

Peaks are dense bf16 matmul TFLOP/s per device from vendor data sheets (per chip for TPUs,
per GPU for NVIDIA). CPUs have no fixed peak: we measure one by timing a float32 matmul at
start-up, so MFU on CPU reads as "fraction of what this machine's BLAS reaches".
`train.peak_tflops > 0` overrides both.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Substring of `device.device_kind` -> peak dense bf16 TFLOP/s per device.
PEAK_TFLOPS = (
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 197.0),  # v5e / "TPU v5 lite"
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
