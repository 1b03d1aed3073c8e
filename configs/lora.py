"""LoRA experts on the tiny dense model: one config per method of `moejax.lora.variants`.

    python -m moejax.train --config=configs/lora.py:smora --workdir=runs/lora_smora
    python -m moejax.train --config=configs/lora.py:mola,steps=50 --workdir=runs/lora_mola \
        --config.lora.balance_coef=0.01

The argument is the variant name (lora, rslora, mola, llava_mole, loramoe, hydralora, xlora,
smora, flylora, dynmole, sora; each one's paper and reference code are in the variants
module docstring), optionally followed by `steps=N` and `base=dense|deepseekmoe` (the tiny
model of configs/dense.py or configs/deepseekmoe.py). Any `lora.*` field can be overridden
on the command line. The base model is trained with the adapters here; training only the
adapters (a frozen base) is `moejax.train`'s optimizer masking.
"""
from pathlib import Path

from moejax.config.args import parse_arg
from moejax.config.files import load_config_file
from moejax.lora.variants import MODEL_OVERRIDES, variant_overrides


def get_config(arg=None):
    items = [item for item in (arg or "lora").split(",") if item]
    variant = items[0] if items and "=" not in items[0] else "lora"
    rest = ",".join(item for item in items if "=" in item)
    args = parse_arg(rest, base="dense", steps=0)
    base = load_config_file(Path(__file__).parent / f"{args.base}.py")
    c = base.get_config(f"steps={args.steps}" if args.steps else None)
    c.lora.update(variant_overrides(variant))
    c.model.update(MODEL_OVERRIDES.get(variant, {}))
    return c
