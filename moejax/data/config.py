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

DEFAULT_DATASET = "moejax_corpus"
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
      dataset: "moejax_corpus" (built offline on first use) or the name of any registered
        tfds text dataset already prepared in `data_dir` in array_record format.
      data_dir: tfds data directory; "" means `default_data_dir()`.
      text_key: feature holding the text (bytes/str).
      domain_key: feature holding an integer domain label; absent -> domain 0.
      seq_len: tokens per training example (rows hold seq_len + 1 tokens: inputs and
        targets are the same row shifted by one).
      global_batch_size: rows per step over all processes; each process gets
        global_batch_size // process_count rows.
      seed: shuffling seed; epoch e uses the permutation drawn from (seed, e).
      max_bytes_per_domain: size of each moejax_corpus domain (selects the corpus variant).
      train_split / eval_split: split names.
      shuffle: False reads documents in stored order (debugging, deterministic evals).
    """

    dataset: str = DEFAULT_DATASET
    data_dir: str = ""
    text_key: str = "text"
    domain_key: str = "domain"
    seq_len: int = 256
    global_batch_size: int = 16
    seed: int = 0
    max_bytes_per_domain: int = 4_000_000
    train_split: str = "train"
    eval_split: str = "validation"
    shuffle: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"str": str, "int": int, "bool": bool}[field.type]
            # bool is a subclass of int: `seq_len=True` is a typo, not a length.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
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
        if self.seed < 0:
            raise ValueError(
                f"data.seed must be >= 0, got {self.seed}; set --config.data.seed to a "
                "non-negative integer."
            )
        for name in ("dataset", "text_key", "train_split", "eval_split"):
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
