"""Routers: `(x[T, d], state, mask, shared, seq_len) -> Routing`, one per scorer in `ROUTERS`.

A router is a scorer, which turns hidden states into logits `[T, E]` (and may carry a state
from one MoE layer to the next), followed by the selection rule `SELECTIONS[cfg.selection]`
from `moejax.moe.selection` (softmax_topk, top_p, sigmoid_bias). The two are independent
config fields, `moe.scorer` (a key of `ROUTERS`) and `moe.selection`, so every scorer
composes with every rule:

- `linear`: `LinearRouter`, logits = x W_r (float32), parameter `kernel` [d_model, E].
- `gru`: `GRURouter`, RMoE's layerwise recurrent scorer (`moejax.moe.gru_router`).

A rule that takes a per-expert bias (`sigmoid_bias`, DeepSeek-V3) gets it from the router
module: collection `router_bias`, variable `bias` [E], beside the scorer's parameters. An
apply-time router delta (`moejax.moe.router_delta`: collection `router_delta`, variables
`logits` and `ranks` [E] in the same scope) is added to the scorer's logits and its rank
mask handed to the rule, for every scorer and rule; absent, nothing changes.

A new scorer is one Linen module with the signature of `LinearRouter.__call__` plus one
entry in `ROUTERS`. `seq_len` is the length of the sequences the T tokens form (the layer
passes L of its `x[B, L, d]`), for the sequence-wise balance loss. `shared` holds
model-level router parameters (RMoE's shared GRU cell), passed by the Transformer; None
elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.gru_router import GRUCell, GRURouter
from moejax.moe.router_delta import apply_logits, read_router_delta
from moejax.moe.routing import Routing
from moejax.moe.selection import SELECTIONS, report_bias_load, selection_bias
from moejax.nn.collections import ROUTER_BIAS
from moejax.nn.params import dtype_of, logical_param


class LinearRouter(nn.Module):
    """logits = x W_r in float32, then the config's selection rule; stateless (the
    `sigmoid_bias` rule's bias is a variable of this module, not a routing state).

    `rule` replaces the config's selection rule (same signature; LoRA experts use it for
    DynMoLE's rule) and `bias_collection` names the bias's collection (LoRA routers keep
    theirs apart from the MoE layers', in `lora_bias`, and name their expert axis
    `lora_experts`, which the sharding rules replicate, via `expert_axis`). `read_delta`:
    whether the router reads an apply-time delta (`moejax.moe.router_delta`); the MoE
    layers' routers do, adapter routers (whose rules may take no rank mask) do not."""

    cfg: MoEConfig
    init_std: float = 0.02
    param_dtype: str = "float32"
    rule: Callable | None = None
    bias_collection: str = ROUTER_BIAS
    expert_axis: str = "expert"
    read_delta: bool = True

    @nn.compact
    def __call__(
        self,
        x_TxD: jax.Array,
        state=None,
        mask_T: jax.Array | None = None,
        shared: Any = None,
        seq_len: int | None = None,
    ) -> Routing:
        cfg = self.cfg
        w = logical_param(
            self,
            "kernel",
            (x_TxD.shape[-1], cfg.num_experts),
            ("embed", self.expert_axis),
            self.init_std,
            dtype_of(self.param_dtype),
        )
        logits = x_TxD.astype(jnp.float32) @ w.astype(jnp.float32)
        rule = self.rule or SELECTIONS[cfg.selection]
        bias = selection_bias(self, cfg, self.bias_collection, self.expert_axis)
        delta = read_router_delta(self, cfg.num_experts) if self.read_delta else None
        if delta is None:
            routing = rule(logits, mask_T, cfg, bias, seq_len)
        else:
            routing = rule(apply_logits(logits, delta), mask_T, cfg, bias, seq_len, delta.ranks)
        report_bias_load(self, bias, routing.metrics["load"])
        return routing.replace(state=state)


ROUTERS = {  # scorer name (config.moe.scorer) -> router module
    "linear": LinearRouter,
    "gru": GRURouter,
}


def initial_router_state(cfg: MoEConfig, num_tokens: int) -> Any:
    """The state the first MoE layer's router receives: zeros `[T, gru_dim]` for `gru`
    (PyTorch's GRUCell with no hidden state, as in RMoE), None for stateless routers."""
    if cfg.scorer == "gru":
        return jnp.zeros((num_tokens, cfg.gru_dim), jnp.float32)
    return None


def shared_router_params(cfg: MoEConfig, init_std: float, param_dtype: str) -> Any:
    """Model-level router parameters, created in the caller's scope (None if the router has
    none): RMoE's GRU cell when `gru_shared`."""
    if cfg.scorer == "gru" and cfg.gru_shared:
        return GRUCell(cfg.gru_dim, init_std, param_dtype, name="router_gru")()
    return None
