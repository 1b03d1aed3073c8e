r"""The collective report: what one train step moves between devices, and what it holds.

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

For a TPU pod, without the pod (MaxText's `train_compile.py` is the model):

    python -m moejax.train.collective_report --config=configs/deepseekmoe.py:size=pod \
        --topology=v5p:4x4x8 [--num_slices=2]

compiles the step with the real XLA:TPU compiler for that topology's compile-only devices
(`moejax.sharding.topology`; needs the `tpu` extra, not a TPU) and adds:

  topology, chip     the slice, the chip and its HBM
  fits_hbm           arguments + outputs - donated aliases + temporaries <= the chip's HBM;
                     a step that XLA refuses as too large is reported, not raised
                     (`compile_error` holds XLA's message)
  cost               per-chip FLOPs and HBM bytes of one step (`cost_analysis()`). XLA
                     counts a loop body once, so the scanned step's own count covers one
                     layer per stack. `method` says how the per-step totals were obtained:
                     "unrolled" (`--unroll_layers`: model.scan_layers=False, every layer
                     compiled; slow for deep models) or "extrapolated" (the default on a
                     topology): two extra compiles of the same config cut to 1 and 2 layer
                     periods (first_k_dense dense layers + 1 or 2 x moe_every layers, or 1
                     and 2 layers of a dense model), unrolled, one micro-batch; per step =
                     c1 + (periods - 1)(c2 - c1), the difference being exactly one period
                     since everything else (embedding, head, loss, optimizer) is in both.
                     A per-layer `model.layer_kinds` that is no such periodic layout has
                     no period to cut: its cost stays the scanned step's own count.
                     The cut steps score the loss as one chunk (`train.loss_chunk` = the
                     micro-batch): the chunked loss is a scan XLA would count once, and one
                     chunk has the same FLOPs, recomputation included.
                     Either way, with `train.grad_accum` = A > 1 the micro-batch cost is
                     scaled by A, which counts the optimizer update A times (small next
                     to A micro-batches).
                     Attention run as the splash kernel (TPU, model.attention_impl auto or
                     flash) is a custom call XLA counts no FLOPs for; its model FLOPs
                     (12 L H Q S per token) are added, as `attention_flops_added`.
  mfu_bound          with per-step costs: model FLOPs per chip (6 N_active per token plus
                     attention, `moejax.models.flops`) / (roofline time x the chip's bf16
                     peak), the roofline time being max(FLOPs / peak, bytes / HBM
                     bandwidth): the MFU the step would reach if it ran at the roofline
                     of what it computes and moves, collectives fully overlapped

`collective_report(config, topology=...)` returns the same dict (tests, notebooks).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.data.model_batch import padding_batch
from moejax.models.flops import attention_flops_per_token, train_flops_per_token
from moejax.moe.dispatch import AUTO_PLAN, resolve_gmm_impl
from moejax.sharding.hlo_collectives import collective_bytes
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import batch_sharding
from moejax.sharding.strategies import apply_strategy, kept_fields
from moejax.sharding.topology import chip_of, parse_topology, tpu_devices
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


def memory_analysis(compiled) -> dict[str, int]:
    """The compiled program's buffer sizes in bytes, from XLA's `memory_analysis()`: those the
    backend reports ({} where it has none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if isinstance(stats, (list, tuple)):  # one per executable in some versions
        stats = stats[0] if stats else None
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


def _dispatch_plan(s, platform: str) -> dict | None:
    """The dispatcher and grouped-matmul impl the step runs on `platform` (`auto` resolved)."""
    if not s.model.num_moe_layers:
        return None
    if s.moe.dispatcher == "auto":
        dispatcher, impl = AUTO_PLAN.get(platform, AUTO_PLAN["cpu"])
    else:
        dispatcher = s.moe.dispatcher
        impl = AUTO_PLAN.get(platform, AUTO_PLAN["cpu"])[1] if s.moe.gmm_impl == "auto" else None
        impl = impl or resolve_gmm_impl(s.moe.gmm_impl)
    uses_gmm = dispatcher in ("ragged", "expert_parallel", "fssdp")
    return {
        "dispatcher": dispatcher,
        "gmm_impl": impl if uses_gmm else None,
        "kernel_backend": s.moe.kernel_backend if dispatcher == "pallas" else None,
    }


def _xla_cost(compiled) -> dict | None:
    """XLA's per-chip `{flops, bytes_accessed}` of a compiled program, or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    if cost.get("flops") is None:
        return None
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost.get("bytes accessed", 0))}


def _cost(compiled, s) -> dict:
    """XLA's per-chip cost of the step; `per_step` when no loop hides repeated work."""
    cost = _xla_cost(compiled)
    if cost is None:
        return {}
    per_step = not s.model.scan_layers
    scale = s.train.grad_accum if per_step else 1
    out = {k: v * scale for k, v in cost.items()}
    out["per_step"] = per_step
    out["method"] = "unrolled" if per_step else "scanned"
    if not per_step:
        out["note"] = "loop bodies counted once (scanned layers); --unroll_layers for totals"
    return out


def _kernel_attention_flops(s, platform: str, num_chips: int) -> float:
    """Per-chip FLOPs of attention run as the splash kernel (model.attention_impl auto or
    flash on TPU), which XLA cannot count (a Mosaic custom call without a cost estimate):
    the model's attention term, 12 L H Q S per token (`moejax.models.flops`)."""
    if platform != "tpu" or s.model.attention_impl == "xla":
        return 0.0
    per_token = attention_flops_per_token(s.model, s.data.seq_len)
    return per_token * s.data.global_batch_size * s.data.seq_len / num_chips


def _layer_periods(model) -> tuple[int, int, int]:
    """(layers before the repeated part, layers per period, periods) of a periodic model."""
    if model.num_moe_layers:
        first_k, every = model.periodic
        return first_k, every, model.num_moe_layers
    return 0, 1, model.num_layers


def _extrapolated_cost(config, s, devices) -> dict:
    """Per-step cost from the same config cut to 1 and 2 periods, unrolled, one micro-batch
    (module docstring); {} for a per-layer layout that has no periods."""
    if s.model.periodic is None:
        return {}
    prefix, period, periods = _layer_periods(s.model)
    costs = []
    for n in (1, 2) if periods > 1 else (1,):
        cut = config.copy_and_resolve_references()
        cut.model.num_layers = prefix + n * period
        if s.model.layer_kinds:  # the same periodic layout, said with the period fields
            cut.model.layer_kinds = ""
            cut.model.first_k_dense, cut.model.moe_every = s.model.periodic
        cut.model.scan_layers = False
        cut.data.global_batch_size = s.data.global_batch_size // s.train.grad_accum
        cut.train.grad_accum = 1
        if s.train.loss_chunk:  # one chunk: the loss scan's single trip is counted exactly
            cut.train.loss_chunk = cut.data.global_batch_size * s.data.seq_len
        cs = validate(cut, num_devices=len(devices))
        exp = build_experiment(cs, make_mesh(cs.mesh, devices=devices))
        compiled = exp.step_fn.lower(exp.abstract_state, abstract_batch(cs, exp.mesh)).compile()
        cost = _xla_cost(compiled)
        if cost is None:
            return {}
        costs.append(cost)
    c1, c2 = costs[0], costs[-1]
    out = {
        k: s.train.grad_accum * (c1[k] + (periods - 1) * (c2[k] - c1[k]))
        for k in ("flops", "bytes_accessed")
    }
    out.update(
        per_step=True,
        method="extrapolated",
        periods=periods,
        period_flops=(c2["flops"] - c1["flops"]) * s.train.grad_accum,
    )
    return out


def held_bytes(memory: dict) -> int:
    """What a step holds on a device at once, from `memory_analysis`: arguments + outputs -
    donated (aliased) + temporaries."""
    return (
        memory.get("argument_bytes", 0)
        + memory.get("output_bytes", 0)
        - memory.get("alias_bytes", 0)
        + memory.get("temp_bytes", 0)
    )


def _hbm(memory: dict, chip) -> dict:
    held = held_bytes(memory)
    return {"hbm_bytes": chip.hbm_bytes, "peak_bytes": held, "fits_hbm": held <= chip.hbm_bytes}


def _mfu_bound(s, cost: dict, chip, num_chips: int) -> dict:
    """Model FLOPs per chip over the roofline time x peak (module docstring)."""
    tokens = (s.data.global_batch_size // s.train.grad_accum * s.train.grad_accum) * (
        s.data.seq_len
    )
    model_flops = train_flops_per_token(s.model, s.moe, s.data.seq_len) * tokens / num_chips
    out = {"model_flops_per_chip": model_flops, "mfu_bound": None}
    if cost.get("per_step"):
        compute_s = cost["flops"] / chip.peak_flops
        memory_s = cost["bytes_accessed"] / chip.hbm_bandwidth
        roofline_s = max(compute_s, memory_s)
        out.update(
            roofline_seconds=roofline_s,
            bound_by="compute" if compute_s >= memory_s else "hbm_bandwidth",
            mfu_bound=model_flops / (roofline_s * chip.peak_flops),
        )
    return out


def _is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error)


