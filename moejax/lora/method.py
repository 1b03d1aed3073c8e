"""`LoRAMethod`: what one LoRA method decides, and plain LoRA as its default.

Every method computes `y = W x + s * B (expand(g(x), r) * A x)` (`moejax.lora.config`): E
experts of rank r on the rank axis, gated by g. A method is one small class that overrides
the steps it changes; `moejax.lora.methods.METHODS` registers them by `lora.method`:

- `make_a`: the A matrix (a trainable parameter; FlyLoRA: frozen and sparse);
- `gates`: g[T, E] and the `Routing` it came from (None, None: every gate 1);
- `gate_ranks`: a transform of h = A x before mixing (SoRA's rank gate);
- `mix`: sum_e g_e h_e B_e (along the rank axis, or through a MoE dispatcher);
- `adapter_config`: the config of a projection's adapter (MixLoRA: plain LoRA on attention);
- `replace_mlp`, `scalings`, `decodes_with_cache`: the model-level hooks (MixLoRA's FFN,
  X-LoRA's classifier, which runs the model twice, each pass with its own decoding cache);
- `post_update`, `decays`: the training side (SoRA's proximal step, its undecayed gates);
- `gate_slots`, `check`: what `moejax.config.validation` asks of the method's config.

Plain LoRA: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv
2106.09685); E > 1 static experts are summed with gate 1.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config_section import ConfigError
from moejax.lora.config import LoRAConfig
from moejax.lora.weights import trainable_a
from moejax.moe.routing import Routing
from moejax.nn.adapter_hook import AdapterContext
from moejax.nn.collections import ADAPTER_AUX, ADAPTER_METRICS, sow_value


def mix_ranks(h: jax.Array, gates: jax.Array | None, b: jax.Array) -> jax.Array:
    """sum_e g_e h_e B_e as one matmul over the concatenated ranks: `h[T, E_a, r]` (E_a = 1:
    one A shared by the heads), `gates[T, E]` (None = all 1), `b[E, r, d_out]`."""
    e, r, d_out = b.shape
    h = jnp.broadcast_to(h, (h.shape[0], e, r))
    if gates is not None:
        h = h * gates.astype(h.dtype)[:, :, None]
    return h.reshape(h.shape[0], e * r) @ b.reshape(e * r, d_out)


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def report_routing(module: nn.Module, routing: Routing, aux: dict[str, jax.Array]) -> None:
    """Sows an adapter router's weighted aux losses and its scalar metrics (per-expert
    vectors differ in size between adapters and are not reported)."""
    for name, value in aux.items():
        sow_value(module, ADAPTER_AUX, name, value)
    for name, value in routing.metrics.items():
        if jnp.ndim(value) == 0:
            sow_value(module, ADAPTER_METRICS, name, value)


class LoRAMethod:
    """Plain LoRA (module docstring); subclasses override the steps they change."""

    decodes_with_cache = True  # False: the model cannot decode with its key/value cache

    def gate_slots(self, cfg: LoRAConfig) -> tuple[int, str]:
        """How many gates a token's top_k picks from, and that number as the config spells
        it (for the message when lora.top_k exceeds it)."""
        return cfg.num_experts, f"lora.num_experts={cfg.num_experts}"

    def check(self, cfg: LoRAConfig) -> None:
        """Raises ConfigError (naming the field and the fix) for a `lora` section this method
        cannot run; called by `validate` after the fields' own ranges are checked. The
        default: static or per-token-gated experts mixed on the rank axis, the same count
        in every layer."""
        require(
            not cfg.expert_counts,
            f"lora.layer_experts={cfg.layer_experts!r} needs lora.method='moe' (MoLA routes "
            f"each layer's experts); method={cfg.method!r}.",
        )
        require(
            cfg.dispatcher == "none",
            f"lora.dispatcher={cfg.dispatcher!r} dispatches routed experts, which only "
            f"lora.method='moe' has; use 'none' for method={cfg.method!r}.",
        )

    def adapter_config(self, cfg: LoRAConfig) -> LoRAConfig:
        return cfg

    def make_a(self, adapter: nn.Module, cfg: LoRAConfig, shape, param_dtype) -> jax.Array:
        return trainable_a(adapter, shape, param_dtype)

    def gates(
        self,
        adapter: nn.Module,
        cfg: LoRAConfig,
        x: jax.Array,
        h: jax.Array,
        mask: jax.Array | None,
        context: AdapterContext | None,
    ) -> tuple[jax.Array | None, Routing | None]:
        return None, None

    def gate_ranks(self, adapter: nn.Module, h: jax.Array, param_dtype, dtype) -> jax.Array:
        return h

    def mix(
        self,
        cfg: LoRAConfig,
        x: jax.Array,
        h: jax.Array,
        gates: jax.Array | None,
        routing: Routing | None,
        a: jax.Array,
        b: jax.Array,
    ) -> jax.Array:
        return mix_ranks(h, gates, b)

    def replace_mlp(
        self,
        module: nn.Module,
        cfg: LoRAConfig,
        x: jax.Array,
        weights: tuple[jax.Array, jax.Array, jax.Array],
        context: AdapterContext | None,
        dtype,
    ) -> jax.Array | None:
        return None

    def scalings(
        self,
        module: nn.Module,
        cfg: LoRAConfig,
        run: Callable[[Any], jax.Array],
        shape: tuple[int, int],
        param_dtype: str,
    ) -> jax.Array | None:
        return None

    def post_update(self, cfg: LoRAConfig, params: Any, learning_rate) -> Any:
        """The params after the optimizer step's own rule (none for plain LoRA)."""
        return params

    def decays(self, names: list[str]) -> bool:
        """Whether the adapter leaf at dict path `names` gets weight decay."""
        return True
