r"""Compress a run's MoE layers into a new run: `python -m moejax.compress prune|merge|quantize`.

    python -m moejax.compress prune --workdir=W --out=W2 --keep=6 --method=easy_ep \
        --calibration_sources=multitask --calibration_batches=4
    python -m moejax.compress merge --workdir=W --out=W2 --keep=4 --rank=0.5
    python -m moejax.compress quantize --workdir=W --out=W2 --policy=int4 \
        --kinds=attn,shared,experts
    python -m moejax.compress quantize --workdir=W --out=W2 --policy=mixed --avg_bits=3.5 \
        --candidate_bits=2,3,4,8 --method=gate_mass

All read checkpoint `--step` (default: the latest) of run `--workdir` with
`moejax.load_run`, calibrate on `--calibration_batches` batches of the training split of
`--calibration_sources` (a `data.sources` list; default the run's own;
`moejax.compress.calibrate`), and write the compressed model as the new run directory
`--out` (`moejax.compress.output`). `prune` keeps `--keep` experts per MoE layer (a count,
a fraction, or one count per MoE layer) by `--method` importance (`moejax.compress.prune`:
frequency, gate_mass, output_norm, easy_ep); `merge` merges each layer's experts into
`--keep` by Sub-MoE (`moejax.compress.merge`), at `--rank` (a fraction of the full rank,
or a count). `quantize` quantizes the weights of `--kinds` (attn, shared, experts, dense)
weight-only through qwix (`moejax.compress.quantize`): `--policy=int8|int4` every chosen
kind at that width; `mixed` the routed experts at per-expert widths from MC#'s integer
program (`moejax.compress.bit_allocation`, importance `--method`, budget `--avg_bits`) and
the other kinds at `--other_bits`; it calibrates only for `mixed`.
The compressed run evaluates (`python -m moejax.eval --workdir=W2`), samples,
fine-tunes and exports like any run. Prints one JSON line: what was kept and where.

Exit status 1 with one line on stderr when the run, the arguments or the data are unusable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence

from moejax.compress.bit_allocation import plan_expert_bits
from moejax.compress.calibrate import calibrate
from moejax.compress.merge import merge, plan_merge
from moejax.compress.output import write_compressed_run
from moejax.compress.prune import IMPORTANCE, prune, select
from moejax.compress.quantize import KIND_PATHS, QuantPolicy, quantize_variables
from moejax.config_section import ConfigError
from moejax.data import DataError, make_batches
from moejax.eval.data import eval_data_config
from moejax.train.checkpoint import CheckpointError
from moejax.train.run_loader import checkpoint_steps, load_run, resolve_step


def calibration_batches(s, sources, count, seq_len=0, batch_size=0, data_dir=None):
    """The first `count` training batches of `sources` (a few demonstrations)."""
    if count < 1:
        raise ConfigError(f"--calibration_batches={count} must be >= 1.")
    cfg = eval_data_config(s, sources, seq_len=seq_len, batch_size=batch_size, data_dir=data_dir)
    batches = make_batches(cfg, cfg.train_split, process_index=0, process_count=1)
    return list(itertools.islice(batches, count))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moejax.compress", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("prune", "merge", "quantize"):
        q = sub.add_parser(name, allow_abbrev=False)
        q.add_argument("--workdir", required=True, help="the run to compress")
        q.add_argument("--out", required=True, help="the new run directory")
        q.add_argument("--step", type=int, default=None, help="default: the latest")
        if name != "quantize":
            q.add_argument("--keep", required=True, help="experts per MoE layer: N, 0.5, N1,N2")
        q.add_argument("--calibration_sources", default=None, help="default: the run's")
        q.add_argument("--calibration_batches", type=int, default=4)
        q.add_argument("--seq_len", type=int, default=0, help="0: the run's")
        q.add_argument("--batch_size", type=int, default=0, help="0: the run's")
        q.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
        if name in ("prune", "quantize"):
            q.add_argument("--method", default="frequency", choices=sorted(IMPORTANCE))
        if name == "quantize":
            q.add_argument("--policy", required=True, choices=("int8", "int4", "mixed"))
            q.add_argument("--kinds", default="attn,shared,experts", help=",".join(KIND_PATHS))
            q.add_argument("--group_size", type=int, default=0, help="0: per output channel")
            q.add_argument("--avg_bits", type=float, default=3.0, help="mixed: experts' budget")
            q.add_argument("--candidate_bits", default="2,3,4,8", help="mixed: widths")
            q.add_argument("--other_bits", type=int, default=8, help="mixed: non-expert kinds")
        elif name == "merge":
            q.add_argument("--rank", default="1.0", help="fraction of full rank, or a count")
            q.add_argument("--top_k", type=int, default=0, help="0: min(the run's k, --keep)")
    return p


def run(args) -> dict:
    if args.command == "quantize":
        _policy(args)  # bad arguments fail before any work
    if checkpoint_steps(args.out):  # before any work: write_run refuses it too
        raise FileExistsError(f"--out={args.out} already holds checkpoints; name a new directory.")
    step = resolve_step(args.workdir, args.step)
    model, variables, s, _ = load_run(args.workdir, step)
    if s.lora.method != "none":
        raise ConfigError(
            f"{args.workdir} is an adapter run (lora.method={s.lora.method!r}); compress its "
            f"base run, or merge the adapters into the base weights first."
        )
    if args.command == "quantize":
        return _quantize(args, model, variables, s, step)
    cal = _calibrate(args, model, variables, s)
    record = {
        "command": args.command,
        "calibration": {
            "sources": args.calibration_sources or s.data.sources,
            "batches": args.calibration_batches,
            "layers": cal.summary(),
        },
    }
    if args.command == "prune":
        keep = select(cal, args.method, args.keep, model.moe.n_group)
        new_model, new_variables = prune(model, variables, keep)
        record.update(method=args.method, kept={str(i): ids.tolist() for i, ids in keep.items()})
    else:
        plan = plan_merge(model, variables, cal, args.keep, args.rank, args.top_k)
        new_model, new_variables = merge(model, variables, plan)
        record.update(
            rank=args.rank,
            clusters={str(i): [c.tolist() for c in p.clusters] for i, p in plan.items()},
        )
    write_compressed_run(args.workdir, step, args.out, new_model, new_variables, s, record)
    summary = {k: v for k, v in record.items() if k != "calibration"}
    summary.update(
        out=args.out,
        layer_kinds=new_model.model.layer_kinds,
        num_experts=new_model.moe.num_experts,
        top_k=new_model.moe.top_k,
    )
    return summary


def _policy(args) -> QuantPolicy:
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds:
        raise ConfigError("--kinds is empty; name some of attn,shared,experts,dense.")
    if args.policy == "mixed":
        bits = {k: args.other_bits for k in kinds if k != "experts"}
        if "experts" not in kinds:
            raise ConfigError(
                "--policy=mixed allocates the routed experts' bits; add experts to --kinds."
            )
        bits["experts"] = 8  # replaced per expert by the allocation
    else:
        bits = {k: int(args.policy[3:]) for k in kinds}
    return QuantPolicy(bits=bits, group_size=args.group_size)


def _calibrate(args, model, variables, s):
    """The calibration of the run on the batches the flags name."""
    batches = calibration_batches(
        s,
        args.calibration_sources,
        args.calibration_batches,
        args.seq_len,
        args.batch_size,
        args.data_dir,
    )
    return calibrate(model, variables, batches)


def _quantize(args, model, variables, s, step) -> dict:
    policy = _policy(args)
    bits = {**policy.bits, "experts": "mixed"} if args.policy == "mixed" else policy.bits
    record = {"command": "quantize", "policy": args.policy, "bits": bits}
    record["group_size"] = policy.group_size
    expert_bits = None
    if args.policy == "mixed":
        cal = _calibrate(args, model, variables, s)
        candidates = [int(b) for b in args.candidate_bits.split(",") if b]
        expert_bits = plan_expert_bits(
            model, variables, cal, args.method, candidates, args.avg_bits, policy.group_size
        )
        record.update(
            method=args.method,
            avg_bits=args.avg_bits,
            candidate_bits=candidates,
            expert_bits={str(i): b.tolist() for i, b in expert_bits.items()},
        )
    new_variables, report = quantize_variables(model, variables, policy, expert_bits)
    record.update(
        model_bytes=report["model_bytes"],
        float_model_bytes=report["float_model_bytes"],
        quantized_bytes=report["bytes"],
        quantized_float_bytes=report["float_bytes"],
        sq_error=report["sq_error"],
        storage="dequantized float weights (fake-quantized); model_bytes counts them as integers",
    )
    write_compressed_run(args.workdir, step, args.out, model, new_variables, s, record)
    return {**record, "out": args.out}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = run(args)
    except (CheckpointError, ConfigError, DataError, ValueError, FileExistsError) as e:
        print(f"moejax.compress: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
