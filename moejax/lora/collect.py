"""What adapters report to their Transformer block: router aux losses, routing metrics and
expert loads, and what a block hands to its adapters (X-LoRA's scalings).

Adapters sit deep inside `Attention` and `DenseMLP`, whose outputs are arrays; rather than
widening every projection's return value, a `Block` opens a `block_scope()` around its
body, its adapters `report()` into it, and the block returns the collected values as scan
outputs (so they are stacked over layers like the MoE layers' losses). Both happen inside
one trace of the block body, so the values are that trace's arrays; outside a block (a
module applied on its own) reports go nowhere and `context()` is empty.

The block's context holds `token_mask` (real tokens, [B, L]) for the routers' losses and
`xlora_scalings` ([B, L, E] or None). `load` entries are keyed by the reporting module's
scope path ("/"-joined): the path of its variables in the `lora_bias` collection, for the
sign-rule update (`moejax.lora.balance`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax.numpy as jnp

_SCOPES: list[dict[str, Any]] = []


@contextlib.contextmanager
def block_scope(**context) -> Iterator[dict[str, Any]]:
    """Collects the reports of the adapters called inside; `context` is what they read."""
    scope = {"aux": {}, "metrics": {}, "load": {}, "context": context}
    _SCOPES.append(scope)
    try:
        yield scope
    finally:
        _SCOPES.pop()


def context() -> dict[str, Any]:
    return _SCOPES[-1]["context"] if _SCOPES else {}


def report(path: tuple[str, ...], aux: dict, metrics: dict, load=None) -> None:
    if not _SCOPES:
        return
    scope = _SCOPES[-1]
    for name, value in aux.items():
        scope["aux"][name] = scope["aux"].get(name, 0.0) + value
    for name, value in metrics.items():
        if jnp.ndim(value) == 0:  # scalars only: per-expert vectors differ between adapters
            scope["metrics"].setdefault(name, []).append(value)
    if load is not None:
        scope["load"]["/".join(path)] = load


def block_outputs(scope: dict[str, Any]) -> dict[str, Any]:
    """The block's adapter outputs: summed aux losses (`lora_<name>`), metrics averaged over
    the block's adapters, and the loads by path."""
    return {
        "aux": {f"lora_{k}": v for k, v in scope["aux"].items()},
        "metrics": {k: sum(v) / len(v) for k, v in scope["metrics"].items()},
        "load": dict(scope["load"]),
    }
