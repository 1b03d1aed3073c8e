"""The Triton-lowering kernels lower to Triton modules that pass the MLIR verifier, checked
without a GPU (see triton_module_check.py, run in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(
    jax.default_backend() == "gpu",
    reason="a GPU host compiles and runs these kernels in the other tests; there jax 0.11's "
    "Triton lowering refuses JAX_PLATFORMS=cpu without an abstract GPU device (H200, "
    "2026-12-04)",
)
def test_triton_lowered_kernels_verify():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    run = subprocess.run(
        [sys.executable, str(HERE / "triton_module_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert len(lines) == 8 and all(line.endswith(" ok") for line in lines), run.stdout
