"""Sweep definitions: the variants a config file's `sweep_<name>` function adds.

A config file defines sweeps beside its `get_config` (big_vision style). A sweep function
calls `add(**overrides)` once per variant, the overrides keyed by dotted field names; it may
take the base config as a second argument and derive its sizes from it, so one sweep serves
every size of the config:

    def sweep_granularity(add, config):
        width = config.model.d_ff // 2
        for m in (1, 2, 4):
            add(**{"moe.num_experts": 8 * m, "moe.top_k": 2 * m, "moe.d_expert": width // m})

`add(name="gshard", **overrides)` names a variant (default: its overrides, `field=value`
joined by commas). `grid` and `zip_axes` build lists of overrides:

    for overrides in grid({"moe.top_k": [1, 2], "moe.capacity_factor": [1.0, 2.0]}):
        add(**overrides)                               # the 4 combinations
    zip_axes({"moe.num_experts": [8, 16], "moe.top_k": [1, 2]})   # 2: (8, 1), (16, 2)

`sweep_variants(module, name, config)` collects them; `experiments/sweep.py` runs them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from moejax.config.renames import RENAMES
from moejax.config_section import ConfigError


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of a sweep: its name and its `{"section.field": value}` overrides."""

    name: str
    overrides: dict[str, Any]


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values of `axes` ({"section.field": [values]}), the last
    axis varying fastest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zip_axes(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The i-th value of every axis together; all axes must have the same length."""
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            f"zip_axes: the axes have different lengths {lengths}; give each axis "
            f"the same number of values (or use grid for their product)."
        )
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def product(*groups: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The product of several lists of overrides (e.g. a grid times a zip): each result
    merges one entry of every group; a key set by two groups is refused."""
    out = []
    for parts in itertools.product(*[list(g) for g in groups]):
        merged: dict[str, Any] = {}
        for part in parts:
            clash = sorted(set(merged) & set(part))
            if clash:
                raise ConfigError(
                    f"sweep product: {clash[0]} is set by two of the combined axes; sweep each "
                    f"field in one of them only."
                )
            merged.update(part)
        out.append(merged)
    return out


def format_value(value: Any) -> str:
    """A value as it appears in a variant name and on a command line."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def variant_name(overrides: Mapping[str, Any]) -> str:
    """`field=value` for each override (the last component of the dotted name), joined by
    commas; "base" for none."""
    if not overrides:
        return "base"
    return ",".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in overrides.items())


def check_name(name: str) -> str:
    """A variant name must be usable as one directory name."""
    if not name or name in (".", "..") or "/" in name or any(c.isspace() for c in name):
        raise ConfigError(
            f"sweep variant name {name!r} must be one directory name: no '/', no spaces."
        )
    return name


def sweep_variants(module: Any, sweep: str, config: Any) -> list[Variant]:
    """The variants of `sweep_<sweep>` in the config module `module`. The function is called
    as `fn(add)` or, if it takes a second argument, `fn(add, config)` with a copy of the
    base `config` (the one its variants override)."""
    fn = getattr(module, f"sweep_{sweep}", None)
    if fn is None:
        names = sorted(n[len("sweep_") :] for n in dir(module) if n.startswith("sweep_"))
        where = getattr(module, "__file__", module)
        raise ConfigError(f"{where} has no sweep_{sweep}; its sweeps are {names}.")
    out: list[Variant] = []

    def add(name: str | None = None, **overrides):
        for key in overrides:
            if key.count(".") < 1:
                raise ConfigError(
                    f"sweep_{sweep}: override {key!r} must be a dotted field name "
                    f"(section.field, e.g. moe.top_k)."
                )
        out.append(Variant(check_name(name or variant_name(overrides)), dict(overrides)))

    if len(inspect.signature(fn).parameters) >= 2:
        fn(add, copy.deepcopy(config))
    else:
        fn(add)
    names = [v.name for v in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"sweep_{sweep} adds the variant {repeated[0]!r} more than once.")
    return out


def _field_of(config: Any, key: str) -> tuple[Any, str]:
    """(section ConfigDict, field) of a dotted `section.field` key; one-line ConfigError
    naming the closest spellings when the section does not exist."""
    section, _, field = key.partition(".")
    if not field:
        raise ConfigError(f"override {key!r} must be a dotted field name (section.field).")
    if section not in config:
        close = difflib.get_close_matches(section, list(config.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"override {key!r}: the config has no section {section!r}{hint}; sections are "
            f"{sorted(config.keys())}."
        )
    fields = config[section]
    if hasattr(fields, "keys") and field not in fields and key not in RENAMES:
        close = difflib.get_close_matches(field, list(fields.keys()), n=1)
        hint = f"did you mean {section}.{close[0]}? " if close else ""
        raise ConfigError(
            f"override {key!r}: config.{section} has no field {field!r}; {hint}its fields are "
            f"{sorted(fields.keys())}."
        )
    return fields, field


def parse_value(config: Any, key: str, text: str) -> Any:
    """The command-line text of `--config.<key>=<text>` as a value of the field's type (a
    field the config does not have: a Python literal, else the text)."""
    section, field = _field_of(config, key)
    current = section.get(field) if hasattr(section, "get") else None
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"--config.{key}={text!r} must be true or false.")
        return lowered in ("true", "1", "yes")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(
                f"--config.{key}={text!r} must be a number (the field is {type(current).__name__})."
            ) from None
        if isinstance(current, int) and number.is_integer() and "." not in text:
            return int(number)
        return number
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """Sets every `{"section.field": value}` on `config` (in place) and returns it. A field
    the section lacks is refused with the closest spelling, unless it is an old spelling
    (`moe.router`) that `validate` reads through `moejax.config.renames`."""
    for key, value in overrides.items():
        section, field = _field_of(config, key)
        try:
            section[field] = value
        except TypeError as e:
            raise ConfigError(f"override {key}={value!r}: {e}") from None
    return config
