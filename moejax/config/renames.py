"""Renamed and removed config fields: the one table of old spellings (`RENAMES`) and
`apply_renames`, which rewrites a config tree in the new spelling.

Every place a config enters applies it before reading a field: `validate` (so config files,
`--config.<section>.<field>` overrides and hand-written dicts), the trainer before it writes
`config.json`, and the resume check on the `config.json` of an existing run directory. Old
config files, command lines and run directories therefore keep working, each translation
warning once (`ConfigDeprecationWarning`, a FutureWarning, so shown by default) with the new
fields to set instead.

An entry maps an old dotted field to a `Rename`: `new`, the dotted fields that replace it
(named in every message), and `translate(value, section)`, which receives the old value and
the old field's section as given (a mapping, old field included) and returns the new fields
and their values, `{dotted field: value}`; it raises `ConfigError` for a value it cannot
read. `translate=None` marks a field removed with no translation: a config that still sets
it is refused with a message naming `new`. An entry keyed `(dotted field, old value)`
instead renames one old value of a field that still exists: it applies only when the field
holds that value (`renamed_value` builds it; e.g. lora.dispatcher='rank' -> 'none'), and
every other value passes silently. This module imports no package (their config modules
may use the table), so the old values are spelled out here, not looked up.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping

from moejax.config_section import ConfigError


class ConfigDeprecationWarning(FutureWarning):
    """A config used an old spelling, which was read in the new one."""


@dataclasses.dataclass(frozen=True)
class Rename:
    new: tuple[str, ...]
    translate: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None


# An entry's key: an old dotted field ("moe.router"), or (dotted field, old value) for an old
# value of a field that still exists.
OldSpelling = str | tuple[str, Any]


def renamed_value(field: str, new_value: Any) -> Rename:
    """The entry of an old value of `field` (a dotted field that still exists), keyed
    `(field, old value)` in the table: the field is read as `new_value`."""
    return Rename((field,), lambda _value, _section: {field: new_value})


# moe.router used to name a scorer and a selection rule at once (moe.selection only applied
# to the gru scorer, "" meaning softmax_topk).
_LINEAR_ROUTERS = ("softmax_topk", "top_p", "sigmoid_bias")


def _moe_router(value: Any, moe: Mapping[str, Any]) -> dict[str, Any]:
    """`router=softmax_topk|top_p|sigmoid_bias` -> the linear scorer with the rule of that
    name; `router=gru` -> the gru scorer with the rule in `selection` ("" = softmax_topk)."""
    selection = moe.get("selection") or ""
    if value == "gru":
        return {"moe.scorer": "gru", "moe.selection": selection or "softmax_topk"}
    if value in _LINEAR_ROUTERS:
        if selection not in ("", "softmax_topk", value):
            raise ConfigError(
                f"config.moe.router={value!r} (an old spelling of moe.scorer='linear', "
                f"moe.selection={value!r}) contradicts moe.selection={selection!r}; set "
                f"moe.scorer and moe.selection only."
            )
        return {"moe.scorer": "linear", "moe.selection": value}
    raise ConfigError(
        f"config.moe.router={value!r} is an old field and {value!r} was never a router; set "
        f"moe.scorer (linear | gru) and moe.selection (softmax_topk | top_p | sigmoid_bias) "
        f"instead."
    )


def _data_dataset(value: Any, _data: Mapping[str, Any]) -> dict[str, Any]:
    """`data.dataset` named one tfds dataset (or the generated tasks); `data.sources` is a
    mixture of sources of several kinds."""
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"config.data.dataset={value!r} is an old field; set data.sources (e.g. corpus, "
            f"tfds:NAME, parquet:GLOB) instead."
        )
    if value == "moejax_corpus":
        return {"data.sources": "corpus"}
    if value == "multitask":
        return {"data.sources": "multitask"}
    return {"data.sources": f"tfds:{value}"}


RENAMES: dict[OldSpelling, Rename] = {
    "moe.router": Rename(("moe.scorer", "moe.selection"), _moe_router),
    # "rank" named no dispatcher: the LoRA experts mixed by one matmul over their ranks.
    ("lora.dispatcher", "rank"): renamed_value("lora.dispatcher", "none"),
    "data.dataset": Rename(("data.sources",), _data_dataset),
    # Each source is one evaluation domain (the corpus's records carry their own three).
    "data.domain_key": Rename(("data.sources",), lambda _value, _data: {}),
}


def _plain(config: Any) -> dict[str, Any]:
    """A copy of the tree as dicts of sections (ConfigDicts resolved), the input untouched."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {
        name: dict(section) if isinstance(section, Mapping) else section
        for name, section in config.items()
    }


def _shown(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


def apply_renames(
    config: Any, *, source: str = "config", renames: Mapping[OldSpelling, Rename] = RENAMES
) -> dict[str, Any]:
    """`config` (a ConfigDict or a mapping of sections) as a plain dict in the new spelling.

    Each old field (or old value of a field) found is replaced by its translation, with one
    `ConfigDeprecationWarning` naming the new fields; a removed field, or a value its
    translation cannot read, raises `ConfigError`. `source` names where the config came from
    in the messages."""
    tree = _plain(config)
    for key, rename in renames.items():
        value_entry = not isinstance(key, str)  # keyed (field, old value)
        old, old_value = key if value_entry else (key, None)
        section_name, field = old.split(".", 1)
        section = tree.get(section_name)
        if not isinstance(section, dict) or field not in section:
            continue
        value = section[field]
        if value_entry and (type(value) is not type(old_value) or value != old_value):
            continue  # the field holds another value, a current one
        if rename.translate is None:
            raise ConfigError(
                f"{source}: config.{old}={value!r} was removed; set {', '.join(rename.new)} "
                f"instead."
            )
        new = rename.translate(value, section)
        if old not in new:  # an old value is replaced in place
            del section[field]
        for name, new_value in new.items():
            target, new_field = name.split(".", 1)
            tree.setdefault(target, {})[new_field] = new_value
        if not new:
            warnings.warn(
                f"{source}: config.{old}={value!r} is no longer used and was ignored; see "
                f"{', '.join(rename.new)}.",
                ConfigDeprecationWarning,
                stacklevel=2,
            )
            continue
        flags = " ".join(f"--config.{name}={new_value}" for name, new_value in new.items())
        those = "those fields" if len(new) > 1 else "that"
        warnings.warn(
            f"{source}: config.{old}={value!r} is an old spelling, read as {_shown(new)}; set "
            f"{those} instead (e.g. {flags}).",
            ConfigDeprecationWarning,
            stacklevel=2,
        )
    return tree
