"""Routed experts: E SwiGLU MLPs stored stacked, `W_gate, W_up: [E, d, f]`, `W_down: [E, f, d]`.

The module returns an *expert function* `expert_fn(x_plan, mm)`: the SwiGLU written against
a grouped-matmul callable `mm(lhs, w[E, K, N])` supplied by the dispatcher. Each dispatch
plan lays tokens out its own way (`[E, T, d]` broadcast, `[E, C, d]` capacity buffers,
`[M, d]` expert-sorted rows) and brings the matching `mm`; the expert math is written once.
LoRA experts (`moejax.lora`) provide the same kind of function.

An `ExpertFn` keeps its weights apart from its math (`fn(weights, x_plan, mm)`, every weight
leaf stacked `[E, ...]` along axis 0) so sharded dispatchers (`expert_parallel`, `fssdp`) can
pass them into `shard_map` with their own specs and call `fn` on their local experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.nn.params import dtype_of, logical_param

MatmulFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ExpertFn:
    """`fn(weights, x_plan, mm) -> y_plan` with its `weights` (a pytree of `[E, ...]` leaves).

    Calling it, `expert_fn(x_plan, mm)`, runs `fn` on all E experts; a dispatcher that holds
    only some experts slices `weights` along axis 0 and calls `fn` itself.
    """

    fn: Callable[[Any, jax.Array, MatmulFn], jax.Array]
    weights: Any

    def __call__(self, x: jax.Array, mm: MatmulFn) -> jax.Array:
        return self.fn(self.weights, x, mm)


def swiglu_expert_fn(
    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, dtype=jnp.float32
) -> ExpertFn:
    """SwiGLU over a dispatch plan: silu(mm(x, W_gate)) * mm(x, W_up), then mm(., W_down)."""

    def fn(w, x: jax.Array, mm: MatmulFn) -> jax.Array:
        x = x.astype(dtype)
        h = nn.silu(mm(x, w["w_gate"].astype(dtype))) * mm(x, w["w_up"].astype(dtype))
        return mm(h, w["w_down"].astype(dtype))

    return ExpertFn(fn, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})


class RoutedExperts(nn.Module):
    num_experts: int
    d_model: int
    d_expert: int
    init_std: float = 0.02
    out_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self) -> ExpertFn:
        e, d, f = self.num_experts, self.d_model, self.d_expert
        pdt = dtype_of(self.param_dtype)
        w_gate = logical_param(
            self, "w_gate", (e, d, f), ("expert", "embed", "mlp"), self.init_std, pdt
        )
        w_up = logical_param(
            self, "w_up", (e, d, f), ("expert", "embed", "mlp"), self.init_std, pdt
        )
        w_down = logical_param(
            self, "w_down", (e, f, d), ("expert", "mlp", "embed"), self.out_std, pdt
        )
        return swiglu_expert_fn(w_gate, w_up, w_down, dtype_of(self.dtype))
