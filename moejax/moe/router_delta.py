"""`RouterDelta`: a router's decision changed at apply time, read from the `router_delta`
collection (`moejax.nn.collections.ROUTER_DELTA`).

Decoding-time routing methods (`moejax.generate`: SCMoE's weak pass, C3PO's re-mixing,
rewiring on the fly) all change routing through this one record, and every selection rule
of `moejax.moe.selection` accepts it, for every scorer:

- `logits` `[E]` (or `[T, E]` for a pass of fixed T tokens) is added to the scorer's logits
  before the selection rule, so it moves the probabilities, the choice and the combine
  weights exactly as a change of the router's output would; `-inf` forbids an expert (it
  is never chosen while another may be, and gets weight 0 when it is).
- `ranks` `[E]`: `ranks[j] > 0` lets a token take the expert its rule ranks j-th (0-based,
  by the rule's own choice scores: probabilities, or DeepSeek-V3's biased scores); the
  others are forbidden. SCMoE's rank-r routing is `ranks = one_hot(r - 1)`: the rule's
  r-th choice alone, weighted as the rule weights it (renormalised over the kept slot when
  `renormalize`, else its probability), as in the reference code of Shi et al. (2024).

Absent collection (training, plain decoding): `read_router_delta` returns None, the rules
run exactly as before and nothing is created. Building a delta tree: apply the model with
`mutable=["router_delta"]` (outside `init`), which creates every router's variables,
`logits` zeros and `ranks` ones, stacked over scanned layers like the parameters
(`moejax.generate.routing.zero_delta`).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax.nn.collections import ROUTER_DELTA


@flax.struct.dataclass
class RouterDelta:
    """`logits` [E] or [T, E] added to the router logits; `ranks` [E], 1 = the rule's j-th
    ranked choice may be taken (module docstring)."""

    logits: jax.Array
    ranks: jax.Array


def read_router_delta(module: nn.Module, num_experts: int) -> RouterDelta | None:
    """The delta of the router `module` from the `router_delta` collection; None when the
    collection holds nothing for it and is not being built (module docstring). A missing
    half is neutral: zero logits, every rank allowed."""
    if module.is_initializing():
        return None
    building = module.is_mutable_collection(ROUTER_DELTA)
    has = {name: module.has_variable(ROUTER_DELTA, name) for name in ("logits", "ranks")}
    if not (building or any(has.values())):
        return None
    shape = (num_experts,)
    if building or has["logits"]:
        logits = module.variable(ROUTER_DELTA, "logits", jnp.zeros, shape, jnp.float32).value
    else:
        logits = jnp.zeros(shape, jnp.float32)
    if building or has["ranks"]:
        ranks = module.variable(ROUTER_DELTA, "ranks", jnp.ones, shape, jnp.float32).value
    else:
        ranks = jnp.ones(shape, jnp.float32)
    return RouterDelta(logits=logits, ranks=ranks)


def apply_logits(logits: jax.Array, delta: RouterDelta | None) -> jax.Array:
    """The scorer's logits `[T, E]` plus the delta's (unchanged without a delta)."""
    if delta is None:
        return logits
    return logits + delta.logits.astype(logits.dtype)
