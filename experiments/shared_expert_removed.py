r"""DeepSeekMoE's "shared expert removed" ablation, on trained runs: evaluate a run with its
shared expert disabled and one more routed expert activated instead.

Dai et al., 2024, "DeepSeekMoE" (arXiv 2401.06066), section 4.5, "Shared Experts Are
Irreplaceable by Routed Experts": the trained DeepSeekMoE 2B is evaluated with the shared
expert disabled and one more routed expert per token (so the compute stays the same), and
its Pile loss rises sharply. Here each run of `--workdirs` (or every seed of
`--sweep_dir`'s `--variant`) is read back with `moejax.load_run`, its MoE layers' `shared`
parameters are dropped, `moe.n_shared` becomes 0 and `moe.top_k` grows by
`--extra_routed` (default 1), and both models are scored on the run's validation batches by
the trainer's own evaluation (`moejax.train.evaluation.evaluate`, `train.eval_batches` per
source), which is where the run's `eval/loss` came from.

    python -m experiments.shared_expert_removed --sweep_dir=runs/ablation \
        --variant=fine_grained_shared
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # `python experiments/shared_expert_removed.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from moejax.config.validation import Sections  # noqa: E402
from moejax.sharding.mesh import make_mesh  # noqa: E402
from moejax.train.evaluation import evaluate  # noqa: E402
from moejax.train.experiment import build_experiment  # noqa: E402
from moejax.train.run_loader import load_run  # noqa: E402


def without_shared(params: Any) -> Any:
    """`params` with every MoE layer's `shared` subtree (the shared expert) removed."""
    if not isinstance(params, dict):
        return params
    return {k: without_shared(v) for k, v in params.items() if k != "shared"}


def shared_removed_sections(s: Sections, extra_routed: int) -> Sections:
    """The run's sections with no shared expert and `extra_routed` more routed experts."""
    if not s.moe.n_shared:
        raise ValueError("the run has no shared expert (moe.n_shared=0): nothing to remove.")
    top_k = s.moe.top_k + extra_routed
    if top_k > s.moe.num_experts:
        raise ValueError(
            f"--extra_routed={extra_routed}: top_k {top_k} would exceed the "
            f"{s.moe.num_experts} routed experts."
        )
    return dataclasses.replace(s, moe=dataclasses.replace(s.moe, n_shared=0, top_k=top_k))


def eval_loss(s: Sections, variables: dict) -> dict[str, float]:
    """The trainer's evaluation of `variables` under config `s` on this host's devices."""
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    params = variables["params"]
    collections = {k: v for k, v in variables.items() if k != "params"} or None
    return evaluate(exp.eval_fn, params, s, mesh, collections=collections)


def compare(workdir: str, extra_routed: int = 1) -> dict[str, float]:
    """eval/loss of the run as trained and with its shared expert removed."""
    _, variables, s, _ = load_run(workdir)
    full = eval_loss(s, variables)
    removed = eval_loss(
        shared_removed_sections(s, extra_routed),
        {**variables, "params": without_shared(variables["params"])},
    )
    return {
        "workdir": workdir,
        "eval/loss": full["eval/loss"],
        "eval/loss shared removed": removed["eval/loss"],
        "top_k": s.moe.top_k,
        "top_k shared removed": s.moe.top_k + extra_routed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.shared_expert_removed",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--workdirs", default="", help="run directories, comma-separated")
    p.add_argument("--sweep_dir", default="", help="a sweep directory (with --variant)")
    p.add_argument("--variant", default="fine_grained_shared")
    p.add_argument("--extra_routed", type=int, default=1)
    p.add_argument("--out", default="", help="a JSON file for the results")
    args = p.parse_args(argv)
    workdirs = [w for w in args.workdirs.split(",") if w]
    if args.sweep_dir:
        workdirs += sorted(glob.glob(os.path.join(args.sweep_dir, args.variant, "seed*")))
    if not workdirs:
        p.error("give --workdirs or --sweep_dir (no run found)")
    rows = [compare(w, args.extra_routed) for w in workdirs]
    for row in rows:
        print(
            f"{row['workdir']}: eval/loss {row['eval/loss']:.4f} (shared + top-{row['top_k']}) "
            f"-> {row['eval/loss shared removed']:.4f} (no shared, "
            f"top-{row['top_k shared removed']})"
        )
    if len(rows) > 1:
        for key in ("eval/loss", "eval/loss shared removed"):
            values = np.array([r[key] for r in rows])
            print(f"{key}: {values.mean():.4f} ± {values.std(ddof=1):.4f} over {len(rows)} runs")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
