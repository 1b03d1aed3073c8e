"""The dependency rules of CONTRIBUTING.md hold, and the checks that enforce them can fail.

`.importlinter` holds the contracts (packages import only downwards; no cycle between the
modules of a package; the model and the MoE layer never import `moejax.lora`), checked by
import-linter's `lint-imports`. Each contract is run on the tree as it is (kept) and on a
copy with one deliberately bad import (broken, naming the offending import). Two rules
import-linter does not express are checked here with `ast`: no function-level import of a
moejax module (those exist only to dodge cycles), and the bottom package `moejax.nn` imports
nothing but jax, flax and the standard library.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from testing_utils import REPO

PACKAGE = pathlib.Path(REPO) / "moejax"
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")
NN_MAY_IMPORT = {"jax", "flax", "numpy", "__future__", "dataclasses", "typing", "functools", "math"}


def run_contracts(root: pathlib.Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the `moejax` package found in `root` (its .importlinter)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / ".importlinter"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def tree_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "repo"
    shutil.copytree(PACKAGE, root / "moejax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(pathlib.Path(REPO) / ".importlinter", root / ".importlinter")
    return root


def add_import(path: pathlib.Path, line: str) -> None:
    """Appends a module-level import (at the end, after every definition)."""
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")


def test_contracts_are_kept():
    result = run_contracts(pathlib.Path(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    root = tree_copy(tmp_path)
    add_import(root / "moejax" / "moe" / "experts.py", "import moejax.lora.targets")
    result = run_contracts(root)
    assert result.returncode == 1
    assert "Packages import only downwards BROKEN" in result.stdout
    assert "moejax.moe is not allowed to import moejax.lora" in result.stdout
    assert "moejax.moe.experts -> moejax.lora.targets" in result.stdout
    # lora imports moe, so the upward import also closes a package-level cycle.
    assert "No import cycle between the modules of a package BROKEN" in result.stdout
    assert "- .moe -> .lora (1 import)" in result.stdout


def test_a_cycle_inside_a_package_breaks_the_acyclic_contract(tmp_path):
    root = tree_copy(tmp_path)
    # moejax.moe.layer imports moejax.moe.routers; the way back closes a cycle.
    add_import(root / "moejax" / "moe" / "routers.py", "import moejax.moe.layer")
    result = run_contracts(root)
    assert result.returncode == 1
    assert "No import cycle between the modules of a package BROKEN" in result.stdout
    assert "Packages import only downwards KEPT" in result.stdout


def test_a_model_importing_lora_breaks_the_adapter_hook_contract(tmp_path):
    root = tree_copy(tmp_path)
    # models sits above lora in the layers, so only the forbidden contract catches this.
    add_import(root / "moejax" / "models" / "transformer.py", "import moejax.lora.hook")
    result = run_contracts(root)
    assert result.returncode == 1
    assert "The model and the MoE layer reach adapters only through the hook BROKEN" in (
        result.stdout
    )
    assert "moejax.models.transformer -> moejax.lora.hook" in result.stdout
    assert "Packages import only downwards KEPT" in result.stdout


def imports_of(path: pathlib.Path):
    """(node, inside_a_function) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    functions = [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in nested


def module_names(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""] if node.level == 0 else ["moejax (relative)"]


def test_no_function_level_moejax_import():
    late = [
        f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node, in_function in imports_of(path)
        for name in module_names(node)
        if in_function and name.startswith("moejax")
    ]
    assert late == []


def test_the_bottom_package_imports_only_jax_flax_and_the_standard_library():
    outside = sorted(
        f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
        for path in (PACKAGE / "nn").rglob("*.py")
        for node, _ in imports_of(path)
        for name in module_names(node)
        if name.split(".")[0] not in NN_MAY_IMPORT and not name.startswith("moejax.nn")
    )
    assert outside == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    import moejax.train\n", ["moejax.train"]),
        ("import jax\n", []),
    ],
)
def test_the_function_level_check_sees_nested_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    found = [name for node, inside in imports_of(path) for name in module_names(node) if inside]
    assert found == expected


def module_level_state(path: pathlib.Path) -> list[str]:
    """Module-level names bound to a mutable set or list, `global` statements and memoising
    decorators: state a module would keep between calls."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in tree.body:
        value = getattr(node, "value", None)
        names = [
            getattr(t, "id", "") for t in getattr(node, "targets", [getattr(node, "target", None)])
        ]
        if names == ["__all__"]:
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and (
            isinstance(value, (ast.List, ast.Set, ast.ListComp, ast.SetComp))
            or (isinstance(value, ast.Call) and getattr(value.func, "id", "") in {"set", "list"})
        ):
            found.append(f"{path.name}:{node.lineno} module-level mutable container")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{path.name}:{node.lineno} global {', '.join(node.names)}")
        for deco in getattr(node, "decorator_list", []):
            text = ast.unparse(deco)
            if "lru_cache" in text or text.endswith("cache"):
                found.append(f"{path.name}:{node.lineno} @{text}")
    return found


def test_no_module_level_mutable_state():
    # Registries are dicts filled once at import; collected side outputs travel through
    # `sow` and return values, caches through jax.jit's own static-argument cache.
    state = [s for path in sorted(PACKAGE.rglob("*.py")) for s in module_level_state(path)]
    assert state == []


def test_the_state_check_sees_what_it_forbids(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import functools\n_SCOPES = []\nSEEN: set = set()\n"
        "@functools.lru_cache(maxsize=2)\ndef f():\n    global _SCOPES\n"
    )
    assert module_level_state(path) == [
        "m.py:2 module-level mutable container",
        "m.py:3 module-level mutable container",
        "m.py:5 @functools.lru_cache(maxsize=2)",
        "m.py:6 global _SCOPES",
    ]
