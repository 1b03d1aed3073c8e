"""`LoRAHook`: moejax's LoRA methods behind the model's adapter hook
(`moejax.nn.adapter_hook`). `adapters_for(lora_config)` is what a model is built with:
`Transformer(model, moe, adapters=adapters_for(cfg))`; None when `lora.method="none"`.

The hook holds the `lora` section; every method-specific step is asked of the method's
class (`moejax.lora.methods.METHODS`), so there is no branch on the method name here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moejax.lora.adapter import LoRAAdapter
from moejax.lora.config import LoRAConfig
from moejax.lora.method import LoRAMethod
from moejax.lora.methods import method_of
from moejax.lora.targets import ADAPTER_PREFIX, is_adapter_path, is_target
from moejax.lora.weights import ExpertLoRAWeights, lora_scale
from moejax.nn.adapter_hook import AdapterHook


@dataclasses.dataclass(frozen=True)
class LoRAHook(AdapterHook):
    cfg: LoRAConfig

    @property
    def method(self) -> LoRAMethod:
        return method_of(self.cfg)

    def delta(self, module, param, x, out_shape, context, dtype, param_dtype):
        if not is_target(self.cfg, module.name, param):
            return None
        cfg = self.method.adapter_config(self.cfg)
        adapter = LoRAAdapter(
            cfg,
            math.prod(out_shape),
            dtype,
            param_dtype,
            name=ADAPTER_PREFIX + param,
        )
        delta = adapter(x, context)
        return delta.reshape(delta.shape[:-1] + tuple(out_shape))

    def expert_lora(self, module, shapes, param_dtype):
        """Plain LoRA on the routed experts' weights (`experts.w_gate|w_up|w_down`): child
        `lora_<name>` with `a[E, d_in, r]`, `b[E, r, d_out]` split like the experts."""
        out = {}
        for name, (e, d_in, d_out) in shapes.items():
            if is_target(self.cfg, module.name, name):
                a, b = ExpertLoRAWeights(
                    e,
                    self.cfg.rank,
                    d_in,
                    d_out,
                    param_dtype,
                    routed=True,
                    name=ADAPTER_PREFIX + name,
                )()
                out[name] = (a, b, lora_scale(self.cfg))
        return out

    def replace_mlp(self, module, x, weights, context, dtype):
        return self.method.replace_mlp(module, self.cfg, x, weights, context, dtype)

    def scalings(self, module, run, shape):
        return self.method.scalings(module, self.cfg, run, shape, module.model.param_dtype)

    def for_layer(self, layer: int, num_layers: int) -> "LoRAHook":
        return LoRAHook(self.cfg.for_layer(layer, num_layers))

    @property
    def decodes_with_cache(self) -> bool:
        return self.method.decodes_with_cache

    # The training side: what the optimizer and the train step ask of the method.
    @property
    def bias_update_rate(self) -> float:
        """The sign-rule rate of the `lora_bias` collection (SMoRA, FlyLoRA)."""
        return self.cfg.bias_update_rate

    def post_update(self, params: Any, learning_rate) -> Any:
        return self.method.post_update(self.cfg, params, learning_rate)

    def decays(self, names: list[str]) -> bool:
        return not is_adapter_path(names) or self.method.decays(names)


def adapters_for(cfg: LoRAConfig | None) -> LoRAHook | None:
    """The adapter hook of a `lora` section; None without adapters."""
    if cfg is None or cfg.method == "none":
        return None
    return LoRAHook(cfg)
