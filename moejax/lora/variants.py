"""Named LoRA methods: each is a set of `config.lora` values over one module family.

`VARIANTS[name]` holds the `lora` fields that define the method (on top of the section's
defaults); `configs/lora.py:<name>` and the multi-task experiment read them from here, so
every method has exactly one definition.
"""
from __future__ import annotations

VARIANTS: dict[str, dict] = {
    # LoRA (Hu et al., 2021): one rank-r adapter per targeted projection, scale alpha / r.
    "lora": dict(method="lora", num_experts=1, top_k=1, rslora=False),
    # rsLoRA (Kalajdzievski, 2023): the same adapter scaled by alpha / sqrt(r).
    "rslora": dict(method="lora", num_experts=1, top_k=1, rslora=True),
}


def variant_overrides(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {name!r}; choose one of {sorted(VARIANTS)}.")
    return dict(VARIANTS[name])
