"""`MoEConfig`: the `config.moe` section (routing, experts and dispatch)."""

from __future__ import annotations

import dataclasses

from moejax.config_section import section_from_mapping


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts layer hyper-parameters.

    DeepSeekMoE (Dai et al., 2024) fine-grained expert segmentation is a choice of values:
    split each expert into m smaller ones (`num_experts * m`, `d_expert / m`, `top_k * m`) and
    keep `n_shared` always-on experts, computed as one dense SwiGLU of width
    `n_shared * d_expert`. Qwen2-MoE's shared expert has its own width (`d_shared`) and a
    scalar sigmoid gate per token (`shared_gate`).

    A router is a scorer (how logits are made) followed by a selection rule (which experts a
    token takes, with what weights), two independent fields: `scorer` is a key of
    `moejax.moe.routers.ROUTERS` ("linear": one linear map; "gru": RMoE's layerwise recurrent
    GRU, `gru_*`) and `selection` a key of `moejax.moe.selection.SELECTIONS`, so every scorer
    routes with every rule. `selection="sigmoid_bias"` is DeepSeek-V3's routing (Liu et al.,
    2024, arXiv 2412.19437, eq. 12-16): sigmoid affinities, a per-expert bias (the
    non-trainable `router_bias` collection, moved after every optimizer step by
    `bias_update_rate`, the gamma of section 2.1.2) that only decides which experts are
    selected, group-limited selection (`n_group`, `topk_group`; `group_mask` is how the
    experts of the dropped groups are masked: "zero" as transformers 4.x's DeepseekV3MoE,
    "neg_inf" as DeepSeek's own inference code and transformers 5.x's DeepseekV3TopkRouter),
    top-k weight normalisation (`renormalize` = norm_topk_prob) and `routed_scaling_factor`.
    The old single field `router` is read through `moejax.config.renames`.

    Balance losses (all over real tokens only; each off when its coefficient is 0):
    `balance_coef` is DeepSeekMoE's expert-level alpha1 (Dai et al., 2024, arXiv 2401.06066,
    eq. 12-14), which is the Switch Transformer loss in top-k form; `device_balance_coef` is
    its device-level alpha2 (eq. 15-17) over `balance_devices` groups of consecutive experts
    (0 = the size of the `expert` mesh axis, filled in by validation);
    `seq_balance_coef` is DeepSeek-V3's sequence-wise alpha (eq. 17-20), per row of the batch.
    """

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 512
    n_shared: int = 0
    d_shared: int = 0  # width of the shared MLP; 0 = n_shared * d_expert (DeepSeekMoE)
    shared_gate: bool = False  # Qwen2-MoE: shared output times sigmoid(x . w_gate), w_gate [d]
    scorer: str = "linear"  # router logits: linear | gru (moejax.moe.routers.ROUTERS)
    selection: str = "softmax_topk"  # softmax_topk | top_p | sigmoid_bias (SELECTIONS)
    renormalize: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral)
    balance_coef: float = 0.01  # Switch load-balance = DeepSeekMoE expert-level alpha1
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss weight
    entropy_coef: float = 0.0  # router-entropy loss weight (dynamic routing's beta)
    device_balance_coef: float = 0.0  # DeepSeekMoE device-level balance loss weight (alpha2)
    balance_devices: int = 0  # device groups D of the device-level loss; 0 = mesh.expert
    seq_balance_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (alpha)
    top_p: float = 0.4  # top_p: smallest expert set with probability >= top_p (max top_k)
    n_group: int = 1  # sigmoid_bias: experts form n_group groups of num_experts / n_group
    topk_group: int = 1  # sigmoid_bias: each token selects within its topk_group best groups
    group_mask: str = "zero"  # sigmoid_bias: dropped groups' experts masked with zero | neg_inf
    routed_scaling_factor: float = 1.0  # sigmoid_bias: combine weights multiplied by this
    bias_update_rate: float = 0.001  # sigmoid_bias: gamma of the bias update; 0 = frozen bias
    gru_dim: int = 128  # gru: hidden size h of the routing state (RMoE uses 128)
    gru_shared: bool = True  # gru: one GRU cell for all MoE layers (RMoE) or one per layer
    gru_detach: bool = False  # gru: stop gradients through the carried state (ablation)
    dispatcher: str = "auto"
    capacity_factor: float = 1.25  # only for capacity_einsum: C = ceil(cf * T * k / E)
    # hybrid: the first ceil(cf * T * k / E) rows of each expert run as capacity buffers
    # (batched matmuls), the rest through the tile loop: dropless
    hybrid_capacity_factor: float = 1.0
    hybrid_tile: int = 64  # hybrid: rows per tile of its overflow loop
    # expert_parallel / fssdp (moejax.moe.expert_parallel): rows per destination buffer of the
    # token all_to_all, B = ceil(cf * T_local * k / mesh.expert); 0 = dropless (B = T_local * k)
    ep_capacity_factor: float = 0.0
    # expert_parallel / fssdp token exchange: padded all_to_all | ragged_all_to_all | auto
    # (ragged on GPU/TPU, padded on CPU, which cannot lower ragged_all_to_all)
    ep_exchange: str = "auto"
    fssdp_slots: int = 1  # fssdp: replica slots per device for hot experts (0 = plain EP)
    # fssdp: the most replicas one owner sends per step (0 = 2 * fssdp_slots): the static
    # send / gradient-receive buffer of the sparse all-gather, so its traffic has no P term
    fssdp_max_sends: int = 0
    fssdp_remat: bool = False  # fssdp: gather the replicas again in the backward pass
    # fssdp: re-lay out which device owns which expert every N steps, from the loads of the
    # last N (Hecate's heterogeneous sharding; moejax.train.expert_relayout); 0 = never
    fssdp_reshard_every: int = 100
    # fssdp with re-sharding: extra stored expert rows per MoE layer, R = num_experts + this,
    # empty until a re-layout fills them, so a device of the expert axis may own 0..R/P
    # experts (Hecate's unequal counts within a memory bound of R/P); 0 = equal counts E/P
    fssdp_spare_rows: int = 0
    # routed SwiGLU: gate and up projections as one grouped matmul on [W_gate | W_up]
    fuse_gate_up: bool = False
    gmm_impl: str = "auto"  # grouped matmul: auto|tile_loop|ragged_dot|pallas
    gmm_tile: int = 256  # rows per tile of the tile_loop grouped matmul
    # kernels of the `pallas` dispatcher: auto (from the platform)|mosaic_tpu|mosaic_gpu|
    # pallas_gpu|jax_triton (pallas_gpu plus the Triton combine kernel); see
    # pallas_kernels/backend.py
    kernel_backend: str = "auto"

    @classmethod
    def from_mapping(cls, mapping) -> "MoEConfig":
        return section_from_mapping(cls, mapping, "moe")
