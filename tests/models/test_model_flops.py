"""`count_params` / `train_flops_per_token` against the initialised parameter tree."""

import dataclasses

import flax.linen as nn
import jax
import numpy_model_reference as ref  # tests/ is on sys.path (pytest.ini)
import pytest

from moejax.models.config import ModelConfig
from moejax.models.flops import count_params, train_flops_per_token
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig

BASE = ModelConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=24)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=8, dispatcher="ragged")

CONFIGS = {
    "dense": (dataclasses.replace(BASE, moe_every=0), MOE),
    "moe_shared": (BASE, dataclasses.replace(MOE, n_shared=2)),
    "tied_top1_mqa": (
        dataclasses.replace(BASE, tie_embeddings=True, num_kv_heads=1),
        dataclasses.replace(MOE, top_k=1),
    ),
    "first_k_dense_every2_head_dim": (
        dataclasses.replace(BASE, num_layers=5, first_k_dense=1, moe_every=2, head_dim=6),
        dataclasses.replace(MOE, n_shared=1),
    ),
    "all_experts_active": (BASE, dataclasses.replace(MOE, top_k=4)),
}


def abstract_params(m, moe):
    return nn.unbox(ref.abstract_variables(Transformer(m, moe)))["params"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_match_initialised_tree(name):
    m, moe = CONFIGS[name]
    params = abstract_params(m, moe)
    counts = count_params(m, moe)
    assert counts.total == ref.tree_size(params)
    n_moe, d = m.num_moe_layers, m.d_model
    inactive = (moe.num_experts - moe.top_k) * 3 * d * moe.d_expert * n_moe
    assert counts.active == counts.total - inactive
    expert_leaves = [
        v
        for path, v in jax.tree_util.tree_leaves_with_path(params)
        if any(getattr(p, "key", None) == "experts" for p in path)
    ]
    assert ref.tree_size(expert_leaves) == counts.routed_expert * moe.num_experts * n_moe
    assert counts.embedding == (0 if m.tie_embeddings else m.vocab_size * d)
    # PaLM: 6 * (matmul params a token uses) + 12 L H Q S; the input table is a lookup
    # unless it doubles as the output projection.
    seq = 16
    matmul = counts.total - inactive - (0 if m.tie_embeddings else params["embedding"].size)
    want = 6 * matmul + 12 * m.num_layers * m.num_heads * m.resolved_head_dim * seq
    assert train_flops_per_token(m, moe, seq) == want


def test_dense_count_by_hand():
    m, moe = CONFIGS["dense"]
    # per layer: attention 16*4*(2*4 + 2*2) = 768, two norms 32, SwiGLU 3*16*24 = 1152;
    # embedding 50*16 = 800, lm_head 800, final norm 16.
    want = 2 * (768 + 32 + 1152) + 800 + 800 + 16
    assert count_params(m, moe).total == count_params(m, moe).active == want == 5520
    assert train_flops_per_token(m, moe, 10) == 6 * (5520 - 800) + 12 * 2 * 4 * 4 * 10


def test_moe_active_count_by_hand():
    m, moe = CONFIGS["moe_shared"]  # 2 MoE layers, 4 experts (2 active), 2 shared of width 8
    expert = 3 * 16 * 8
    per_layer_fixed = 768 + 32 + 2 * expert + 16 * 4  # attention, norms, shared, router
    counts = count_params(m, moe)
    assert counts.total == 2 * (per_layer_fixed + 4 * expert) + 800 + 800 + 16
    assert counts.active == 2 * (per_layer_fixed + 2 * expert) + 800 + 800 + 16
    assert counts.active_matmul == counts.active - 800
    # Top-p routing: the measured mean number of experts replaces top_k in the active count.
    measured = count_params(m, moe, experts_per_token=1.5)
    assert measured.total == counts.total
    assert measured.active == 2 * (per_layer_fixed + 1.5 * expert) + 800 + 800 + 16
    assert (
        train_flops_per_token(m, moe, 10) - train_flops_per_token(m, moe, 10, experts_per_token=1.5)
        == 6 * 2 * 0.5 * expert
    )
