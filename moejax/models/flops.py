"""Parameter counts (total and active per token) and training FLOPs per token.

Active parameters count, in each MoE layer, only the `top_k` routed experts a token uses
(plus shared experts, router and everything outside the FFN; each MoE layer with its own
expert count and top-k under `model.layer_kinds`); for top-p routing the slot
bound (`routing_slots`) is used, an upper bound unless the measured mean `experts_per_token`
is passed (the trainer does, for throughput and MFU).
Training FLOPs per token use
the PaLM estimate (Chowdhery et al., 2022, appendix B): 6 * N_active (forward + backward of
every matmul weight, embeddings lookups excluded) + 12 * L * H * Q * S for attention scores
and values (H heads of size Q over a context of S tokens; causal masking not discounted).
"""

from __future__ import annotations

import dataclasses

from moejax.models.config import ModelConfig, layer_moe_config
from moejax.moe.config import MoEConfig
from moejax.moe.layer import shared_width
from moejax.moe.selection import routing_slots


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token
    embedding: int  # the input embedding table (a lookup, no FLOPs)
    routed_expert: int  # one routed expert of one layer

    @property
    def active_matmul(self) -> int:
        return self.active - self.embedding


def attention_params(model: ModelConfig) -> int:
    """Parameters of one attention layer: GQA (with optional q/k/v biases) or MLA (its
    projections and the two latent RMSNorm scales)."""
    d, h = model.d_model, model.num_heads
    if model.attention == "mla":
        qk = model.qk_nope_head_dim + model.qk_rope_head_dim
        rq, rkv = model.q_lora_rank, model.kv_lora_rank
        q = (d * rq + rq + rq * h * qk) if rq else d * h * qk
        kv = (
            d * (rkv + model.qk_rope_head_dim)
            + rkv
            + rkv * h * (model.qk_nope_head_dim + model.v_head_dim)
        )
        return q + kv + h * model.v_head_dim * d
    hd, kvh = model.resolved_head_dim, model.num_kv_heads
    bias = (h + 2 * kvh) * hd if model.attention_bias else 0
    return d * hd * (2 * h + 2 * kvh) + bias


def attention_width(model: ModelConfig) -> float:
    """Q in the PaLM attention term 12 L H Q S: the mean of the query/key and value head dims
    (both equal the head dim for GQA)."""
    if model.attention == "mla":
        return (model.qk_nope_head_dim + model.qk_rope_head_dim + model.v_head_dim) / 2
    return model.resolved_head_dim


def count_params(
    model: ModelConfig, moe: MoEConfig, experts_per_token: float | None = None
) -> ParamCounts:
    """`experts_per_token`: the measured mean (top-p routing) in place of `top_k` for the
    active count."""
    d = model.d_model
    attn = attention_params(model)
    norms = 2 * d
    dense_ffn = 3 * d * model.d_ff
    expert = 3 * d * moe.d_expert
    shared = 3 * d * shared_width(moe) + (d if moe.n_shared and moe.shared_gate else 0)
    gru_cell = 6 * moe.gru_dim * moe.gru_dim + 6 * moe.gru_dim  # w_i, w_h [h, 3h]; b_i, b_h
    model_router = gru_cell if moe.scorer == "gru" and moe.gru_shared else 0

    def router(cfg: MoEConfig) -> int:
        if cfg.scorer == "gru":  # RMoE: d -> h and h -> E per layer, plus the GRU cell(s)
            return cfg.gru_dim * (d + cfg.num_experts) + (0 if cfg.gru_shared else gru_cell)
        return d * cfg.num_experts

    # each MoE layer with its own expert count and top-k (model.layer_kinds)
    moe_layers = [layer_moe_config(kind, moe) for kind in model.layer_layout if kind.moe]
    n_moe = len(moe_layers)
    n_dense = model.num_layers - n_moe
    embedding = model.vocab_size * d
    head = 0 if model.tie_embeddings else d * model.vocab_size
    common = embedding + head + d + model.num_layers * (attn + norms) + n_dense * dense_ffn
    moe_fixed = sum(shared + router(cfg) for cfg in moe_layers) + (model_router if n_moe else 0)
    total = common + moe_fixed + sum(cfg.num_experts for cfg in moe_layers) * expert
    if experts_per_token is None:
        used = sum(routing_slots(cfg) for cfg in moe_layers)
    else:
        used = n_moe * experts_per_token
    active = common + moe_fixed + round(used * expert)
    if model.tie_embeddings:  # the tied table is also the output projection
        embedding = 0
    return ParamCounts(total=total, active=active, embedding=embedding, routed_expert=expert)


def attention_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """The attention scores and values of one token, forward and backward: 12 L H Q S."""
    return 12 * model.num_layers * model.num_heads * attention_width(model) * seq_len


def train_flops_per_token(
    model: ModelConfig, moe: MoEConfig, seq_len: int, experts_per_token: float | None = None
) -> float:
    counts = count_params(model, moe, experts_per_token)
    return 6.0 * counts.active_matmul + attention_flops_per_token(model, seq_len)
