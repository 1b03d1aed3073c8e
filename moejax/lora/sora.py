"""SoRA: sparse low-rank adaptation with a gated rank (Ding et al., 2023, "Sparse Low-rank
Adaptation of Pre-trained Language Models", EMNLP; reference code TsinghuaC3I/SoRA).

The adapter is `s * B (g * A x)` with a gate `g[r]` (parameter `gate` of each `lora_*`
adapter, initialised to 1). After every optimizer step the gate takes a proximal step of
the L1 penalty `lambda * |g|_1`, a soft threshold at eta_t * lambda (eta_t the step's
learning rate, lambda `lora.sora_lambda`):

    g <- sign(g) * max(|g| - eta_t * lambda, 0)

so ranks whose gate reaches 0 stop contributing; after training `prune` drops them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax.lora.config import LoRAConfig
from moejax.lora.method import LoRAMethod
from moejax.lora.targets import is_adapter_path


def soft_threshold(g: jax.Array, threshold) -> jax.Array:
    return jnp.sign(g) * jnp.maximum(jnp.abs(g) - threshold, 0.0)


def _is_gate(path) -> bool:
    keys = [getattr(p, "key", p) for p in path]
    return is_adapter_path(path) and keys[-1] == "gate"


def proximal_step(params: Any, threshold) -> Any:
    """Soft-thresholds every SoRA gate of `params` (other leaves unchanged)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: soft_threshold(x, threshold).astype(x.dtype) if _is_gate(p) else x, params
    )


def prune(params: Any) -> tuple[Any, dict[str, int]]:
    """Drops the zero-gate ranks of every SoRA adapter (outside jit).

    Unscanned params (`moejax.models.transformer.unscan_params`; `model.scan_layers=False`)
    get each layer's own rank. Scanned params stack a layer axis (or two, inside MoE
    periods) in front of every leaf, `gate[L, r]`, and the layers of a stack share one
    rank: a rank is dropped where its gate is zero in every layer of the stack.

    Returns the pruned params (`a[..., E, d_in, r']`, `b[..., E, r', d_out]`,
    `gate[..., r']`) and each adapter's remaining rank by path. The pruned adapter computes
    the same delta.
    """
    flat = traverse_util.flatten_dict(params)
    ranks = {}
    out = dict(flat)
    for key, gate in flat.items():
        if key[-1] != "gate" or not is_adapter_path(key):
            continue
        gate = np.asarray(gate)
        stacked = gate.ndim - 1  # leading layer axes of a scanned stack
        keep = np.flatnonzero((gate != 0).reshape(-1, gate.shape[-1]).any(axis=0))
        module = key[:-1]
        out[module + ("gate",)] = np.take(gate, keep, axis=-1)
        out[module + ("a",)] = np.take(np.asarray(flat[module + ("a",)]), keep, axis=-1)
        out[module + ("b",)] = np.take(np.asarray(flat[module + ("b",)]), keep, axis=stacked + 1)
        ranks["/".join(module)] = int(keep.size)
    return traverse_util.unflatten_dict(out), ranks


class SoRA(LoRAMethod):
    """`sora`: the rank gate `gate[r]` (ones) on h = A x, its proximal step after each
    optimizer step, and no weight decay on it (the L1 step is its regulariser)."""

    def gate_ranks(self, adapter, h, param_dtype, dtype):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("lora_rank",))
        return h * adapter.param("gate", init, (h.shape[-1],), param_dtype).astype(dtype)

    def post_update(self, cfg: LoRAConfig, params: Any, learning_rate) -> Any:
        return proximal_step(params, learning_rate * cfg.sora_lambda)

    def decays(self, names: list[str]) -> bool:
        return names[-1] != "gate"