def collective_report(
    config,
    devices=None,
    topology: str | None = None,
    num_slices: int | None = None,
    unroll_layers: bool = False,
    extrapolate_cost: bool = True,
) -> dict:
    """Compiles one train step of `config` and reports it: on `devices` (default: all), or on
    the compile-only devices of TPU `topology` (`moejax.sharding.topology`; None: the
    config's `mesh.topology`, if any; "local": the local devices). `unroll_layers` compiles
    without the layer scan; otherwise, on a topology, `extrapolate_cost` obtains per-step
    costs from two shallow compiles (module docstring)."""
    mesh_cfg = config.get("mesh", {})
    if topology is None and devices is None:
        topology = mesh_cfg.get("topology", "") or None
        num_slices = num_slices or mesh_cfg.get("num_slices", 1)
    if topology == "local":
        topology = None
    num_slices = num_slices or 1
    if unroll_layers:
        config = config.copy_and_resolve_references()
        config.model.scan_layers = False
    topo = None
    if topology:
        topo = parse_topology(topology, num_slices)  # a bad name fails before libtpu loads
        devices = tpu_devices(topo)
    devices = list(jax.devices() if devices is None else devices)
    s = validate(config, num_devices=len(devices))
    mesh = make_mesh(s.mesh, devices=devices)
    exp = build_experiment(s, mesh)
    platform = devices[0].platform
    report = {
        "devices": len(devices),
        "platform": platform,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "grad_accum": s.train.grad_accum,
        "remat": s.model.remat,
        "dispatcher": s.moe.dispatcher if s.model.num_moe_layers else None,
        "dispatch_plan": _dispatch_plan(s, platform),
        "num_params": int(
            sum(
                np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(exp.abstract_state.params)
            )
        ),
    }
    chip = None
    if topo is not None:
        chip = chip_of(devices[0])
        report["topology"] = {"name": topo.name, "num_slices": topo.num_slices}
        report["chip"] = {
            "name": chip.name,
            "hbm_bytes": chip.hbm_bytes,
            "peak_bf16_flops": chip.peak_flops,
            "hbm_bandwidth": chip.hbm_bandwidth,
        }
    memory = {
        "params_bytes": _shard_bytes(exp.abstract_state.params),
        "opt_state_bytes": _shard_bytes(exp.abstract_state.opt_state),
    }
    try:
        compiled = exp.step_fn.lower(exp.abstract_state, abstract_batch(s, mesh)).compile()
    except Exception as e:  # XLA refuses a step that cannot fit: report it
        if chip is None or not _is_out_of_memory(e):
            raise
        report.update(memory=memory, fits_hbm=False, compile_error=str(e).split("\n")[0])
        return report
    collectives = collective_bytes(compiled.as_text())
    unknown = collectives.pop("unknown_trip_count_loops")
    bound = [k for k in collectives.pop("bound_kinds") if collectives[k]["count"]]
    memory.update(memory_analysis(compiled))
    report.update(
        collectives=collectives,
        total_bytes=sum(v["bytes"] for v in collectives.values()),
        total_wire_bytes=sum(v["wire_bytes"] for v in collectives.values()),
        memory=memory,
    )
    cost = _cost(compiled, s)
    if cost and not cost["per_step"] and topo is not None and extrapolate_cost:
        cost = _extrapolated_cost(config, s, devices) or cost
    if cost.get("per_step"):
        cost["attention_flops_added"] = _kernel_attention_flops(s, platform, len(devices))
        cost["flops"] += cost["attention_flops_added"]
    if cost:
        report["cost"] = cost
    if chip is not None:
        report.update(_hbm(memory, chip))
        report.update(_mfu_bound(s, cost, chip, len(devices)))
    report["notes"] = {
        "bytes": "per device per train step; see moejax.sharding.hlo_collectives",
        "loops_without_trip_count": unknown,
    }
    if bound:
        report["notes"]["static_bound"] = (
            f"{', '.join(bound)}: bytes are the static bound (the whole exchange buffer); "
            "the op moves only the rows its runtime sizes name, and total_bytes includes "
            "the bound"
        )
    return report


