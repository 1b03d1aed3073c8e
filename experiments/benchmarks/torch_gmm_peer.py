"""Peer for `gmm.py` on GPU: PyTorch's grouped matmul (`torch._grouped_mm`) on the same
operands, shared with JAX through DLPack (no copy).

`torch_fns()` -> ({"gmm": f(lhs, rhs, sizes), "tgmm": f(lhs, grad, sizes)} taking and
returning JAX arrays, or None, and the reason when torch or a CUDA device is missing). Each
call runs the torch kernel and synchronises the device, so it can be timed like a blocked
JAX call (a sync per call where JAX's back-to-back calls queue: a small handicap for torch).
gmm: `_grouped_mm(lhs[M, K], rhs[G, K, N], offs)`; tgmm (ragged K):
`_grouped_mm(lhs^T[K, M], grad[M, N], offs) -> [G, K, N]`; `offs` are the groups' end rows.
Layouts the kernel refuses are made contiguous once, outside the timed call.
"""

from __future__ import annotations

import numpy as np


def torch_fns():
    try:
        import torch
    except Exception as e:  # noqa: BLE001 -- optional peer
        return None, f"{type(e).__name__}: {e}"
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None, f"torch {torch.__version__}: no CUDA device or no torch._grouped_mm"
    import jax

    def to_torch(x):
        return torch.from_dlpack(x)

    def offsets(sizes):
        return torch.from_dlpack(jax.numpy.cumsum(sizes).astype(np.int32))

    def call(a, b, offs):
        out = torch._grouped_mm(a, b, offs=offs)
        torch.cuda.synchronize()
        return out

    cache: dict = {}  # the converted inputs of the latest call, reused while they repeat

    def make(op, to_inputs):
        def fn(*args):
            key = (op, *((id(x), x.shape) for x in args))
            if key in cache:
                return jax.numpy.from_dlpack(call(*cache[key]))
            cache.clear()
            a, b, offs = to_inputs(*args)
            try:
                out = call(a, b, offs)
            except RuntimeError:  # a layout the kernel refuses: made contiguous, once
                a, b = a.contiguous(), b.contiguous()
                out = call(a, b, offs)
            cache[key] = (a, b, offs)
            return jax.numpy.from_dlpack(out)

        return fn

    return {
        "gmm": make("gmm", lambda lhs, rhs, sizes: (to_torch(lhs), to_torch(rhs), offsets(sizes))),
        "tgmm": make(
            "tgmm", lambda lhs, grad, sizes: (to_torch(lhs).t(), to_torch(grad), offsets(sizes))
        ),
    }, None
