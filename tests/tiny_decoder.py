"""The tiny MoE model the decoding-time routing tests share (tests/models/test_scmoe.py,
test_rewire.py, test_c3po.py): two MoE layers of different expert counts and top-k, a
per-layer layout (`runs_0`, `runs_1`), on the quick-to-compile `dense_reference` dispatcher
(every dispatcher equals it)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig

MODEL = ModelConfig(
    vocab_size=24,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    d_ff=16,
    layer_kinds="moe,moe:e=6:k=3",
    init_std=0.5,
)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=8, dispatcher="dense_reference")
PROMPT = np.array([[3, 7, 1], [5, 2, 9]])


@functools.cache
def tiny_decoder() -> tuple[Transformer, dict]:
    """(model, variables), initialised once per test process."""
    model = Transformer(MODEL, MOE)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(2), jnp.asarray(PROMPT)))
    return model, variables
