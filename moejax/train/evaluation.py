"""Evaluation during training: the validation loss and bits per byte (overall and per
domain), tokens per byte, MoE metrics, experts per token per domain and routing stability,
over this process's held-out batches.

`evaluate` runs the experiment's compiled eval step (`Experiment.eval_fn`) over every
source's held-out documents (at most `train.eval_batches` batches per source; all of them
when 0) and returns the `eval/` metrics. The domains are `moejax.data.domain_names`: one
per source, the offline corpus's three. On several processes every process runs the same
number of steps (an eval step is a collective): a process that ran out feeds padding.
Only the sums come back to the host (replicated, so every process reads them); the
per-token top-1 experts that routing stability compares stay on the devices, split like
the batches (`moejax.train.routing_stability`).

Bits per byte is comparable across tokenizers: the summed token loss / ln 2 / the UTF-8
bytes the target tokens decode to (`Tokenizer.token_bytes`; special tokens such as EOS
count their loss and no bytes), as in the bits-per-byte of Gao et al. 2020 (The Pile, §5).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moejax.config.validation import Sections
from moejax.data import domain_names, make_batches, open_tokenizer
from moejax.sharding.partitioning import batch_sharding, shard_batch
from moejax.train.metric_format import flatten_metrics
from moejax.train.routing_stability import RoutingStability, minus_ones, top1_dtype


def _eval_batches(s: Sections):
    """This process's eval batches, padded so every process runs the same number of steps
    (a multi-host eval step is a collective; a process that ran out feeds padding)."""
    batches = make_batches(s.data, s.data.eval_split, max_eval_batches=s.train.eval_batches)
    while True:
        batch = next(batches, None)
        done = batch is None
        if jax.process_count() > 1:  # stop only once every process has run out
            done = bool(np.all(multihost_utils.process_allgather(np.array(done))))
        if done:
            return
        yield batches.padding_batch() if batch is None else batch


def bytes_per_domain(batch: dict[str, np.ndarray], token_bytes: np.ndarray, n: int) -> np.ndarray:
    """UTF-8 bytes of the scored targets of `batch`, per domain, then those of rows with no
    corpus domain (-1: the generated tasks), which count only in the total: float64[n + 1]."""
    scored = batch["loss_mask"] > 0
    counts = token_bytes[batch["targets"][scored]]
    domains = batch["domains"][scored]
    return np.bincount(np.where(domains >= 0, domains, n), weights=counts, minlength=n + 1)


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
    kw = {} if collections is None else {"collections": collections}
    domains = domain_names(s.data)
    token_bytes = np.asarray(open_tokenizer(s.data).token_bytes, np.float64)
    domain_bytes = np.zeros(len(domains) + 1)  # and the rows of no domain
    top1_sharding = batch_sharding(mesh, s.mesh.rules, lead=1)
    if stability is not None:
        stability.start()
    for batch in _eval_batches(s):
        domain_bytes += bytes_per_domain(batch, token_bytes, len(domains))
        sharded = shard_batch(batch, mesh, s.mesh.rules)
        previous = None
        if s.model.num_moe_layers:  # the top-1 experts stay on the devices, split over B
            like = jax.ShapeDtypeStruct(
                (s.model.num_moe_layers,) + sharded["inputs"].shape,
                top1_dtype(s.moe.num_experts),
                sharding=top1_sharding,
            )
            previous = minus_ones(like) if stability is None else stability.previous(like)
        sums, top1 = eval_fn(params, sharded, previous, **kw)
        if stability is not None and top1 is not None:
            stability.add(top1)
        out = jax.device_get(sums)  # replicated: every process reads the whole sums
        out = jax.tree.map(lambda x: x.astype(np.int64) if x.dtype.kind == "i" else x, out)
        totals = out if not totals else jax.tree.map(np.add, totals, out)
    if not totals:
        return {}
    if jax.process_count() > 1:  # every process scored its own share of the bytes
        domain_bytes = np.sum(multihost_utils.process_allgather(domain_bytes), axis=0)
    n = float(totals["batches"])
    loss = float(totals["ce_sum"] / max(totals["tokens"], 1.0))
    total_bytes = float(domain_bytes.sum())
    result = {
        "eval/loss": loss,
        "eval/bits_per_byte": _bits_per_byte(totals["ce_sum"], total_bytes),
        "eval/tokens_per_byte": float(totals["tokens"]) / max(total_bytes, 1.0),
        "eval/tokens": float(totals["tokens"]),
        "eval/bytes": total_bytes,
        "eval/aux_loss": totals["aux_loss_sum"] / n,
    }
    for d, name in enumerate(domains):
        tokens = float(totals["domain_tokens"][d])
        if tokens > 0:
            result[f"eval/loss/{name}"] = float(totals["domain_ce_sum"][d] / tokens)
            result[f"eval/bits_per_byte/{name}"] = _bits_per_byte(
                totals["domain_ce_sum"][d], domain_bytes[d]
            )
            result[f"eval/tokens_per_byte/{name}"] = tokens / max(float(domain_bytes[d]), 1.0)
    moe = {k: v / n for k, v in totals.items() if k.startswith("moe/")}
    if stability is not None and "top1_changed" in totals:
        moe.update(stability.finish(totals["top1_changed"], totals["top1_compared"]))
    result.update(flatten_metrics("eval/", moe))
    if "domain_experts_sum" in totals:  # [num_moe_layers, domains]
        per_domain = totals["domain_experts_sum"] / np.maximum(totals["domain_tokens"], 1.0)
        for d, name in enumerate(domains):
            if totals["domain_tokens"][d] > 0:
                result.update(
                    flatten_metrics("eval/", {f"moe/experts_per_token/{name}": per_domain[:, d]})
                )
    return result


def _bits_per_byte(ce_sum: float, num_bytes: float) -> float:
    """Summed loss in nats -> bits per UTF-8 byte (nan when there are no bytes)."""
    return float(ce_sum) / math.log(2) / float(num_bytes) if num_bytes > 0 else float("nan")
