"""The registry of LoRA methods: `METHODS[lora.method]` is the class that does what the
method changes (`moejax.lora.method.LoRAMethod`). Adding a method is one class here (or in
its own module), one line in `METHODS` and one reference test.

- `lora`: plain LoRA (Hu et al., 2021, arXiv 2106.09685), E static experts with gate 1.
- `moe`: experts routed per token by a `moejax.moe.routers.LinearRouter` with a moejax
  selection rule or DynMoLE's (`moejax.lora.routing.dynmole`), mixed along the rank axis
  (`dispatcher="none"`) or by one of moejax's MoE dispatchers (MoLA, LLaVA-MoLE, LoRAMoE,
  HydraLoRA, SMoRA, DynMoLE; `moejax.lora.variants`).
- `flylora`: FlyLoRA (Zou et al., 2025, NeurIPS; gfyddha/FlyLoRA): frozen sparse random A
  as the implicit router, top-k of |A x + d| with binary gates, d in `lora_bias`.
- `xlora`, `sora`, `mixlora`: `moejax.lora.xlora`, `moejax.lora.sora`, `moejax.lora.mixlora`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig
from moejax.lora.method import LoRAMethod, require
from moejax.lora.mixlora import MixLoRA
from moejax.lora.routing import dense_gates, dynmole, flylora, router_config
from moejax.lora.sora import SoRA
from moejax.lora.weights import AXES_A, sparse_random_a
from moejax.lora.xlora import XLoRA
from moejax.moe.dispatch import dispatch
from moejax.moe.experts import ExpertFn
from moejax.moe.routers import LinearRouter
from moejax.nn.collections import ADAPTER_BIAS, ADAPTER_FROZEN, BALANCE_LOAD, sow_value


class RoutedLoRA(LoRAMethod):
    """`moe`: a linear router per adapter (its `sigmoid_bias` bias in `lora_bias`)."""

    def check(self, cfg):
        # Any dispatcher, and MoLA's per-layer expert counts, apply.
        require(
            not cfg.renormalize or cfg.router != "dynmole",
            "lora.renormalize=True does not apply to lora.router='dynmole' (DynMoLE keeps the "
            "raw probabilities); set lora.renormalize=False.",
        )

    def gates(self, adapter, cfg, x, h, mask, context):
        rule = functools.partial(dynmole, lo=cfg) if cfg.router == "dynmole" else None
        routing = LinearRouter(
            router_config(cfg, cfg.num_experts),
            param_dtype=adapter.param_dtype,
            rule=rule,
            bias_collection=ADAPTER_BIAS,
            expert_axis="lora_experts",
            read_delta=False,
            name="router",
        )(x, mask_T=mask)
        return dense_gates(routing, cfg.num_experts), routing

    def mix(self, cfg, x, h, gates, routing, a, b):
        if cfg.dispatcher == "none":
            return super().mix(cfg, x, h, gates, routing, a, b)
        fn = ExpertFn(lambda w, xs, mm: mm(mm(xs, w["a"]), w["b"]), {"a": a, "b": b})
        y, _ = dispatch(x, routing, fn, router_config(cfg, cfg.num_experts))
        return y


class FlyLoRA(LoRAMethod):
    """`flylora` (module docstring): A in `lora_frozen`, the bias d in `lora_bias`."""

    def gate_slots(self, cfg):
        return (
            cfg.num_experts * cfg.rank,
            f"lora.num_experts={cfg.num_experts} * lora.rank (FlyLoRA activates ranks)",
        )

    def make_a(self, adapter, cfg, shape, param_dtype):
        density = cfg.flylora_density or cfg.top_k / (cfg.num_experts * cfg.rank)
        init = nn.with_logical_partitioning(
            lambda: sparse_random_a(adapter.make_rng("params"), shape, density, param_dtype),
            AXES_A,
        )
        return adapter.variable(ADAPTER_FROZEN, "a", init).value

    def gates(self, adapter, cfg, x, h, mask, context):
        slots = cfg.num_experts * cfg.rank
        init = nn.with_logical_partitioning(jnp.zeros, ("lora_experts",))
        bias = adapter.variable(ADAPTER_BIAS, "bias", init, (slots,), jnp.float32).value
        routing = flylora(jax.lax.stop_gradient(h.reshape(h.shape[0], -1)), bias, cfg.top_k, mask)
        sow_value(adapter, BALANCE_LOAD, "bias", routing.metrics["load"])
        return dense_gates(routing, slots), routing


METHODS: dict[str, LoRAMethod] = {
    "lora": LoRAMethod(),
    "moe": RoutedLoRA(),
    "flylora": FlyLoRA(),
    "xlora": XLoRA(),
    "sora": SoRA(),
    "mixlora": MixLoRA(),
}


def method_of(cfg: LoRAConfig) -> LoRAMethod:
    """The class of `cfg.method` (validation has checked the name)."""
    return METHODS[cfg.method]
