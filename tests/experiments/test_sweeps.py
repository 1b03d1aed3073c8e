"""Every sweep defined beside a config yields distinct, valid configs."""

import importlib.util
import math
import os
import sys

import pytest
from testing_utils import REPO

from moejax.config.files import load_config_file
from moejax.config.validation import validate

spec = importlib.util.spec_from_file_location("sweep_runner", REPO / "experiments" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep_runner"] = sweep  # dataclasses look their module up
spec.loader.exec_module(sweep)

SWEEPS = []
for name in sorted(os.listdir(REPO / "configs")):
    if name.endswith(".py"):
        module = load_config_file(REPO / "configs" / name)
        SWEEPS += [(name, n[len("sweep_") :]) for n in dir(module) if n.startswith("sweep_")]


def test_there_are_sweeps():
    assert len(SWEEPS) >= 2


@pytest.mark.parametrize("config_name,sweep_name", SWEEPS)
def test_sweep_variants_are_valid_and_distinct(config_name, sweep_name, tmp_path):
    runs = sweep.plan(str(REPO / "configs" / config_name), sweep_name, str(tmp_path))
    assert len(runs) >= 2
    assert len({run.variant for run in runs}) == len(runs)
    for run in runs:
        # as many devices as the variant's mesh asks for (sweep_straggler: 8 simulated ones)
        mesh = run.config.mesh
        devices = math.prod(max(1, mesh[a]) for a in ("data", "fsdp", "expert", "tensor"))
        s = validate(run.config, num_devices=devices, num_processes=1)
        for key, value in run.overrides.items():
            section, field = key.split(".", 1)
            assert getattr(getattr(s, section), field) == value


def test_unknown_sweep_names_the_available_ones(tmp_path):
    with pytest.raises(sweep.SweepError, match="its sweeps are"):
        sweep.plan(str(REPO / "configs" / "gshard.py"), "nope", str(tmp_path))
