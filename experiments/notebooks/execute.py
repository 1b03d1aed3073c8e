"""Execute notebooks top to bottom with nbclient, from the repository root, and save their
outputs in place (what `jupyter nbconvert --execute --inplace` does, with the `test` extra's
packages only):

    python experiments/notebooks/execute.py experiments/notebooks/routing_analysis.ipynb

Environment variables reach the kernel (MOEJAX_TRACES, MOEJAX_SWEEPS, ...). Exit status 1
when a cell raises; the notebook is then left unchanged.
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def execute(path: str, timeout: int = 1800) -> nbformat.NotebookNode:
    """The notebook at `path` run from scratch (saved outputs cleared first)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()
    return nb


def main(paths: list[str]) -> int:
    for path in paths:
        try:
            nb = execute(path)
        except CellExecutionError as e:
            print(f"{path}: {str(e).splitlines()[-1] if str(e) else e}", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        print(f"executed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
