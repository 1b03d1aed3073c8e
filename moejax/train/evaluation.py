"""Evaluation during training: the validation loss (overall and per domain), MoE metrics,
experts per token per domain and routing stability, over this process's eval batches.

`evaluate` runs the experiment's compiled eval step (`Experiment.eval_fn`) over the
`data.eval_split` batches (at most `train.eval_batches`; all of them when 0) and returns the
`eval/` metrics. On several processes every process runs the same number of steps (an eval
step is a collective): a process that ran out of batches feeds padding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moejax.config.validation import Sections
from moejax.data import DOMAINS, make_batches
from moejax.sharding.partitioning import shard_batch
from moejax.train.metric_format import flatten_metrics
from moejax.train.routing_stability import RoutingStability


def _eval_batches(s: Sections):
    """This process's eval batches, padded so every process runs the same number of steps
    (a multi-host eval step is a collective; a process that ran out feeds padding)."""
    batches = make_batches(s.data, s.data.eval_split, repeat=False)
    i = 0
    while not s.train.eval_batches or i < s.train.eval_batches:
        batch = next(batches, None)
        done = batch is None
        if jax.process_count() > 1:  # stop only once every process has run out
            done = bool(np.all(multihost_utils.process_allgather(np.array(done))))
        if done:
            return
        yield batches.padding_batch() if batch is None else batch
        i += 1


def evaluate(
    eval_fn,
    params,
    s: Sections,
    mesh,
    stability: RoutingStability | None = None,
    collections: Any = None,
) -> dict[str, float]:
    """Loss over the validation batches (overall, per domain), MoE metrics, experts per token
    per domain, and with `stability` the fraction of tokens whose first-choice expert changed
    since the previous call. `collections`: the state's non-trainable collections, if any."""
    totals: dict[str, Any] = {}
    top1 = []
    kw = {} if collections is None else {"collections": collections}
    for batch in _eval_batches(s):
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh, s.mesh.rules), **kw))
        if "top1_expert" in out:
            top1.append(out.pop("top1_expert").reshape(s.model.num_moe_layers, -1))
        totals = out if not totals else jax.tree.map(np.add, totals, out)
    if not totals:
        return {}
    n = float(totals["batches"])
    loss = float(totals["ce_sum"] / max(totals["tokens"], 1.0))
    result = {
        "eval/loss": loss,
        "eval/bits_per_byte": loss / math.log(2),
        "eval/tokens": float(totals["tokens"]),
        "eval/aux_loss": totals["aux_loss_sum"] / n,
    }
    for d, name in enumerate(DOMAINS):
        if totals["domain_tokens"][d] > 0:
            result[f"eval/loss/{name}"] = float(
                totals["domain_ce_sum"][d] / totals["domain_tokens"][d]
            )
    moe = {k: v / n for k, v in totals.items() if k.startswith("moe/")}
    if stability is not None and top1:
        moe.update(stability.update(np.concatenate(top1, axis=1)))
    result.update(flatten_metrics("eval/", moe))
    if "domain_experts_sum" in totals:  # [num_moe_layers, domains]
        per_domain = totals["domain_experts_sum"] / np.maximum(totals["domain_tokens"], 1.0)
        for d, name in enumerate(DOMAINS):
            if totals["domain_tokens"][d] > 0:
                result.update(
                    flatten_metrics("eval/", {f"moe/experts_per_token/{name}": per_domain[:, d]})
                )
    return result
