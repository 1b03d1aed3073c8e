"""Device facts for the benchmarks' JSON: versions (jaxlib, python, CUDA / cuDNN where jax's
CUDA plugin reports them, `jax.print_environment_info`), a compiled program's buffer sizes
(`memory_analysis()`), the allocator's stats. Every call is guarded: CPU hosts, other jax
versions and other plugins answer None (null) where they have no such fact."""

from __future__ import annotations

import platform

import jax

from moejax.train.collective_report import held_bytes, memory_analysis

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def memory_of(compiled) -> dict:
    """The compiled step's buffer sizes (bytes; null where the backend has no analysis) and
    `estimate_bytes`, what it holds at once (`collective_report.held_bytes`)."""
    found = memory_analysis(compiled)
    out = {f"{k}_bytes": found.get(f"{k}_bytes") for k in MEMORY_FIELDS}
    held = all(f"{k}_bytes" in found for k in ("argument", "output", "alias", "temp"))
    out["estimate_bytes"] = held_bytes(found) if held else None
    return out


def device_stats() -> dict:
    """The first device's allocator stats ({} where it keeps none: CPU)."""
    try:
        return jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        return {}


def environment() -> dict:
    """Versions: jaxlib, python, CUDA/cuDNN where jax reports them, the environment info."""
    import jaxlib

    out = {"jaxlib": jaxlib.__version__, "python": platform.python_version(), "cuda": None}
    try:
        from jax._src.lib import cuda_versions  # None without the CUDA plugin
    except Exception:  # noqa: BLE001 -- a private module: gone or moved in another jax
        cuda_versions = None
    if cuda_versions is not None and jax.default_backend() == "gpu":
        cuda = {}
        for name in [n for n in dir(cuda_versions) if n.endswith("_version")]:
            try:  # cuda_runtime_get_version, cudnn_get_version, cudnn_build_version, ...
                cuda[name.removesuffix("_version")] = int(getattr(cuda_versions, name)())
            except Exception:  # noqa: BLE001 -- one that needs arguments or fails
                pass
        out["cuda"] = cuda or None
    try:
        out["environment_info"] = jax.print_environment_info(return_string=True)
    except Exception:  # noqa: BLE001 -- absent or failing (nvidia-smi) in some versions
        out["environment_info"] = None
    return out
