"""Turning one `ml_collections.ConfigDict` section into the frozen dataclass a module receives.

Modules never see the whole config tree: each package owns a frozen dataclass for its own
section (`ModelConfig`, `MoEConfig`, `TrainConfig`, `MeshConfig`, `DataConfig`), built here.
Lists become tuples and dicts become tuples of pairs so every section is hashable and can be
a static argument of `jax.jit` or an attribute of a Flax module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An inconsistent or unknown config value; the message names the field and the fix."""


def to_plain(value: Any) -> Any:
    """ConfigDict / FieldReference / list trees -> hashable Python values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return tuple((k, to_plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(to_plain(v) for v in value)
    return value


def section_from_mapping(cls: type[T], mapping: Any, section: str) -> T:
    """Builds `cls` from a mapping, rejecting unknown keys with the list of valid ones."""
    if hasattr(mapping, "to_dict"):
        mapping = mapping.to_dict()
    mapping = dict(mapping or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(
            f"config.{section} has unknown field(s) {unknown}; valid fields are {sorted(names)}. "
            f"Fix the spelling in the config file or the --config.{section}.<field> flag.")
    return cls(**{k: to_plain(v) for k, v in mapping.items()})
