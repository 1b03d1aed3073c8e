"""X-LoRA's scaling classifier (Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter
Experts", arXiv 2402.07148; reference code: peft `tuners/xlora`, `classifier.py`).

The model first runs without adapters (every scaling 0, peft's `scaling_pass_value`); that
pass's last hidden state `h[B, L, d]` (after the final norm, with no gradient) goes through
this classifier, one linear map (peft's `xlora_depth=1`) to E logits per token, divided by
the temperature and softmaxed: the per-token scalings of the E adapters, shared by every
layer (peft's default, `layerwise_scalings=False`). With `xlora_top_k` only the k largest
scalings of a token are kept (the others are 0, not renormalised: peft's `top_k_lora`
without `enable_softmax_topk`). The second pass runs every adapter with its scaling.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora.config import LoRAConfig
from moejax.lora.method import LoRAMethod


class XLoRAClassifier(nn.Module):
    """`h[B, L, d] -> scalings[B, L, E]` (module docstring); lives at model level under
    `lora_xlora_classifier`, so it is an adapter leaf like the experts."""

    cfg: LoRAConfig
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None))
        w = self.param(
            "kernel", init, (hidden.shape[-1], cfg.num_experts), jnp.dtype(self.param_dtype)
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            (cfg.num_experts,),
            jnp.dtype(self.param_dtype),
        )
        logits = hidden.astype(jnp.float32) @ w.astype(jnp.float32) + bias.astype(jnp.float32)
        scalings = jax.nn.softmax(logits / cfg.xlora_temperature, axis=-1)
        if cfg.xlora_top_k:
            kth = jax.lax.top_k(scalings, cfg.xlora_top_k)[0][..., -1:]
            scalings = jnp.where(scalings >= kth, scalings, 0.0)
        return scalings


class XLoRA(LoRAMethod):
    """`xlora`: gates are the per-token scalings the model hands every block; the model runs
    once without adapters (scalings 0) to compute them (module docstring). Decoding, each pass
    keeps its own key/value cache (the scalings of token t depend on tokens <= t only)."""

    def gates(self, adapter, cfg, x, h, mask, context):
        scalings = None if context is None else context.scalings
        return (None if scalings is None else scalings.reshape(-1, scalings.shape[-1])), None

    def scalings(self, module, cfg, run, shape, param_dtype):
        hidden = run(jnp.zeros(shape + (cfg.num_experts,), jnp.float32))
        classifier = XLoRAClassifier(cfg, param_dtype, name="lora_xlora_classifier")
        return classifier(jax.lax.stop_gradient(hidden))
