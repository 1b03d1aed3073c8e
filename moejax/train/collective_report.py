"""The collective report: what one train step moves between devices, and what it holds.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m moejax.train.collective_report --config=configs/deepseekmoe.py --strategy=fsdp

(or the same mesh as flags: `--config.mesh.data=1 --config.mesh.fsdp=-1`) builds the
experiment for the config on the current devices (the XLA flag simulates an 8-device pod
on CPU), lowers and compiles ONE train step from the abstract state (nothing
is initialised or run), and prints JSON:

  devices, mesh, dispatcher
  collectives   per kind (all-gather, reduce-scatter, all-reduce, all-to-all,
                collective-permute): count, bytes, wire_bytes per device per step, parsed
                from the compiled HLO (conventions in `moejax.sharding.hlo_collectives`)
  memory        per-device bytes: parameters and optimizer state (their shard shapes), and
                from XLA's `memory_analysis()` where the backend gives it: arguments,
                outputs, temporaries (activations and workspace), generated code

`collective_report(config)` returns the same dict (tests, notebooks). MaxText's AOT
compile for a target topology is the model: find the bytes and memory without the hardware.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.data.model_batch import padding_batch
from moejax.sharding.hlo_collectives import collective_bytes
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import batch_sharding
from moejax.sharding.strategies import apply_strategy
from moejax.train.experiment import build_experiment


def _shard_bytes(tree) -> int:
    """Per-device bytes of an abstract tree: each leaf's shard shape under its sharding
    (the largest shard where a dimension does not divide evenly)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if leaf is None:
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(s, mesh):
    """ShapeDtypeStructs of one global training batch, placed as `shard_batch` places it."""
    rows = s.data.global_batch_size // s.train.grad_accum * s.train.grad_accum
    example = padding_batch(rows, s.data.seq_len)
    sharding = batch_sharding(mesh, s.mesh.rules)
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in example.items()
    }


def _memory_analysis(compiled) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if stats is None:
        return {}
    fields = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    return {k: int(getattr(stats, v)) for k, v in fields.items() if hasattr(stats, v)}


def collective_report(config, devices=None) -> dict:
    """Compiles one train step of `config` on `devices` (default: all) and reports it."""
    devices = list(jax.devices() if devices is None else devices)
    s = validate(config, num_devices=len(devices))
    mesh = make_mesh(s.mesh, devices=devices)
    exp = build_experiment(s, mesh)
    compiled = exp.step_fn.lower(exp.abstract_state, abstract_batch(s, mesh)).compile()
    collectives = collective_bytes(compiled.as_text())
    unknown = collectives.pop("unknown_trip_count_loops")
    memory = {
        "params_bytes": _shard_bytes(exp.abstract_state.params),
        "opt_state_bytes": _shard_bytes(exp.abstract_state.opt_state),
    }
    memory.update(_memory_analysis(compiled))
    return {
        "devices": len(devices),
        "platform": devices[0].platform,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "dispatcher": s.moe.dispatcher if s.model.num_moe_layers else None,
        "num_params": int(
            sum(
                np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(exp.abstract_state.params)
            )
        ),
        "collectives": collectives,
        "total_bytes": sum(v["bytes"] for v in collectives.values()),
        "total_wire_bytes": sum(v["wire_bytes"] for v in collectives.values()),
        "memory": memory,
        "notes": {
            "bytes": "per device per train step; see moejax.sharding.hlo_collectives",
            "loops_without_trip_count": unknown,
        },
    }


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    config = flags.FLAGS["config"].value
    try:
        if flags.FLAGS["strategy"].value:
            apply_strategy(config, flags.FLAGS["strategy"].value)
        report = collective_report(config)
    except ConfigError as e:
        print(f"moejax: error: ConfigError: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(  # as moejax.train: old field spellings are accepted
        "config",
        None,
        "Config file (configs/*.py[:arg]).",
        lock_config=False,
        accept_new_attributes=True,
    )
    flags.DEFINE_string(
        "strategy",
        "",
        "Optional preset of moejax.sharding.strategies "
        "(data, fsdp, fsdp_tp, ep, fssdp), applied before the report.",
    )
    app.run(main)
