r"""Post-training trade-off curves (issue 22, item 6): every compression tool of
`moejax.compress` at several sizes, on trained runs, each result evaluated the same way.

For each run of `--runs` (moejax runs, or `moejax.train.convert_hf` runs fine-tuned here),
the variants of `PLANS` (those of `--tools`, or the names in `--only`) are written with
the compress command's own code path (`python -m moejax.compress prune|merge|quantize`,
`moejax.compress.__main__.run`) under `--workdir/<run name>/<variant>` and scored by
`moejax.eval.evaluate` on the first `--max_batches` held-out batches of the run's own
sources. The tools and their papers:

- prune, by four importances: assignment frequency, gate mass, output norm, and EASY-EP's
  output-aware importance x token contribution (Dong et al., 2025, arXiv 2504.06792);
- merge: Sub-MoE's subspace merging, clusters of experts -> a shared U and one V per expert
  by a joint SVD at a rank (Li et al., 2025, arXiv 2506.23266);
- quantize, weight-only through qwix: int8 and int4 for attention, shared and routed
  experts; MC#'s per-expert bit allocation by integer programme at an average width (Huang
  et al., 2025, arXiv 2510.10962), the other kinds at int8 (QuantMoE-Bench's question of
  which experts need more bits, Li et al., 2024).

A row: the variant, its model size in bytes (integer widths counted as such for the
quantized ones; every other leaf at float32) and as a fraction of the run's, the held-out
loss and bits per byte and their difference to the uncompressed run (with `--tasks`, the
greedy accuracy on the generated tasks; with `--export`, the largest logit difference
between the model and its `moejax.hf.save_pretrained` export loaded by transformers).
`results.json` holds every row, `results.md` the table of the means and standard deviations
over the runs. With `--decoding` (and `--tasks`), rows of decoding-time routing on the
uncompressed run too: SCMoE (Shi et al., 2024) and rewiring experts on the fly, by the
same greedy task accuracy.

    python -m experiments.post_training \
        --runs=runs/ablation/fine_grained_shared/seed0,runs/ablation/fine_grained_shared/seed1 \
        --workdir=runs/post_training --out=experiments/results/post_training/deepseekmoe_bpe
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # `python experiments/post_training.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moejax.compress.__main__ import _parser as compress_parser  # noqa: E402
from moejax.compress.__main__ import run as compress  # noqa: E402
from moejax.compress.quantize import tree_bytes  # noqa: E402
from moejax.config_section import ConfigError  # noqa: E402
from moejax.eval import evaluate  # noqa: E402
from moejax.eval.tasks import parse_tasks, task_accuracy  # noqa: E402
from moejax.generate import generate  # noqa: E402
from moejax.generate.rewire import rewire_generate  # noqa: E402
from moejax.generate.scmoe import scmoe_generate  # noqa: E402
from moejax.hf import save_pretrained  # noqa: E402
from moejax.train.run_loader import load_run  # noqa: E402

# (variant name, the compress command's arguments); keep counts are fractions of each
# MoE layer's experts.
PLANS = {
    "prune": [
        (f"prune_{method}_{keep}", ["prune", f"--method={method}", f"--keep={keep}"])
        for method in ("frequency", "gate_mass", "output_norm", "easy_ep")
        for keep in ("0.75", "0.5", "0.25")
    ],
    "merge": [
        (f"merge_{keep}_rank{rank}", ["merge", f"--keep={keep}", f"--rank={rank}"])
        for keep, rank in (("0.75", "1.0"), ("0.5", "1.0"), ("0.25", "1.0"), ("0.5", "0.5"))
    ],
    "quantize": [
        ("int8", ["quantize", "--policy=int8"]),
        ("int4", ["quantize", "--policy=int4"]),
        ("mixed_4", ["quantize", "--policy=mixed", "--avg_bits=4", "--method=gate_mass"]),
        ("mixed_3", ["quantize", "--policy=mixed", "--avg_bits=3", "--method=gate_mass"]),
        ("mixed_2.5", ["quantize", "--policy=mixed", "--avg_bits=2.5", "--method=gate_mass"]),
    ],
}


# Decoding-time routing, scored by the same greedy task accuracy (`generate_fn` of
# `moejax.eval.tasks.task_accuracy`): SCMoE's contrast with the rank-2 expert (Shi et al.,
# 2024: alpha 0.1, beta 0.5 as the authors' default, and 1.0) and rewiring's router-logit
# delta updated every 4 generated tokens (Rewiring Experts on the Fly).
DECODERS = {
    "greedy": generate,
    "scmoe_beta0.5": functools.partial(scmoe_generate, rank=2, beta=0.5),
    "scmoe_beta1.0": functools.partial(scmoe_generate, rank=2, beta=1.0),
    "rewire_lr0.1": lambda *a, **k: rewire_generate(*a, every=4, lr=0.1, **k)[0],
    "rewire_lr1.0": lambda *a, **k: rewire_generate(*a, every=4, lr=1.0, **k)[0],
}


def export_and_compare(loaded, path: str) -> float:
    """Exports the run with `moejax.hf.save_pretrained`, loads it with transformers and
    returns the largest logit difference between the two on 2 x 16 random token ids."""
    import torch
    import transformers

    model, variables, _, _ = loaded
    save_pretrained(model, variables, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = np.random.default_rng(0).integers(0, model.model.vocab_size, (2, 16))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)(variables, ids)[0])
    return float(np.abs(got - want).max())


def score(
    workdir: str,
    args,
    export_dir: str,
    quantized_bytes: int | None = None,
    decoders: Sequence[str] = (),
) -> tuple[dict, dict]:
    """Held-out loss (and task accuracy with `--tasks`) of the run at `workdir`, and its
    size: `quantized_bytes` (what the quantize command counted, integer widths as such) or
    its float params; with `--export`, its export into `export_dir` compared with
    transformers; with `decoders`, also {decoder: task accuracies}."""
    loaded = load_run(workdir)
    report = evaluate(loaded, tasks=args.tasks or None, max_batches=args.max_batches)
    row = {
        "bytes": quantized_bytes or tree_bytes(loaded.variables["params"]),
        "loss": report["loss"],
        "bits_per_byte": report["bits_per_byte"],
        "dead_experts": sum(layer.get("dead_experts", 0) for layer in report["experts"]),
    }
    if "tasks" in report:
        row.update(accuracy=report["tasks"]["mean"], tasks=report["tasks"])
    if args.export:
        try:
            row["export_max_logit_diff"] = export_and_compare(loaded, export_dir)
        except ConfigError as e:  # no HF architecture expresses this model: say which
            row["export_error"] = str(e)
    decoded = {}
    model, variables, s, tokenizer = loaded
    for name in decoders:
        accuracy = task_accuracy(
            model,
            variables,
            tokenizer,
            parse_tasks(args.tasks),
            seed=s.data.seed,
            generate_fn=DECODERS[name],
        )
        decoded[name] = {"accuracy": accuracy["mean"], "tasks": accuracy}
    return row, decoded


def run_plan(run: str, name: str, out_root: str, plan: list, args) -> list[dict]:
    decoders = [d for d in args.decoding.split(",") if d]
    # The source run is only read: its export goes beside the compressed runs.
    base_export = os.path.join(out_root, name, "uncompressed_hf")
    base, decoded = score(run, args, base_export, decoders=decoders)
    rows = [{"run": name, "tool": "none", "variant": "uncompressed", **base}]
    print(f"[{name}] uncompressed: loss {base['loss']:.4f}, {base['bytes'] / 1e6:.2f} MB")
    for decoder, result in decoded.items():
        rows.append({"run": name, "tool": "decode", "variant": decoder, **base, **result})
        rows[-1].update(size=1.0, delta_loss=0.0)
        print(f"[{name}] decoding {decoder}: accuracy {result['accuracy']:.3f}", flush=True)
    for tool, variant, argv in plan:
        out = os.path.join(out_root, name, variant)
        if os.path.isdir(out):
            shutil.rmtree(out)  # a half-written variant of an interrupted call
        t0 = time.perf_counter()
        cargs = compress_parser().parse_args(
            [
                *argv,
                f"--workdir={run}",
                f"--out={out}",
                f"--calibration_batches={args.calibration_batches}",
            ]
        )
        try:
            summary = compress(cargs)
        except (ConfigError, ValueError) as e:  # this variant cannot be made: say so, go on
            rows.append({"run": name, "tool": tool, "variant": variant, "error": str(e)})
            print(f"[{name}] {variant}: FAILED: {e}", flush=True)
            continue
        scored, _ = score(out, args, os.path.join(out, "hf"), summary.get("model_bytes"))
        row = {"run": name, "tool": tool, "variant": variant, **scored}
        row["size"] = row["bytes"] / base["bytes"]
        row["delta_loss"] = row["loss"] - base["loss"]
        rows.append(row)
        print(
            f"[{name}] {variant}: size {row['size']:.3f}, loss {row['loss']:.4f} "
            f"({row['delta_loss']:+.4f})"
            + (f", accuracy {row['accuracy']:.3f}" if "accuracy" in row else "")
            + f" in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        jax.clear_caches()  # every variant has its own shapes
    return rows


def table(rows: list[dict]) -> str:
    """Mean ± std over the runs of each variant (population std, as `experiments.sweep`)."""
    variants: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "error" not in r:  # a variant that could not be made is in results.json only
            variants.setdefault((r["tool"], r["variant"]), []).append(r)
    accuracy = any("accuracy" in r for r in rows)
    lines = [
        "| tool | variant | size (fraction of the run) | held-out loss | Δ loss | bits per byte |"
        + (" task accuracy |" if accuracy else "")
        + " runs |",
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if accuracy else "") + " --- |",
    ]

    def ms(values, digits=3):
        return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"

    for (tool, variant), rs in variants.items():
        size = ms([r.get("size", 1.0) for r in rs])
        delta = ms([r["delta_loss"] for r in rs]) if tool not in ("none", "decode") else "-"
        loss = ms([r["loss"] for r in rs]) if tool != "decode" else "(the run's)"
        bpb = ms([r["bits_per_byte"] for r in rs]) if tool != "decode" else "-"
        acc = f" {ms([r['accuracy'] for r in rs])} |" if accuracy else ""
        lines.append(f"| {tool} | {variant} | {size} | {loss} | {delta} | {bpb} |{acc} {len(rs)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.post_training", description=__doc__)
    p.add_argument("--runs", required=True, help="comma-separated run directories")
    p.add_argument("--names", default="", help="a name per run (default: parent/basename)")
    p.add_argument("--workdir", required=True, help="where the compressed runs go")
    p.add_argument("--out", required=True, help="directory for results.json and results.md")
    p.add_argument("--tools", default="prune,merge,quantize", help="subset of " + ",".join(PLANS))
    p.add_argument("--only", default="", help="variant names to run (default: all)")
    p.add_argument("--max_batches", type=int, default=12, help="held-out batches per source")
    p.add_argument("--calibration_batches", type=int, default=4)
    p.add_argument(
        "--export",
        action="store_true",
        help="also export each model to HF and record the largest logit difference",
    )
    p.add_argument("--tasks", default="", help="generated tasks to score (all: every one)")
    p.add_argument(
        "--decoding", default="", help="with --tasks: decoders to score, of " + ",".join(DECODERS)
    )
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    names = [n for n in args.names.split(",") if n] or [
        "/".join(os.path.normpath(r).split(os.sep)[-2:]) for r in runs
    ]
    if len(names) != len(runs):
        p.error(f"--names gives {len(names)} names for {len(runs)} runs")
    for r in runs:
        if not os.path.isdir(r):
            p.error(f"--runs: {r} is not a directory")
    if args.decoding and not args.tasks:
        p.error("--decoding scores task accuracy: add --tasks (e.g. --tasks=all)")
    unknown = [d for d in args.decoding.split(",") if d and d not in DECODERS]
    if unknown:
        p.error(f"--decoding: unknown {unknown[0]!r}; choose from {', '.join(DECODERS)}")
    only = {v for v in args.only.split(",") if v}
    plan = [
        (tool, variant, argv)
        for tool in args.tools.split(",")
        for variant, argv in PLANS[tool]
        if not only or variant in only
    ]
    rows = []
    for run, name in zip(runs, names):
        rows += run_plan(run, name.replace("/", "_"), args.workdir, plan, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    markdown = table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
