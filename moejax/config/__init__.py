"""Config tree, section dataclasses and the one validation function.

Imports are lazy: section dataclasses in each package import `moejax.config.sections`, and
`moejax.config.base` imports those packages back.
"""

import importlib

_EXPORTS = {
    "SECTIONS": "moejax.config.base",
    "default_config": "moejax.config.base",
    "ConfigError": "moejax.config.sections",
    "Sections": "moejax.config.validation",
    "validate": "moejax.config.validation",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moejax.config' has no attribute {name!r}")
