r"""Evaluate a run: `python -m moejax.eval --workdir=W [--step=S] [--sources=...] [--tasks=...]
[--json]`.

Reads checkpoint `--step` (default: the latest) with `moejax.load_run` and prints
`moejax.eval.evaluate`'s report: per-source loss and bits per byte over the held-out
documents of `--sources` (a `data.sources` list; default the run's own; `none`: skip),
accuracy on the generated tasks `--tasks` (`all` or e.g. `rev,add`) by greedy decoding, and
each MoE layer's expert usage. `--json` prints the report as one JSON object; otherwise a
short table.

    python -m moejax.eval --workdir=runs/deepseekmoe --sources=corpus --max_batches=8
    python -m moejax.eval --workdir=runs/mole --sources=none --tasks=all --json

Exit status 1 with one line on stderr when the workdir, checkpoint, config, sources or tasks
are unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from moejax.config_section import ConfigError
from moejax.data import DataError
from moejax.eval.evaluate import evaluate
from moejax.eval.tasks import TaskError
from moejax.train.checkpoint import CheckpointError


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose the held-out data."""
    p.add_argument("--max_batches", type=int, default=0, help="per source; 0: all")
    p.add_argument("--seq_len", type=int, default=0, help="0: the run's")
    p.add_argument("--batch_size", type=int, default=0, help="0: the run's")
    p.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moejax.eval", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--workdir", required=True, help="a run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--sources", default=None, help="data.sources list; none: skip")
    p.add_argument("--tasks", default=None, help="all, or generated tasks rev,rot,srt,add")
    p.add_argument("--per_task", type=int, default=0, help="inputs per task; 0: 64")
    add_data_flags(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def format_report(report: dict) -> str:
    lines = []
    if "loss" in report:
        lines.append(
            f"loss {report['loss']:.4f}  bits/byte {report['bits_per_byte']:.4f}  "
            f"tokens {report['tokens']}"
        )
        for name, r in report["sources"].items():
            lines.append(
                f"  {name:<12} loss {r['loss']:.4f}  bits/byte {r['bits_per_byte']:.4f}  "
                f"tokens {r['tokens']}"
            )
    for name, acc in report.get("tasks", {}).items():
        lines.append(f"task {name:<5} accuracy {acc:.3f}")
    for layer in report["experts"]:
        if "assignments" in layer:
            lines.append(
                f"moe layer {layer['moe_layer']} (layer {layer['model_layer']}): "
                f"{layer['num_experts']} experts, load cv {layer['load_cv']:.3f}, "
                f"max load {layer['max_load']:.2f}, dead {layer['dead_experts']}, "
                f"entropy {layer['entropy_bits']:.3f} bits"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = evaluate(
            args.workdir,
            args.sources,
            args.tasks,
            step=args.step,
            max_batches=args.max_batches,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            per_task=args.per_task,
        )
    except (CheckpointError, ConfigError, DataError, TaskError, ValueError) as e:
        print(f"moejax.eval: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
