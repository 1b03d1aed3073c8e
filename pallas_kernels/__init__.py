"""Expert-dispatch kernels (Pallas for GPU/TPU, Triton via jax-triton) and their pure-JAX
references. Every kernel module sits beside the reference it is tested against."""
from pallas_kernels.reference import gmm_reference, tgmm_reference

__all__ = ["gmm_reference", "tgmm_reference"]
