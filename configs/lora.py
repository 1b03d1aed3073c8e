r"""LoRA experts on the tiny dense model: one config per method of `moejax.lora.variants`.

    python -m moejax.train --config=configs/lora.py:smora --workdir=runs/lora_smora
    python -m moejax.train --config=configs/lora.py:mola,steps=50 --workdir=runs/lora_mola \
        --config.lora.balance_coef=0.01

The argument is the variant name (lora, rslora, mola, llava_mole, mixlora, loramoe,
hydralora, xlora, smora, flylora, dynmole, sora; each one's paper and reference code are in
the variants module docstring), optionally followed by `steps=N`, `base=dense|deepseekmoe`
(the model of configs/dense.py or configs/deepseekmoe.py), `size=tiny|pod` (that file's
size) and `topology=` (with size=pod, one of that file's POD_LAYOUTS; `variant=` also
works). Any `lora.*` field can be overridden on the command line.
Only the adapters train (the base is frozen by the optimizer's masking); the base is
`lora.base_checkpoint` (a pretrained moejax run), `lora.base_hf` (a Hugging Face
directory) or, with neither, the run's own initialisation (saved once in <workdir>/base).
"""

from pathlib import Path

from moejax.config.args import parse_arg
from moejax.config.files import load_config_file
from moejax.lora.variants import MODEL_OVERRIDES, variant_overrides


def get_config(arg=None):
    items = [item for item in (arg or "").split(",") if item]
    if items and "=" not in items[0]:  # configs/lora.py:smora,steps=50
        items[0] = f"variant={items[0]}"
    args = parse_arg(
        ",".join(items), variant="lora", base="dense", size="tiny", steps=0, topology=""
    )
    base = load_config_file(Path(__file__).parent / f"{args.base}.py")
    topology = f",topology={args.topology}" if args.topology else ""
    c = base.get_config(f"size={args.size},steps={args.steps}{topology}")
    c.lora.update(variant_overrides(args.variant))
    c.model.update(MODEL_OVERRIDES.get(args.variant, {}))
    return c
