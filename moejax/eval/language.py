"""Per-source loss and bits per byte of a model over held-out batches, and the expert
usage counts of the same pass.

The loss is the trainer's (`moejax.train.step.token_losses`: the model's cross-entropy per
token, masked by `loss_mask`), summed per evaluation domain (`moejax.data.domain_names`: one
per source, the offline corpus's three). Bits per byte, as the trainer's evaluation
(`moejax.train.evaluation`; Gao et al. 2020, The Pile, section 5): the summed loss in nats /
ln 2 / the UTF-8 bytes the scored target tokens decode to (`Tokenizer.token_bytes`). The
routing of every MoE layer is the one the layers returned in the same forward pass
(`MoEOutput.per_token`), counted per expert over the real tokens
(`moejax.eval.usage.count_assignments`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.eval.usage import count_assignments
from moejax.train.step import token_losses


def forward_fn(model):
    """jit((variables, batch) -> (per-token loss [B, L], expert_ids, combine_weights
    [n_moe, B, L, k] or None))."""

    def forward(variables, batch):
        params = variables["params"]
        collections = {k: v for k, v in variables.items() if k != "params"} or None
        ce, extras = token_losses(model, params, batch, collections)
        routing = extras["routing"]
        if not routing:
            return ce, None, None
        return ce, routing["expert_ids"], routing["combine_weights"]

    return jax.jit(forward)


def moe_expert_counts(model) -> list[int]:
    """The expert count of each MoE layer, in order."""
    m, moe = model.model, model.moe
    return [kind.num_experts or moe.num_experts for kind in m.layer_layout if kind.moe]


def language_modelling(
    model,
    variables,
    batches: Iterable[dict[str, np.ndarray]],
    domains: tuple[str, ...],
    token_bytes: np.ndarray,
    forward=None,
) -> dict:
    """{"loss", "bits_per_byte", "tokens", "bytes", "sources": {domain: the same},
    "counts": [int64[E_l] per MoE layer]} over `batches` (module docstring)."""
    forward = forward or forward_fn(model)
    n = len(domains)
    ce_sum, tokens, nbytes = np.zeros(n), np.zeros(n), np.zeros(n)
    experts = moe_expert_counts(model)
    counts = [np.zeros(e, np.int64) for e in experts]
    token_bytes = np.asarray(token_bytes, np.float64)
    for batch in batches:
        device = {k: jnp.asarray(v) for k, v in batch.items()}
        ce, ids, weights = jax.device_get(forward(variables, device))
        mask = batch["loss_mask"] > 0
        d = np.where(batch["domains"] >= 0, batch["domains"], 0)[mask]
        ce_sum += np.bincount(d, weights=np.asarray(ce, np.float64)[mask], minlength=n)[:n]
        tokens += np.bincount(d, minlength=n)[:n]
        nbytes += np.bincount(d, weights=token_bytes[batch["targets"][mask]], minlength=n)[:n]
        if ids is not None:
            real = batch["segment_ids"] > 0
            for layer, e in enumerate(experts):
                counts[layer] += count_assignments(ids[layer], weights[layer], real, e)
    result = _summary(ce_sum.sum(), tokens.sum(), nbytes.sum())
    result["sources"] = {
        name: _summary(ce_sum[i], tokens[i], nbytes[i])
        for i, name in enumerate(domains)
        if tokens[i]
    }
    result["counts"] = counts
    return result


def bits_per_byte(ce_sum: float, num_bytes: float) -> float:
    """Summed loss in nats -> bits per UTF-8 byte (nan without bytes)."""
    return float(ce_sum) / math.log(2) / float(num_bytes) if num_bytes > 0 else float("nan")


def _summary(ce_sum: float, tokens: float, nbytes: float) -> dict:
    return {
        "loss": float(ce_sum / tokens) if tokens else float("nan"),
        "bits_per_byte": bits_per_byte(ce_sum, nbytes),
        "tokens": int(tokens),
        "bytes": int(nbytes),
    }
