"""Which projections carry adapters, and which parameters are adapter parameters.

The adapter of projection `<param>` of module `<module>` is its child `lora_<param>`; every
adapter leaf therefore has a path component starting with `lora_` (`is_adapter_path`).
`lora.targets` names the adapted projections as comma-separated fnmatch patterns of
`<module>.<param>` (e.g. "attn.wq,attn.wv" or "attn.*,mlp.*"); `experts.w_gate|w_up|w_down`
are the routed experts' stacked weights (plain LoRA only: one A_e, B_e per expert).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

from moejax.lora.config import LoRAConfig

ADAPTER_PREFIX = "lora_"
ROUTED_EXPERT_WEIGHTS = ("experts.w_gate", "experts.w_up", "experts.w_down")
ROUTED_EXPERT_METHODS = ("lora",)  # methods that may adapt the routed experts


def target_patterns(cfg: LoRAConfig) -> tuple[str, ...]:
    return tuple(p.strip() for p in cfg.targets.split(",") if p.strip())


def is_target(cfg: LoRAConfig | None, module: str, param: str) -> bool:
    """Whether `<module>.<param>` (e.g. `attn.wq`) matches one of `cfg.targets`."""
    if cfg is None or cfg.method == "none":
        return False
    return any(fnmatch.fnmatchcase(f"{module}.{param}", p) for p in target_patterns(cfg))


def routed_expert_patterns(cfg: LoRAConfig) -> list[str]:
    """The patterns of `cfg.targets` that adapt a routed expert weight."""
    return [
        p
        for p in target_patterns(cfg)
        if any(fnmatch.fnmatchcase(w, p) for w in ROUTED_EXPERT_WEIGHTS)
    ]


def is_adapter_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path (keys or jax key entries) lies inside an adapter module."""
    for entry in path:
        key = getattr(entry, "key", entry)
        if isinstance(key, str) and key.startswith(ADAPTER_PREFIX):
            return True
    return False
