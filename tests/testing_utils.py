"""Helpers shared by test modules (importable thanks to `pythonpath = tests` in pytest.ini)."""
import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# The one small corpus the tests build (once per worker, by tests/conftest.py).
TEST_CORPUS_BYTES_PER_DOMAIN = 200_000


def load_config_module(name: str):
    """Imports configs/<name>.py by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                  REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
