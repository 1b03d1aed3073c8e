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
    `n_shared * d_expert`. Qwen2-MoE's shared expert has its own width (`d_shared`) and a
    scalar sigmoid gate per token (`shared_gate`).

    A router is a scorer (how logits are made) and a selection rule (which experts a token
    takes, with what weights). `router="softmax_topk"` and `router="top_p"` score with one
    linear map and select by their name; `router="gru"` scores with RMoE's recurrent GRU and
    selects by `selection` (see `moejax.moe.routers`).
    """
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 512
    n_shared: int = 0
    d_shared: int = 0  # width of the shared MLP; 0 = n_shared * d_expert (DeepSeekMoE)
    shared_gate: bool = False  # Qwen2-MoE: shared output times sigmoid(x . w_gate), w_gate [d]
    router: str = "softmax_topk"  # softmax_topk | top_p | gru
    selection: str = ""  # selection rule of the gru router; "" = softmax_topk
    renormalize: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral)
    balance_coef: float = 0.01  # Switch Transformer load-balance loss weight
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss weight
    entropy_coef: float = 0.0  # router-entropy loss weight (dynamic routing's beta)
    top_p: float = 0.4  # top_p: smallest expert set with probability >= top_p (max top_k)
    gru_dim: int = 128  # gru: hidden size h of the routing state (RMoE uses 128)
    gru_shared: bool = True  # gru: one GRU cell for all MoE layers (RMoE) or one per layer
    gru_detach: bool = False  # gru: stop gradients through the carried state (ablation)
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
