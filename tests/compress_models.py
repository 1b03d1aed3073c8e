"""Tiny MoE models for the tests of `moejax.compress` (not a test module)."""

import jax
import numpy as np
from testing_utils import random_variables

from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig


def tiny_model(layer_kinds="moe,dense,moe", seed=0, **moe):
    """A 3-layer model (d_model 16) with 2 MoE layers and a shared expert, random weights."""
    m = ModelConfig(
        vocab_size=64,
        d_model=16,
        num_layers=len(layer_kinds.split(",")),
        num_heads=2,
        num_kv_heads=2,
        d_ff=32,
        layer_kinds=layer_kinds,
    )
    cfg = dict(num_experts=8, top_k=2, d_expert=8, n_shared=1, renormalize=True)
    cfg.update(dispatcher="dense_reference", **moe)
    model = Transformer(m, MoEConfig(**cfg))
    return model, random_variables(model, seed)


def tiny_batch(seed=0, b=2, length=8):
    """Random tokens; the last two positions of row 1 are padding."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, 64, (b, length)).astype(np.int32)
    segment_ids = np.ones((b, length), np.int32)
    segment_ids[-1, -2:] = 0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions}


def logits_and_routing(model, variables, batch):
    logits, extras = jax.jit(model.apply)(
        variables, batch["inputs"], batch["segment_ids"], batch["positions"]
    )
    routing = extras["routing"]
    return (
        np.asarray(logits),
        np.asarray(routing["expert_ids"]),
        np.asarray(routing["combine_weights"]),
    )
