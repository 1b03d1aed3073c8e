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

    The frozen base comes from `base_checkpoint` (a moejax run directory: the params of its
    latest checkpoint) or `base_hf` (a Hugging Face directory, `moejax.hf.from_pretrained`);
    with neither, from the run's own initialisation, saved once in `{workdir}/base`. Adapter
    runs checkpoint the adapters and their optimizer state only, with a fingerprint of the
    base that is checked on resume (`moejax.lora.checkpoint`).
    """
    method: str = "none"
    targets: str = "attn.wq,attn.wv"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    num_experts: int = 1
    top_k: int = 1
    base_checkpoint: str = ""
    base_hf: str = ""

    @classmethod
    def from_mapping(cls, mapping) -> "LoRAConfig":
        return section_from_mapping(cls, mapping, "lora")
