"""Lowers the Triton-lowering Pallas kernels (`gmm_gpu.py`, `permute_kernels.py`) to their
Triton modules on a machine without a GPU and runs the MLIR verifier on each: the check that
catches what the Triton compiler would refuse on a GPU (on jax 0.11.2 an `scf.for` whose
bounds had different integer types did). Run in a subprocess by test_triton_modules.py,
because it registers the Triton lowering of `pallas_call` for the CPU platform, which must
not leak into the interpret-mode tests. Prints one line per kernel, `name ok|FAILED: why`.
JAX internals (jax._src.pallas.triton) are used, as the public API lowers only on a GPU.
"""

import itertools
import sys

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.pallas import pallas_call
from jax._src.pallas.triton import pallas_call_registration as triton_registration

from pallas_kernels.gmm_gpu import gmm_pallas_gpu, tgmm_pallas_gpu
from pallas_kernels.permute_kernels import combine_rows_gpu, gather_rows_gpu
from pallas_kernels.tiling import Tiling

failures = []
lower_module = triton_registration.lowering.lower_jaxpr_to_triton_module


def verified(*args, **kwargs):
    result = lower_module(*args, **kwargs)
    if not result.module.operation.verify():
        raise RuntimeError("the Triton module failed to verify")
    return result


triton_registration.lowering.lower_jaxpr_to_triton_module = verified
mlir.register_lowering(
    pallas_call.pallas_call_p, triton_registration.pallas_call_lowering, platform="cpu"
)

m, k, n, g = 200, 96, 160, 4
sizes = jnp.asarray([50, 0, 90, 40], jnp.int32)
cases = {}
for dtype, transpose in itertools.product((jnp.float32, jnp.bfloat16), (False, True)):
    tiling = Tiling(64, 32 if dtype == jnp.float32 else 64, 128)
    rhs = jnp.zeros((g, n, k) if transpose else (g, k, n), dtype)
    cases[f"gmm {jnp.dtype(dtype).name} transpose_rhs={transpose}"] = (
        lambda a, b, t=tiling, tr=transpose: gmm_pallas_gpu(
            a, b, sizes, tiling=t, out_dtype=jnp.float32, interpret=False, transpose_rhs=tr
        ),
        (jnp.zeros((m, k), dtype), rhs),
    )
    cases[f"tgmm {jnp.dtype(dtype).name}"] = (
        lambda a, b, t=tiling: tgmm_pallas_gpu(
            a, b, sizes, tiling=t, out_dtype=jnp.float32, num_groups=g, interpret=False
        ),
        (jnp.zeros((m, k), dtype), jnp.zeros((m, n), dtype)),
    )
idx = jnp.zeros((50, 2), jnp.int32)
cases["gather_rows"] = (
    lambda x, s: gather_rows_gpu(x, s, jnp.ones((100,)), interpret=False),
    (jnp.zeros((50, k)), jnp.zeros((100,), jnp.int32)),
)
cases["combine_rows"] = (
    lambda y, w: combine_rows_gpu(y, idx, w, interpret=False),
    (jnp.zeros((100, k)), jnp.zeros((50, 2))),
)
for name, (fn, args) in cases.items():
    try:
        jax.jit(fn).lower(*args)
        print(f"{name} ok")
    except Exception as e:  # noqa: BLE001 -- reported per kernel
        failures.append(name)
        print(f"{name} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
sys.exit(1 if failures else 0)
