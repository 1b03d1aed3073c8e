"""`Routing`: what a router decides for a flat batch of T tokens, as a pytree.

The one routing record: the selection rules of `moejax.moe.selection` (GShard/Switch
top-k, top-p dynamic routing, DeepSeek-V3's biased sigmoid; see that module for the
papers and equations) return it with `state` None, and a router sets its own state on it
(`Routing.replace(state=...)`); the dispatchers and the LoRA expert gates read it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class Routing:
    """Top-k routing decision for T tokens.

    expert_ids: int32[T, k]; combine_weights: [T, k] (zero weight = slot unused, e.g. top-p
    padding); aux_losses: name -> scalar already multiplied by its coefficient, summed into
    the training loss; metrics: name -> array, logged; state: the router's recurrent state
    carried to the next MoE layer (None for stateless routers); token_entropy: float32[T],
    each token's entropy (nats) of the router's probabilities (set by the selection rules;
    None for gates without a distribution over experts), read by routing traces
    (`moejax.analysis.trace`).
    """

    expert_ids: jax.Array
    combine_weights: jax.Array
    aux_losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    state: Any = None
    token_entropy: jax.Array | None = None
