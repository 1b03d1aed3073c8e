"""`DataConfig`: the `data` section of the config tree, as a typed frozen dataclass.

The input pipeline receives this, never the whole ConfigDict. It is validated once, on
construction, and every error names the field as it is spelled on the command line
(`--config.data.seq_len=...`) together with the fix.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

DEFAULT_DATASET = "moejax_corpus"  # the tfds name of the offline corpus (`data.sources=corpus`)
DEFAULT_SOURCES = "corpus"
MULTITASK = "multitask"  # `data.sources=multitask`: generated prompt -> answer rows (tasks.py)
DATA_DIR_ENV = "MOEJAX_DATA_DIR"


def default_data_dir() -> str:
    """`$MOEJAX_DATA_DIR`, else `~/.cache/moejax/tensorflow_datasets`."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "moejax", "tensorflow_datasets"
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
      sources: what to read, a comma-separated list of `KIND:WHERE[#FIELD][@WEIGHT]`
        (`source_spec.py`): `corpus` (the offline corpus, built on first use), `tfds:NAME`,
        `parquet:GLOB`, `jsonl:GLOB`, `hf_disk:DIR`, `array_record:GLOB`; weights are
        sampling proportions. `multitask` alone: generated prompt -> answer rows.
      tokenizer: `byte`, `sentencepiece:PATH` (a .model file) or `hf:PATH` (a
        tokenizer.json, or a directory holding one).
      pad_id: the padding id for a tokenizer that has none (-1: its EOS id; padding is
        never a target, so any id is safe).
      data_dir: tfds data directory (the corpus and `tfds:` sources); "" means
        `default_data_dir()`.
      text_key: feature holding the text (a source's `#FIELD` overrides it).
      seq_len: tokens per training example (rows hold seq_len + 1 tokens: inputs and
        targets are the same row shifted by one).
      global_batch_size: rows per step over all processes; each process gets
        global_batch_size // process_count rows.
      seed: shuffling seed; source s's epoch e is a permutation drawn from (seed, s, e).
        Row g of every step reads documents g, g + G, ... of the mixture (G rows per step).
      eval_fraction: share of a source's documents held out for evaluation, chosen by a
        hash of each document's position, when the source has no validation split.
      worker_count: grain worker processes reading, tokenizing and packing (0: in this
        process). Each worker packs its own slice of the lanes' documents, so the rows
        depend on it: resume with the same value.
      max_bytes_per_domain: size of each offline-corpus domain (selects the corpus variant).
      train_split / eval_split: split names, for sources that have splits.
      shuffle: False reads documents in stored order (debugging, deterministic evals).
    """

    sources: str = DEFAULT_SOURCES
    tokenizer: str = "byte"
    pad_id: int = -1
    data_dir: str = ""
    text_key: str = "text"
    seq_len: int = 256
    global_batch_size: int = 16
    seed: int = 0
    eval_fraction: float = 0.05
    worker_count: int = 0
    max_bytes_per_domain: int = 4_000_000
    train_split: str = "train"
    eval_split: str = "validation"
    shuffle: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"str": str, "int": int, "bool": bool, "float": (int, float)}[field.type]
            # bool is a subclass of int: `seq_len=True` is a typo, not a length.
            if not isinstance(value, expected) or (
                field.type != "bool" and isinstance(value, bool)
            ):
                raise TypeError(
                    f"data.{field.name} must be {field.type}, got {type(value).__name__} "
                    f"{value!r}; set --config.data.{field.name} to a {field.type}."
                )
        for name in ("seq_len", "global_batch_size", "max_bytes_per_domain"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"data.{name} must be positive, got {getattr(self, name)}; "
                    f"set --config.data.{name} to a value > 0."
                )
        if self.worker_count < 0:
            raise ValueError(
                f"data.worker_count must be >= 0, got {self.worker_count}; set "
                "--config.data.worker_count to 0 (read in this process) or a positive value."
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(
                f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}; set "
                "--config.data.eval_fraction to e.g. 0.05."
            )
        if self.pad_id < -1:
            raise ValueError(
                f"data.pad_id must be -1 (the tokenizer's EOS) or an id >= 0, got {self.pad_id}."
            )
        if self.seed < 0:
            raise ValueError(
                f"data.seed must be >= 0, got {self.seed}; set --config.data.seed to a "
                "non-negative integer."
            )
        for name in ("sources", "tokenizer", "text_key", "train_split", "eval_split"):
            if not getattr(self, name):
                raise ValueError(f"data.{name} must not be empty; set --config.data.{name}.")

    @property
    def resolved_data_dir(self) -> str:
        """`data_dir`, or the default when it is empty; `~` expanded."""
        return os.path.expanduser(self.data_dir) if self.data_dir else default_data_dir()

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | Any) -> "DataConfig":
        """Builds a DataConfig from a dict or an ml_collections ConfigDict `data` section.

        Missing keys take the defaults above; unknown keys raise, because a misspelt key
        would otherwise be silently ignored and the run would use a default.
        """
        if hasattr(section, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
            section = section.to_dict()
        if not isinstance(section, Mapping):
            raise TypeError(
                f"data config must be a dict or ConfigDict, got {type(section).__name__}."
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown key(s) in the data config: {', '.join('data.' + k for k in unknown)}. "
                f"Valid keys: {', '.join(valid)}."
            )
        return cls(**dict(section))
