"""Which kernel implementation runs where: backends chosen from the platform, by name.

- ``"mosaic_tpu"``: Pallas kernels lowered by Mosaic TPU, their metadata (which group and row
  tile each grid step works on) passed as scalar prefetch into SMEM. On CPU these kernels run
  in Pallas interpret mode (`interpret=True`), which is how the tests check them.
- ``"mosaic_gpu"``: grouped matmuls through Pallas Mosaic GPU (`gmm_mosaic_gpu.py`: TMA
  pipelines and wgmma, Hopper) for 16-bit operands whose shapes fit its tiles; every other
  grouped matmul, and the permute/combine row kernels, run the ``pallas_gpu`` kernels. On CPU
  the Mosaic GPU kernels run in Mosaic GPU interpret mode.
- ``"pallas_gpu"``: Pallas kernels for GPU written against `jax.experimental.pallas.triton`
  (masked loads and stores, a K loop inside the kernel), lowered through Pallas's Triton
  backend, which `compiler_params=pallas.triton.CompilerParams` selects (Mosaic GPU is the
  default GPU lowering since JAX 0.9; the Triton lowering is deprecated from 0.11). Any
  dtype, any shape. They also run in interpret mode on CPU.
- ``"jax_triton"``: the ``pallas_gpu`` kernels plus a hand-written Triton scatter-combine
  called through `jax_triton.triton_call` (`pallas_kernels/triton_combine.py`); GPU only.

The platform is the one the step is compiled for (`platform()`: the context mesh's devices),
not the host's, so a compile for a TPU topology on a CPU host gets the TPU kernels.
``"auto"`` picks ``mosaic_tpu`` on TPU, ``mosaic_gpu`` on a Hopper GPU (compute capability
9.x: wgmma is Hopper's), ``pallas_gpu`` on other GPUs; on CPU it picks
``mosaic_tpu`` in interpret mode (there is no compiled Pallas lowering for CPU).
"""

from __future__ import annotations

import inspect

import jax

BACKENDS = ("mosaic_tpu", "mosaic_gpu", "pallas_gpu", "jax_triton")
# NVIDIA GPUs ("gpu", "cuda") are resolved by compute capability in `resolve_backend`.
PLATFORM_BACKEND = {"tpu": "mosaic_tpu", "rocm": "pallas_gpu", "cpu": "mosaic_tpu"}


def platform() -> str:
    """The platform the code being traced is compiled for: that of the context mesh's devices
    (`jax.set_mesh`; an ahead-of-time compile for a TPU topology sets a mesh of abstract TPU
    devices on a CPU host), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def compute_capability() -> str:
    """The first device's CUDA compute capability ("9.0"), or "" off NVIDIA GPUs."""
    return str(getattr(jax.devices()[0], "compute_capability", "") or "")


def is_hopper(capability: str) -> bool:
    return capability.split(".")[0] == "9"


def resolve_backend(backend: str | None = "auto") -> str:
    """The backend a kernel call uses: `backend` itself, or the platform's for None/"auto".
    `mosaic_gpu` on a GPU that is not a Hopper is refused here, before anything compiles."""
    on_gpu = platform() in ("gpu", "cuda")
    if backend in (None, "auto"):
        if on_gpu:
            return "mosaic_gpu" if is_hopper(compute_capability()) else "pallas_gpu"
        return PLATFORM_BACKEND.get(platform(), "mosaic_tpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {('auto',) + BACKENDS}")
    if backend == "mosaic_gpu" and on_gpu and not is_hopper(compute_capability()):
        raise ValueError(
            f"backend='mosaic_gpu' needs a Hopper GPU (compute capability 9.x, for wgmma); this "
            f"device reports {compute_capability() or 'none'}: use 'pallas_gpu' or 'auto'"
        )
    return backend


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> interpret exactly when running on CPU (no Pallas lowering exists there)."""
    if interpret is None:
        return platform() == "cpu"
    if not interpret and platform() == "cpu":
        raise ValueError(
            "Pallas kernels have no CPU lowering: pass interpret=True (or None) "
            "to run them in interpret mode on CPU."
        )
    return bool(interpret)


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """The `out_shape` of a `pallas_call` whose operands are `operands`.

    Inside `jax.shard_map` (which checks varying manual axes by default) a kernel's output
    must say which manual mesh axes it varies over: those of its most varying operand (the
    token-sharded rows; weights vary over fewer axes or none). jax 0.10 names the field
    `manual_axis_type`, earlier versions `vma`. Outside shard_map this is a plain struct.
    """
    fields = inspect.signature(jax.ShapeDtypeStruct).parameters
    for name in ("manual_axis_type", "vma"):
        if name not in fields:
            continue
        best = None
        for x in operands:
            value = getattr(jax.typeof(x), name, None)
            if value is not None and (best is None or _varying(value) > _varying(best)):
                best = value
        if best is not None:
            return jax.ShapeDtypeStruct(shape, dtype, **{name: best})
    return jax.ShapeDtypeStruct(shape, dtype)


def _varying(value) -> frozenset:
    return frozenset(getattr(value, "varying", value) or ())


def shard_map_checks_vma() -> bool:
    """Whether a `jax.shard_map` around these kernels may check varying manual axes: not on
    CPU, where they run in Pallas's interpreter, whose index computations mix varying and
    invariant values (jax 0.10); compiled kernels get their outputs' vma from `out_struct`."""
    return platform() != "cpu"