def apply_cli_strategy(config, strategy: str, argv: list[str]) -> list[str]:
    """`--strategy` on the command line: the preset, except for the fields also set with
    `--config.<section>.<field>` flags in `argv`, which keep their value (`--strategy=ep
    --config.moe.dispatcher=ragged` reports `ragged`). Returns one note per kept field."""
    explicit = {a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")}
    notes = []
    for field in kept_fields(strategy, explicit):
        section, name = field.split(".", 1)
        notes.append(
            f"--strategy={strategy}: keeping --config.{field}={config[section][name]!r} from "
            f"the command line over the preset's"
        )
    apply_strategy(config, strategy, keep=explicit)
    return notes


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    config = flags.FLAGS["config"].value
    try:
        if flags.FLAGS["strategy"].value:
            for note in apply_cli_strategy(config, flags.FLAGS["strategy"].value, sys.argv):
                print(note, file=sys.stderr)
        report = collective_report(
            config,
            topology=flags.FLAGS["topology"].value or None,
            num_slices=flags.FLAGS["num_slices"].value,
            unroll_layers=flags.FLAGS["unroll_layers"].value,
            extrapolate_cost=flags.FLAGS["extrapolate_cost"].value,
        )
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"moejax: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
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
    flags.DEFINE_string(
        "topology",
        "",
        "Compile for this TPU topology: GEN:AxB[xC] (v5p:4x4x8, v6e:16x16) or a Cloud name "
        "(v5p-256, v6e-256, v5e-256); default: the config's mesh.topology if it names one, "
        "else the local devices; 'local': the local devices. Needs the `tpu` extra "
        "(libtpu), not a TPU.",
    )
    flags.DEFINE_integer(
        "num_slices", None, "With --topology: that many slices joined by DCN (default 1)."
    )
    flags.DEFINE_bool(
        "unroll_layers",
        False,
        "Compile without the layer scan (model.scan_layers=False): slower, but the cost "
        "analysis then counts every layer, which the MFU bound needs.",
    )
    flags.DEFINE_bool(
        "extrapolate_cost",
        True,
        "On a topology with scanned layers: two more compiles (1 and 2 layer periods, "
        "unrolled) for per-step FLOPs and bytes and the MFU bound. --noextrapolate_cost "
        "skips them (memory and collectives only).",
    )
    app.run(main)
