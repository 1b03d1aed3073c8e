"""Multi-host: two `python -m moejax.train` processes joined by `jax.distributed` (2 fake
CPU devices each, gloo collectives) train with the losses of one process (this one, one
device) on the same global batch, each feeding its own share of the data; their checkpoint
(written by both) holds the same parameters as the single process's and every process's
data position."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from testing_utils import REPO, cli_flags, make_tiny_config, xla_flags_with_devices

from moejax.config.validation import validate
from moejax.sharding.mesh import make_mesh
from moejax.train.checkpoint import Checkpointer
from moejax.train.distributed import initialize, local_data_state
from moejax.train.experiment import build_experiment
from moejax.train.loop import train
from moejax.train.writers import read_jsonl

STEPS = 3
CONFIG = "dense"  # the fastest to compile; the MoE layers are sharded like any parameter
TIMEOUT = 240  # a hung collective fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": xla_flags_with_devices(devices),
    }


def _launch(config, workdir, extra=(), env=None, name=CONFIG) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "moejax.train",
        *cli_flags(config, name),
        f"--workdir={workdir}",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env or _env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(procs) -> list[str]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-4000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _losses(workdir) -> list[float]:
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_corpus_dir, tmp_path_factory):
    config = make_tiny_config(
        tiny_corpus_dir,
        CONFIG,
        **{
            "train.steps": STEPS,
            "train.checkpoint_every": STEPS,
            "train.eval_every": 0,
            "data.global_batch_size": 8,
            "mesh.data": -1,
            "model.num_layers": 1,
        },
    )
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    port = _free_port()
    procs = [
        _launch(
            config,
            multi,
            [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        )
        for i in range(2)
    ]
    try:
        train(config, str(single))  # the reference: this process, one device
    finally:
        outs = _wait(procs)
    return config, single, multi, outs


def test_two_processes_train_like_one(runs):
    _, single, multi, outs = runs
    assert "(2 process(es))" in outs[0] and "4 x" in outs[0]  # 4 global devices
    assert "params:" in outs[0] and "params:" not in outs[1]  # only process 0 logs
    reference = _losses(single)
    assert len(reference) == STEPS and np.all(np.isfinite(reference))
    np.testing.assert_allclose(_losses(multi), reference, rtol=1e-5)


def test_multi_process_checkpoint_holds_both_data_positions_and_the_same_params(runs):
    config, single, multi, _ = runs
    s = validate(config, num_devices=1, num_processes=1)
    exp = build_experiment(s, make_mesh(s.mesh, devices=jax.devices()[:1]))
    restored = {}
    for name, workdir in (("single", single), ("multi", multi)):
        ckpt = Checkpointer(workdir, async_save=False)
        restored[name] = ckpt.restore(STEPS, target=exp.abstract_state)
        ckpt.close()
    per_process = restored["multi"][1]["per_process"]
    assert [p["settings"]["process_index"] for p in per_process] == [0, 1]
    assert local_data_state(restored["single"][1]) == restored["single"][1]
    # The union of the two processes' lanes is the single process's set of lanes.
    assert sorted(sum((p["lanes"] for p in per_process), [])) == sorted(
        restored["single"][1]["lanes"]
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jax.device_get(restored["multi"][0].params),
        jax.device_get(restored["single"][0].params),
    )


def test_two_processes_relay_out_the_experts_like_one(tiny_corpus_dir, tmp_path):
    """Re-sharded FSSDP over 2 processes x 2 devices (`mesh.expert=4`): every process plans
    the same layout from its own copy of the replicated window (no collective), the
    experts move every 2 steps (12 rows: 0 to 3 experts a device), and the losses are the
    one-device run's."""
    overrides = {
        "train.steps": 4,
        "train.checkpoint_every": 4,
        "train.eval_every": 0,
        "data.global_batch_size": 8,
        "moe.num_experts": 8,
        "moe.dispatcher": "fssdp",
        "moe.fssdp_reshard_every": 2,
        "moe.fssdp_spare_rows": 4,
    }
    config = make_tiny_config(tiny_corpus_dir, "deepseekmoe", **overrides, **{"mesh.expert": 4})
    port = _free_port()
    flags = [f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    procs = [
        _launch(config, tmp_path / "multi", [*flags, f"--process_id={i}"], name="deepseekmoe")
        for i in range(2)
    ]
    try:
        single = make_tiny_config(tiny_corpus_dir, "deepseekmoe", **overrides)
        train(single, str(tmp_path / "single"))  # one device: nothing moves
    finally:
        outs = _wait(procs)
    relayouts = [line for line in outs[0].splitlines() if "expert re-layout" in line]
    assert [line.split(":")[0] for line in relayouts] == ["step 2", "step 4"]
    assert "0.0% of experts moved" not in relayouts[0]
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=1e-5)


def test_incomplete_distributed_flags_are_rejected():
    from moejax.config_section import ConfigError

    with pytest.raises(ConfigError, match="missing --process_id"):
        initialize("127.0.0.1:1", num_processes=2)
    with pytest.raises(ConfigError, match="--process_id=2 must be in"):
        initialize("127.0.0.1:1", num_processes=2, process_id=2)


GLOO_SUM = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from moejax.train.distributed import initialize
assert initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
mesh = jax.make_mesh((4,), ("d",))
x = np.arange(16, dtype=np.float32).reshape(4, 4)
local = x[2 * jax.process_index(): 2 * jax.process_index() + 2]
arr = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("d")), local)
print(jax.device_count(), float(jax.jit(jnp.sum)(arr)))
"""


def test_gloo_collectives_sum_across_processes():
    """The issue's check: 2 processes x 2 devices see 4 devices and sum a 4-way array."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GLOO_SUM, f"127.0.0.1:{port}", "2", str(i)],
            cwd=REPO,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = _wait(procs)
    assert [o.splitlines()[-1].split() for o in outs] == [["4", "120.0"]] * 2
