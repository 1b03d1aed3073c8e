"""`MoEConfig`: the `config.moe` section (routing, experts and dispatch)."""
from __future__ import annotations

import dataclasses

from moejax.config.sections import section_from_mapping


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts layer hyper-parameters.

    DeepSeekMoE (Dai et al., 2024) fine-grained expert segmentation is a choice of values:
    split each expert into m smaller ones (`num_experts * m`, `d_expert / m`, `top_k * m`) and
    keep `n_shared` always-on experts, computed as one dense SwiGLU of width
    `n_shared * d_expert`.
    """
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 512
    n_shared: int = 0
    router: str = "softmax_topk"
    renormalize: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral)
    balance_coef: float = 0.01  # Switch Transformer load-balance loss weight
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss weight
    dispatcher: str = "auto"
    capacity_factor: float = 1.25  # only for capacity_einsum: C = ceil(cf * T * k / E)
    gmm_impl: str = "auto"  # grouped matmul of the `ragged` plan: auto|tile_loop|ragged_dot
    gmm_tile: int = 256  # rows per tile of the tile_loop grouped matmul
    # kernels of the `pallas` dispatcher: auto (from the platform)|mosaic_tpu|pallas_gpu|
    # jax_triton (pallas_gpu plus the Triton combine kernel); see pallas_kernels/backend.py
    kernel_backend: str = "auto"

    @classmethod
    def from_mapping(cls, mapping) -> "MoEConfig":
        return section_from_mapping(cls, mapping, "moe")
