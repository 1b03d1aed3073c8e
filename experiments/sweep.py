"""Run a sweep defined beside its config, one variant after another, and tabulate results.

A config file defines sweeps as functions `sweep_<name>(add)` that call
`add(**{"section.field": value, ...})` once per variant (big_vision style), and names the
metrics to compare in its docstring. This runner validates every variant before training
any, then trains each in `<workdir>/<variant>` and prints a table of final metrics.

    python experiments/sweep.py --config=configs/deepseekmoe.py --sweep=granularity \
        --workdir=runs/granularity --metrics=eval/loss,train/moe/load_cv
    python experiments/sweep.py ... --dry-run     # list the variants and their commands
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.config.files import load_config_file  # noqa: E402
from moejax.config.validation import validate  # noqa: E402
from moejax.paths import join, write_text  # noqa: E402


def variants(config_path: str, sweep: str, arg: str | None = None):
    """[(name, overrides, config)] for `sweep_<sweep>` of the config file at `config_path`."""
    module = load_config_file(config_path)
    fn = getattr(module, f"sweep_{sweep}", None)
    if fn is None:
        names = sorted(n[len("sweep_") :] for n in dir(module) if n.startswith("sweep_"))
        raise SystemExit(f"{config_path} has no sweep_{sweep}; its sweeps are {names}.")
    collected: list[dict] = []
    fn(lambda **overrides: collected.append(overrides))
    out = []
    for overrides in collected:
        config = module.get_config(arg)
        for key, value in overrides.items():
            section, field = key.split(".", 1)
            config[section][field] = value
        name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
        out.append((name, overrides, config))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="configs/X.py[:arg]")
    p.add_argument("--sweep", required=True, help="name of a sweep_<name> function")
    p.add_argument("--workdir", required=True)
    p.add_argument("--metrics", default="eval/loss")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    path, _, arg = args.config.partition(":")
    runs = variants(path, args.sweep, arg or None)
    for name, _, config in runs:  # every variant is checked before any is trained
        validate(config)
    results = {}
    for name, overrides, config in runs:
        workdir = join(args.workdir, name)  # a local directory or a gs:// URL
        flags = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
        print(
            f"== {name}: python -m moejax.train --config={args.config} {flags} --workdir={workdir}",
            flush=True,
        )
        if not args.dry_run:
            from moejax.train.loop import train

            results[name] = train(config, workdir)
    if results:
        metrics = args.metrics.split(",")
        print("\n" + " | ".join(["variant"] + metrics))
        for name, final in results.items():
            print(" | ".join([name] + [f"{final.get(m, float('nan')):.4f}" for m in metrics]))
        write_text(join(args.workdir, "sweep.json"), json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
