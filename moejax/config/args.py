"""`parse_arg`: typed `key=value` arguments of `get_config(arg)`, in the style of big_vision.

    get_config("size=pod,steps=20000") with parse_arg(arg, size="tiny", steps=300)
    -> ConfigDict(size="pod", steps=20000)

Each default fixes the type of its key; unknown keys and unparsable values raise a
`ConfigError` that lists the valid keys.
"""

from __future__ import annotations

import ml_collections

from moejax.config_section import ConfigError


def _parse(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"config arg {key}={text!r} must be true or false.")
    try:
        return type(default)(text)
    except ValueError:
        raise ConfigError(
            f"config arg {key}={text!r} must be a {type(default).__name__}."
        ) from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ConfigError(
                f"config arg {item!r} must look like key=value; valid keys: {sorted(defaults)}."
            )
        key, text = item.split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config arg {key!r}; valid keys: {sorted(defaults)}.")
        values[key] = _parse(key, text, defaults[key])
    return ml_collections.ConfigDict(values)
