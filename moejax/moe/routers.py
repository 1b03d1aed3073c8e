"""Routers: `(x[T, d], state, mask) -> Routing`, registered by name in `ROUTERS`.

A new router is one Linen module with the signature of `SoftmaxTopKRouter.__call__` plus one
entry in `ROUTERS`; `config.moe.router` picks it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.layers import dtype_of, logical_param
from moejax.moe.config import MoEConfig
from moejax.moe.losses import router_z_loss, routing_metrics, switch_balance_loss
from moejax.moe.routing import Routing


class SoftmaxTopKRouter(nn.Module):
    """Softmax top-k gating: GShard (Lepikhin et al., 2020), Switch (Fedus et al., 2021),
    Mixtral (Jiang et al., 2024).

    logits = x W_r (float32), p = softmax(logits), the k largest p_i are selected; with
    `renormalize` the selected weights are divided by their sum (Mixtral), otherwise they are
    the raw probabilities (GShard/DeepSeekMoE). Aux losses: Switch balance * balance_coef and
    router z-loss * z_loss_coef (each omitted when its coefficient is 0).
    """
    cfg: MoEConfig
    init_std: float = 0.02
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x_TxD: jax.Array, state=None, mask_T: jax.Array | None = None) -> Routing:
        cfg = self.cfg
        w = logical_param(self, "kernel", (x_TxD.shape[-1], cfg.num_experts), ("embed", "expert"),
                          self.init_std, dtype_of(self.param_dtype))
        logits = x_TxD.astype(jnp.float32) @ w.astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = jax.lax.top_k(probs, cfg.top_k)
        if cfg.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        if mask_T is not None:  # padding tokens get zero weight: they take no capacity
            weights = weights * mask_T[:, None].astype(weights.dtype)
        balance = switch_balance_loss(probs, ids, mask_T)
        z = router_z_loss(logits, mask_T)
        aux = {}
        if cfg.balance_coef:
            aux["balance"] = cfg.balance_coef * balance
        if cfg.z_loss_coef:
            aux["z_loss"] = cfg.z_loss_coef * z
        metrics = routing_metrics(probs, ids, weights, mask_T)
        metrics.update(balance_loss=balance, z_loss=z)
        return Routing(expert_ids=ids.astype(jnp.int32), combine_weights=weights,
                       aux_losses=aux, metrics=metrics, state=state)


ROUTERS = {
    "softmax_topk": SoftmaxTopKRouter,
}
