"""Turning one `ml_collections.ConfigDict` section into the frozen dataclass a module receives,
and `ConfigError`, the one error of a bad config.

It imports no moejax package and sits at the bottom of the import graph, beside `moejax.nn`:
every package builds its section with it, and `moejax.config` (which assembles the sections)
imports every package.

Modules never see the whole config tree: each package owns a frozen dataclass for its own
section (`ModelConfig`, `MoEConfig`, `TrainConfig`, `MeshConfig`, `DataConfig`), built here.
Lists become tuples and dicts become tuples of pairs so every section is hashable and can be
a static argument of `jax.jit` or an attribute of a Flax module.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An inconsistent or unknown config value; the message names the field and the fix."""


def unknown_names(names: list[str], valid: list[str]) -> str:
    """`['topk' (did you mean 'top_k'?)]`: the unknown names, each with the closest valid
    name where one is close (difflib), for the one-line errors of misspelled fields."""
    shown = []
    for name in names:
        close = difflib.get_close_matches(name, valid, n=1)
        shown.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "[" + ", ".join(shown) + "]"


def to_plain(value: Any) -> Any:
    """ConfigDict / FieldReference / list trees -> hashable Python values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return tuple((k, to_plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(to_plain(v) for v in value)
    return value


# Field annotation (a string under `from __future__ import annotations`) -> accepted types.
_ACCEPTED = {
    "int": numbers.Integral,
    "float": numbers.Real,
    "bool": bool,
    "str": str,
    "tuple": (tuple, list),
}
_ARTICLE = {
    "int": "an int",
    "float": "a float",
    "bool": "a bool (true/false)",
    "str": "a string",
    "tuple": "a list",
}


def check_field_type(section: str, name: str, annotation: str, value: Any) -> None:
    """Raises ConfigError unless `value` fits the field's annotated type (int, float, bool,
    str, tuple); a bool is not accepted as a number, an int is accepted as a float."""
    accepted = _ACCEPTED.get(annotation)
    if accepted is None:
        return
    if isinstance(value, accepted) and (annotation == "bool" or not isinstance(value, bool)):
        return
    raise ConfigError(
        f"config.{section}.{name}={value!r} must be {_ARTICLE[annotation]}, not "
        f"{type(value).__name__}; set --config.{section}.{name} to {_ARTICLE[annotation]}."
    )


def section_from_mapping(cls: type[T], mapping: Any, section: str) -> T:
    """Builds `cls` from a mapping, rejecting unknown keys with the list of valid ones and
    values of the wrong type with the field's type."""
    if hasattr(mapping, "to_dict"):
        mapping = mapping.to_dict()
    mapping = dict(mapping or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(
            f"config.{section} has unknown field(s) {unknown_names(unknown, names)}; valid fields "
            f"are {sorted(names)}. "
            f"Fix the spelling in the config file or the --config.{section}.<field> flag."
        )
    for field in dataclasses.fields(cls):
        if field.name in mapping:
            check_field_type(section, field.name, str(field.type), mapping[field.name])
    return cls(**{k: to_plain(v) for k, v in mapping.items()})
