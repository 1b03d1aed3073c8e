"""The MoE scatter-combine as a hand-written Triton kernel, called through jax-triton.

`combine_rows_triton(y[M, d], idx[T, k], weights[T, k]) -> [T, d]`:
`out[t] = sum_j weights[t, j] * y[idx[t, j]]`, the same contract as
`pallas_kernels.permute_kernels.combine_rows_*` (MegaBlocks' unpermute + combine, Gale et
al., 2022, arXiv 2211.15841, written as a gather-reduce: one program per (token, column
block), so no atomics). It is what the `jax_triton` backend uses for the combine and for the
permute's backward pass.

`triton` and `jax_triton` are imported on first use only: they are in the `gpu` extra
(`pip install -e '.[gpu]'`), and `import jax_triton` fails without a CUDA jaxlib, so on CPU
`triton_available()` says why and the tests skip. Checked on an H200 (jax 0.11.2, jax-triton
0.3.1, triton 3.6.0): equal to the pure-JAX combine (tests/pallas_kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import out_struct

BLOCK_D = 1024  # columns per program; rows are d_model wide (1024-7168 in the target models)


@functools.cache
def triton_available() -> tuple[bool, str]:
    """(True, "") when jax_triton imports and JAX sees a GPU, else (False, the reason)."""
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or ValueError from jax_triton without a CUDA jaxlib
        return False, f"jax_triton unavailable ({type(e).__name__}: {e}); install '.[gpu]'"
    if jax.default_backend() != "gpu":
        return False, f"jax_triton needs a GPU; the JAX backend is {jax.default_backend()!r}"
    return True, ""


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def combine_kernel(
        y_ptr, idx_ptr, w_ptr, out_ptr, d: tl.constexpr, k: tl.constexpr, block_d: tl.constexpr
    ):
        t = tl.program_id(0)
        cols = tl.program_id(1) * block_d + tl.arange(0, block_d)
        ok = cols < d
        acc = tl.zeros((block_d,), dtype=tl.float32)
        for j in tl.static_range(k):
            row = tl.load(idx_ptr + t * k + j).to(tl.int64)
            w = tl.load(w_ptr + t * k + j)
            y = tl.load(y_ptr + row * d + cols, mask=ok, other=0.0)
            acc += y.to(tl.float32) * w
        tl.store(out_ptr + t.to(tl.int64) * d + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return combine_kernel


def combine_rows_triton(y: jax.Array, idx: jax.Array, weights: jax.Array) -> jax.Array:
    ok, reason = triton_available()
    if not ok:
        raise RuntimeError(reason)
    import jax_triton

    (t, k), d = idx.shape, y.shape[1]
    block_d = min(BLOCK_D, 1 << (d - 1).bit_length())
    return jax_triton.triton_call(
        y,
        idx.reshape(-1).astype(jnp.int32),
        weights.reshape(-1).astype(jnp.float32),
        kernel=_kernel(),
        out_shape=out_struct((t, d), y.dtype, y, idx),
        grid=(t, -(-d // block_d)),
        d=d,
        k=k,
        block_d=block_d,
    )
