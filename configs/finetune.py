r"""Fine-tuning recipe: LoRA on the attention and routed experts of a converted HF MoE model.

    python -m moejax.train.convert_hf --from /path/to/hf_moe --workdir runs/qwen_moe
    python -m moejax.train --config=configs/finetune.py:base=runs/qwen_moe \
        --workdir=runs/qwen_moe_lora --config.data.sources='jsonl:data/train-*.jsonl#text'

The argument names the converted run (`base=`, the `--workdir` of `moejax.train.convert_hf`);
its `model.json` gives the model and moe sections (so the model matches the checkpoint) and
the tokenizer copied from the HF directory (`data.tokenizer`, the checkpoint's own ids). The
base weights are its latest checkpoint (`lora.base_checkpoint`), frozen: only the adapters
train, plain LoRA (`lora.method="lora"`) of rank `rank` (8) and alpha `alpha` (16) on
`attn.*` and the routed experts' `experts.w_gate|w_up|w_down` (one A_e, B_e per expert).
The data are jsonl documents: `data=GLOB` and `field=NAME` (the text key, "text") make
`data.sources="jsonl:GLOB#NAME"`; `--config.data.sources=...` replaces it with any source
mixture. `steps=N` (1000), `lr=` (2e-4), `seq_len=` (1024) and `batch=` (16) size the run.

A missing base directory, or one that is not a converted run (no model.json), is refused with
one error naming `base=`. Export the trained adapters for peft with `moejax.hf.save_adapter`
(README, "LoRA adapters").
"""

import json

from moejax.config.args import parse_arg
from moejax.config.base import default_config
from moejax.config_section import ConfigError
from moejax.paths import as_path, is_remote, join, resolve

CONVERT = "python -m moejax.train.convert_hf --from HF_DIR --workdir WORKDIR"


def converted_sections(base: str) -> dict:
    """The sections `moejax.train.convert_hf` wrote to `base/model.json`, the tokenizer
    path made absolute (as the converted run's own config.py does)."""
    if not base:
        raise ConfigError(
            f"configs/finetune.py needs base=WORKDIR, a converted run ({CONVERT}): "
            f"--config=configs/finetune.py:base=WORKDIR."
        )
    if not as_path(base).is_dir():
        raise ConfigError(
            f"configs/finetune.py: base={base!r} is not a directory; pass the --workdir of a "
            f"converted run (convert first: {CONVERT})."
        )
    model_json = as_path(base) / "model.json"
    if not model_json.is_file():
        raise ConfigError(
            f"configs/finetune.py: base={base!r} holds no model.json, so it is not a run "
            f"written by moejax.train.convert_hf; convert the HF checkpoint first ({CONVERT}) "
            f"and pass that WORKDIR as base=."
        )
    sections = json.loads(model_json.read_text())
    tokenizer = sections.get("data", {}).get("tokenizer", "")
    kind, _, path = tokenizer.partition(":")
    if path and not is_remote(path) and not path.startswith("/"):
        sections["data"]["tokenizer"] = f"{kind}:{join(resolve(base), path)}"
    return sections


def get_config(arg=None):
    arg = parse_arg(
        arg,
        base="",
        rank=8,
        alpha=16.0,
        data="data/train-*.jsonl",
        field="text",
        steps=1000,
        lr=2e-4,
        seq_len=1024,
        batch=16,
        tokenizer="",  # only for a base converted without a tokenizer: hf:DIR, byte, ...
    )
    sections = converted_sections(arg.base)
    c = default_config()
    for name in ("model", "moe"):
        c[name].update(sections.get(name, {}))
    tokenizer = arg.tokenizer or sections.get("data", {}).get("tokenizer", "")
    if not tokenizer:
        raise ConfigError(
            f"configs/finetune.py: base={arg.base!r} was converted without a tokenizer (its "
            f"HF directory held no tokenizer.json or tokenizer.model); pass the checkpoint's "
            f"one as :base={arg.base},tokenizer=hf:DIR (or sentencepiece:FILE)."
        )
    c.data.update(
        tokenizer=tokenizer,
        sources=f"jsonl:{arg.data}#{arg.field}",
        seq_len=arg.seq_len,
        global_batch_size=arg.batch,
    )
    c.lora.update(
        method="lora",
        targets="attn.*,experts.*",
        rank=arg.rank,
        alpha=arg.alpha,
        base_checkpoint=resolve(arg.base),
    )
    c.train.update(
        steps=arg.steps,
        learning_rate=arg.lr,
        warmup_steps=min(50, arg.steps),
        weight_decay=0.0,
        checkpoint_every=min(500, arg.steps),
        keep_checkpoints=2,
    )
    return c
