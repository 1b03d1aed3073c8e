"""Writing an edited model as a new run directory, one that `moejax.load_run`,
`python -m moejax.eval`, `python -m moejax.sample`, the trainer (fine-tuning from step 0)
and `moejax.hf.save_pretrained` read like any run.

The directory is written by `moejax.train.convert_hf.write_run` (the converter's own files:
config.py, model.json, config.json, checkpoints/0 with a fresh optimizer state of the run's
`train` section): the source run's config with the edited `model` and `moe` sections, and in
the checkpoint's extra data `compressed_from` (the source workdir and step) and
`compression` (what was done). A sub-word tokenizer read from files (`hf:`,
`sentencepiece:`) is copied into the new directory.
"""

from __future__ import annotations

import os

from moejax.hf import configs_as_dict
from moejax.paths import is_remote
from moejax.train.convert_hf import copy_tokenizer, write_run
from moejax.train.run_loader import one_device_sections, run_config


def _tokenizer_copy(spec: str, out: str) -> str | None:
    kind, _, path = spec.partition(":")
    if kind not in ("hf", "sentencepiece") or not path or is_remote(path):
        return None
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    return copy_tokenizer(directory, out)


def write_compressed_run(
    source: str, step: int, out: str, model, variables, s, record: dict
) -> dict:
    """Writes `model` / `variables` (edited from checkpoint `step` of run `source`, whose
    validated config is `s`) into the new run directory `out`; returns its config."""
    sections = {k: v for k, v in run_config(source, step).items() if isinstance(v, dict)}
    sections.update(configs_as_dict(model))
    one_device_sections(sections)  # a config load_run reads back, before anything is written
    tokenizer = _tokenizer_copy(s.data.tokenizer, out)
    if tokenizer is not None:
        sections["data"] = {k: v for k, v in sections["data"].items() if k != "tokenizer"}
    return write_run(
        out,
        sections,
        variables,
        extra={"compressed_from": {"workdir": source, "step": step}, "compression": record},
        train=s.train,
        tokenizer=tokenizer,
    )
