"""`LoRAConfig`: the `config.lora` section (low-rank adapters and mixtures of LoRA experts)."""
from __future__ import annotations

import dataclasses

from moejax.config.sections import section_from_mapping

LORA_METHODS = ("none", "lora")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the frozen projections of the model (`method="none"`: no adapter).

    `targets` names the wrapped projections as `<module>.<param>` patterns (fnmatch), comma
    separated, e.g. "attn.wq,attn.wv" or "attn.*,mlp.*": attention `attn.wq|wk|wv|wo`, dense
    MLP `mlp.w_gate|w_up|w_down`. Every targeted projection gets `num_experts` rank-`rank`
    experts `a[E, d_in, r]`, `b[E, r, d_out]` in a child module `lora_<param>`, scaled by
    `alpha / rank` (`alpha / sqrt(rank)` with `rslora`, Kalajdzievski, 2023).
    """
    method: str = "none"
    targets: str = "attn.wq,attn.wv"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    num_experts: int = 1
    top_k: int = 1

    @classmethod
    def from_mapping(cls, mapping) -> "LoRAConfig":
        return section_from_mapping(cls, mapping, "lora")
