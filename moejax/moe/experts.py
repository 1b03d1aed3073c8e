"""Routed experts: E SwiGLU MLPs stored stacked, `W_gate, W_up: [E, d, f]`, `W_down: [E, f, d]`.

The module returns an *expert function* `expert_fn(x_plan, mm)`: the SwiGLU written against
a grouped-matmul callable `mm(lhs, w[E, K, N])` supplied by the dispatcher. Each dispatch
plan lays tokens out its own way (`[E, T, d]` broadcast, `[E, C, d]` capacity buffers,
`[M, d]` expert-sorted rows) and brings the matching `mm`; the expert math is written once.
LoRA experts (`moejax.lora`) provide the same kind of function.

LoRA on the routed experts themselves (`adapters.expert_lora`, targets `experts.w_gate|
w_up|w_down`): each expert e of an adapted weight W gets its own `A_e [d_in, r]`,
`B_e [r, d_out]` and computes `x W_e + s (x A_e) B_e`, the low-rank path running through the
dispatcher's own grouped matmul on the same rows (`mm(mm(x, A), B)`), so its cost grows with
the routed rows (tokens x k), not with E, and every dispatcher, expert parallelism included,
splits it with the experts (the factors are `[E, ...]` leaves of the `ExpertFn`'s weights).

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

from moejax.moe.expert_layout import spread_init
from moejax.moe.quantized_gmm import is_qarray
from moejax.nn.adapter_hook import AdapterHook
from moejax.nn.params import dtype_of

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
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    dtype=jnp.float32,
    lora: dict[str, tuple[jax.Array, jax.Array, float]] | None = None,
    fuse_gate_up: bool = False,
) -> ExpertFn:
    """SwiGLU over a dispatch plan: silu(mm(x, W_gate)) * mm(x, W_up), then mm(., W_down);
    `lora[name] = (a[E, d_in, r], b[E, r, d_out], s)` adds `s mm(mm(x, a), b)` to that
    projection (module docstring). `fuse_gate_up`: the gate and up projections run as one
    grouped matmul on `[W_gate | W_up]` (`[E, d, 2f]`, concatenated inside the step; one
    kernel launch and a twice-wider N for the tiles, `moe.fuse_gate_up`); integer (qwix)
    weights keep two products."""
    lora = lora or {}
    scales = {name: s for name, (_, _, s) in lora.items()}

    def fn(w, x: jax.Array, mm: MatmulFn) -> jax.Array:
        def low_rank(name, inputs):
            a, b = w[f"lora_{name}"]
            return scales[name] * mm(mm(inputs, a.astype(dtype)), b.astype(dtype))

        def proj(name, inputs):
            y = mm(inputs, w[name].astype(dtype))
            return y + low_rank(name, inputs) if name in scales else y

        x = x.astype(dtype)
        if fuse_gate_up and not any(is_qarray(w[n]) for n in ("w_gate", "w_up")):
            stacked = jnp.concatenate([w["w_gate"], w["w_up"]], axis=-1).astype(dtype)
            gate, up = jnp.split(mm(x, stacked), 2, axis=-1)
            gate = gate + low_rank("w_gate", x) if "w_gate" in scales else gate
            up = up + low_rank("w_up", x) if "w_up" in scales else up
        else:
            gate, up = proj("w_gate", x), proj("w_up", x)
        return proj("w_down", nn.silu(gate) * up)

    weights = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    weights.update({f"lora_{name}": (a, b) for name, (a, b, _) in lora.items()})
    return ExpertFn(fn, weights)


def _rows_param(module, name, shape, axes, std, dtype, num_experts):
    """A normal(std) `[R, ...]` expert parameter drawn for `num_experts` experts and spread
    over the R stored rows (`moejax.moe.expert_layout.spread_init`)."""
    init = spread_init(nn.initializers.normal(stddev=std), num_experts)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RoutedExperts(nn.Module):
    num_experts: int
    d_model: int
    d_expert: int
    init_std: float = 0.02
    out_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapters: AdapterHook | None = None  # LoRA on the experts (`AdapterHook.expert_lora`)
    fuse_gate_up: bool = False  # `moe.fuse_gate_up` (swiglu_expert_fn)
    # stored rows R >= num_experts (`moejax.moe.expert_layout.stored_rows`); 0 = num_experts
    num_rows: int = 0

    @nn.compact
    def __call__(self) -> ExpertFn:
        e, d, f = self.num_rows or self.num_experts, self.d_model, self.d_expert
        pdt = dtype_of(self.param_dtype)
        n = self.num_experts
        w_gate = _rows_param(
            self, "w_gate", (e, d, f), ("expert", "embed", "mlp"), self.init_std, pdt, n
        )
        w_up = _rows_param(
            self, "w_up", (e, d, f), ("expert", "embed", "mlp"), self.init_std, pdt, n
        )
        w_down = _rows_param(
            self, "w_down", (e, f, d), ("expert", "mlp", "embed"), self.out_std, pdt, n
        )
        lora = None
        if self.adapters is not None:
            shapes = {"w_gate": (e, d, f), "w_up": (e, d, f), "w_down": (e, f, d)}
            lora = self.adapters.expert_lora(self, shapes, self.param_dtype)
        return swiglu_expert_fn(w_gate, w_up, w_down, dtype_of(self.dtype), lora, self.fuse_gate_up)
