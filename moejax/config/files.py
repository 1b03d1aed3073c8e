"""Config files (`configs/*.py`) are plain modules loaded by path: configs/ is not a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_config_file(path: str | Path) -> ModuleType:
    """Imports the config file at `path` (e.g. a config building on a sibling's shape)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"moejax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
