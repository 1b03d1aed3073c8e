"""The adapter hook: the one place where a model lets adapters change its projections.

Models and the MoE layer never import an adapter method. Each projection asks the hook for
a low-rank delta, each SwiGLU MLP asks whether it is replaced, and the Transformer asks for
per-token scalings before it runs its layers; `AdapterHook` (no adapters) answers "no" to
all three. `moejax.lora` implements the hook for its registry of LoRA methods; a model gets
one through its `adapters` field (`Transformer(model, moe, adapters=...)`).

A hook is a frozen (hashable) dataclass, so it can be a field of Linen modules that are
scanned and rematerialised. Adapters are created as children of the module that calls the
hook (their names start with `lora_`), and report aux losses, metrics and expert loads by
`sow` into the collections of `moejax.nn.collections`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax


@flax.struct.dataclass
class AdapterContext:
    """What a Transformer block hands to the adapters inside it.

    token_mask: bool[B, L], the real tokens (padding takes no part in routers' losses);
    scalings: [B, L, E] per-token adapter scalings (X-LoRA's), or None;
    cache_prefix: the prefix of the attention's decoding-cache variables in this pass ("":
    the model's output pass; X-LoRA's no-adapter scaling pass keeps its own keys and values).
    """

    token_mask: jax.Array | None = None
    scalings: jax.Array | None = None
    cache_prefix: str = flax.struct.field(pytree_node=False, default="")


@dataclasses.dataclass(frozen=True)
class AdapterHook:
    """No adapters: the base model unchanged. Subclasses override what they adapt."""

    def delta(
        self,
        module: nn.Module,
        param: str,
        x: jax.Array,
        out_shape: Sequence[int],
        context: AdapterContext | None,
        dtype: str,
        param_dtype: str,
    ) -> jax.Array | None:
        """The change `[..., *out_shape]` of projection `module.param` at input `x[..., d_in]`
        (input axes flattened), or None. Called in the module's compact method."""
        return None

    def replace_mlp(
        self,
        module: nn.Module,
        x: jax.Array,
        weights: tuple[jax.Array, jax.Array, jax.Array],
        context: AdapterContext | None,
        dtype,
    ) -> jax.Array | None:
        """The output of SwiGLU MLP `module` at `x[..., d]` if the adapters replace it
        (weights `(w_gate, w_up, w_down)` already in the compute dtype), else None."""
        return None

    def expert_lora(
        self, module: nn.Module, shapes: dict[str, tuple[int, int, int]], param_dtype: str
    ) -> dict[str, tuple[jax.Array, jax.Array, float]]:
        """Low-rank updates of the routed experts' stacked weights `module.<name>`
        (`shapes[name] = (E, d_in, d_out)`): `{name: (a[E, d_in, r], b[E, r, d_out], s)}` for
        the adapted ones, each expert e computing `x W_e + s (x A_e) B_e` through the same
        grouped matmul as its weight (`moejax.moe.experts`). Called in the experts' compact
        method; `{}` (nothing adapted) by default."""
        return {}

    def scalings(
        self, module: nn.Module, run: Callable[[Any], jax.Array], shape: tuple[int, int]
    ) -> jax.Array | None:
        """Per-token scalings `[B, L, E]` handed to every block (`AdapterContext.scalings`),
        or None. `run(scalings)` runs the layers and returns the final hidden state; with a
        decoding cache that pass keeps its own keys and values (`AdapterContext.cache_prefix`),
        so the scalings of new tokens see the earlier tokens of the same pass."""
        return None

    def for_layer(self, layer: int, num_layers: int) -> "AdapterHook":
        """The hook of model layer `layer` (unrolled layers may differ in shape)."""
        return self

    @property
    def decodes_with_cache(self) -> bool:
        """Whether the model decodes with its key/value cache (False: the adapters need the
        whole sequence at every call, as X-LoRA's two passes do)."""
        return True

    # The training side: what the optimizer and the train step ask of the adapters.
    @property
    def bias_update_rate(self) -> float:
        """The sign-rule rate of the adapters' balancing biases (`lora_bias`)."""
        return 0.0

    def post_update(self, params: Any, learning_rate: Any) -> Any:
        """The trainable params after the optimizer step, moved by the adapters' own rule
        (e.g. SoRA's proximal step); unchanged by default."""
        return params

    def decays(self, names: Sequence[str]) -> bool:
        """Whether the weight at dict path `names` gets weight decay (True by default; the
        optimizer excludes norm scales and biases itself)."""
        return True


def add_delta(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    """`y + delta` in `y`'s dtype; `y` when there is no delta."""
    return y if delta is None else y + delta.astype(y.dtype)


def projection_delta(
    module: nn.Module,
    hook: AdapterHook | None,
    param: str,
    x: jax.Array,
    out_shape: Sequence[int],
    context: AdapterContext | None,
    dtype: str,
    param_dtype: str,
) -> jax.Array | None:
    """`hook.delta(...)`, or None without a hook."""
    if hook is None:
        return None
    return hook.delta(module, param, x, out_shape, context, dtype, param_dtype)
