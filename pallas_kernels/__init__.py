"""Expert-dispatch kernels (Pallas for TPU and GPU, Triton via jax-triton) and their pure-JAX
references. Every kernel module sits beside the reference it is tested against:

- `gmm.py`: `gmm` / `tgmm` grouped matmuls with `custom_vjp`s, dispatching to
  `gmm_mosaic_tpu.py` (Mosaic TPU, scalar-prefetch metadata), `gmm_mosaic_gpu.py` (Mosaic GPU,
  TMA + wgmma, Hopper) or `gmm_gpu.py` (Pallas GPU, Triton lowering); `tiling.py` holds the
  tile table and the work-item metadata.
- `permute.py`: `permute` / `unpermute_combine` with VJPs, on the row kernels of
  `permute_kernels.py`; `triton_combine.py` is the jax-triton combine kernel.
- `backend.py`: backend names and the platform default; `reference.py`: the ground truth.
"""

from pallas_kernels.backend import BACKENDS, resolve_backend
from pallas_kernels.gmm import gmm, tgmm
from pallas_kernels.permute import permute, unpermute_combine
from pallas_kernels.reference import (
    gmm_reference,
    permute_reference,
    tgmm_reference,
    unpermute_combine_reference,
)

__all__ = [
    "BACKENDS",
    "gmm",
    "gmm_reference",
    "permute",
    "permute_reference",
    "resolve_backend",
    "tgmm",
    "tgmm_reference",
    "unpermute_combine",
    "unpermute_combine_reference",
]
