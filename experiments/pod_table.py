"""Compile every `size=pod` config for every TPU slice it has a layout for, and tabulate.

Each (config, topology) is one `python -m moejax.train.collective_report` run in its own
process (real XLA:TPU compiles on this host's CPU, with libtpu from the `tpu` extra; no TPU
needed): the step with the config's layout (`POD_LAYOUTS`, moejax/config/pod_layout.py),
its per-chip memory against the chip's HBM, XLA's FLOPs and bytes per step (extrapolated
from 1 and 2 layer periods) and the MFU bound they imply, and the collective bytes. The
JSON of each run is written to `--out` (one file per row) and the README table is printed
from those files.

    python experiments/pod_table.py                          # all rows (about an hour here)
    python experiments/pod_table.py --only=deepseekmoe --topology=v6e:16x16
    python experiments/pod_table.py --table                  # the table from saved JSON
    python experiments/pod_table.py --only=deepseekmoe --remat=none,dots,full
                                    # the layout's step under each remat policy (own files)

The remat variants are how a layout's `remat` is chosen: the policy with the highest MFU
bound (recomputation adds FLOPs) among those that fit with the headroom.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moejax.config.files import load_config_file  # noqa: E402
from moejax.config.pod_layout import HBM_HEADROOM  # noqa: E402

# name -> (config file, config arg, the file whose POD_LAYOUTS it uses)
ROWS = {
    "dense": ("configs/dense.py", "size=pod", "configs/dense.py"),
    "gshard": ("configs/gshard.py", "size=pod", "configs/gshard.py"),
    "rmoe": ("configs/rmoe.py", "size=pod", "configs/gshard.py"),
    "top_p": ("configs/top_p.py", "size=pod", "configs/gshard.py"),
    "deepseekmoe": ("configs/deepseekmoe.py", "size=pod", "configs/deepseekmoe.py"),
    "deepseek_v3": ("configs/deepseek_v3.py", "size=pod", "configs/deepseekmoe.py"),
    "lora_smora": (
        "configs/lora.py",
        "smora,base=deepseekmoe,size=pod",
        "configs/deepseekmoe.py",
    ),
}
GIB = 2**30


def topologies(row: str) -> list[str]:
    return list(load_config_file(os.path.join(REPO, ROWS[row][2])).POD_LAYOUTS)


def result_path(out: str, row: str, topology: str, remat: str = "") -> str:
    tag = f"__remat-{remat}" if remat else ""
    return os.path.join(out, f"{row}__{topology.replace(':', '_')}{tag}.json")


def run_row(row: str, topology: str, out: str, remat: str = "") -> dict:
    """One report run (the layout's remat, or `remat`); its JSON (plus the command and
    compile seconds) saved and returned."""
    path, arg, _ = ROWS[row]
    cmd = [
        sys.executable,
        "-m",
        "moejax.train.collective_report",
        f"--config={path}:{arg},topology={topology}",
    ] + ([f"--config.model.remat={remat}"] if remat else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        raise RuntimeError(f"{row} on {topology}: the report failed: {error}")
    report = json.loads(proc.stdout)
    report.update(
        row=row,
        command="python -m moejax.train.collective_report " + " ".join(cmd[3:]),
        compile_seconds=round(seconds, 1),
    )
    os.makedirs(out, exist_ok=True)
    with open(result_path(out, row, topology, remat), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _all_to_all_gib(report: dict) -> str:
    c = report.get("collectives", {})
    padded = c.get("all-to-all", {}).get("bytes", 0)
    ragged = c.get("ragged-all-to-all", {}).get("bytes", 0)
    text = f"{(padded + ragged) / GIB:.2f}"
    return text + " (bound)" if ragged else text


def _refused_bytes(report: dict) -> str:
    """'324.44G temporaries' from XLA's RESOURCE_EXHAUSTED message, or '?'."""
    match = re.search(r"HLO temporaries \(([\d.]+[KMGT]?)\)", report.get("compile_error", ""))
    return f"OOM: {match.group(1)} temporaries" if match else "?"


def table_row(report: dict) -> str:
    """One markdown row of the README table."""
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1)
    plan = report.get("dispatch_plan") or {}
    plan_text = f"{plan['dispatcher']}/{plan['gmm_impl']}" if plan.get("gmm_impl") else "dense"
    cost = report.get("cost", {})
    flops = cost.get("flops")
    total = f"{flops * report['devices'] / 1e15:,.0f}" if flops and cost.get("per_step") else "-"
    mfu = report.get("mfu_bound")
    peak = report.get("peak_bytes")
    fits = report.get("fits_hbm")
    hbm = report["hbm_bytes"] if "hbm_bytes" in report else report["chip"]["hbm_bytes"]
    headroom_ok = peak is not None and peak <= (1 - HBM_HEADROOM) * hbm
    if peak is not None:
        memory = f"{peak / GIB:.1f} / {hbm / GIB:.2f}"
    else:  # XLA refused to compile it: the temporaries it asked for, from its error
        memory = f"{_refused_bytes(report)} / {hbm / GIB:.2f}"
    return (
        f"| {report['row']} | {report['topology']['name']} ({report['devices']}) | "
        f"{report['num_params'] / 1e9:.2f}B | {mesh}, accum {report.get('grad_accum', '-')}, "
        f"remat {report.get('remat', '-')} | {plan_text} | "
        f"{memory} | "
        f"{'yes' if fits and headroom_ok else ('tight' if fits else 'NO')} | {total} | "
        f"{_all_to_all_gib(report)} | {f'{mfu:.2f}' if mfu else '-'} |"
    )


HEADER = (
    "| config | topology (chips) | params | layout | MoE plan | peak / HBM GiB per chip "
    "| fits | PFLOP per step | all-to-all GiB per chip per step | MFU bound |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def render(out: str, rows: list[str], remats: list[str] = ("",)) -> str:
    """The table of the saved reports of `rows` (each remat variant, if given)."""
    lines = [HEADER]
    for row in rows:
        for topology in topologies(row):
            for remat in remats:
                path = result_path(out, row, topology, remat)
                if os.path.exists(path):
                    with open(path) as f:
                        lines.append(table_row(json.load(f)))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help=f"comma-separated rows of {list(ROWS)}")
    parser.add_argument("--topology", default="", help="only this topology of each row")
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "pods"))
    parser.add_argument("--table", action="store_true", help="print the table from saved JSON")
    parser.add_argument(
        "--remat", default="", help="comma-separated remat policies to compare (own files)"
    )
    args = parser.parse_args(argv)
    rows = [r for r in args.only.split(",") if r] or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    remats = [r for r in args.remat.split(",") if r]
    failures: list[str] = []
    if not args.table:
        for row in rows:
            for topology in topologies(row):
                if args.topology and topology != args.topology:
                    continue
                for remat in remats or [""]:
                    what = f"{row} for {topology}" + (f" with remat {remat}" if remat else "")
                    print(f"compiling {what} ...", file=sys.stderr, flush=True)
                    try:
                        report = run_row(row, topology, args.out, remat)
                    except RuntimeError as e:  # one failed row must not lose the others
                        failures.append(str(e))
                        print(f"FAILED: {e}", file=sys.stderr, flush=True)
                        continue
                    print(table_row(report), file=sys.stderr, flush=True)
    if remats:  # the layout's own row first, then each variant
        print(render(args.out, rows, ["", *remats]))
    else:
        print(render(args.out, rows))
    if failures:
        sys.exit("rows that failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
