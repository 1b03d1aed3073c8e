r"""Run a config's sweep (variants x seeds), N runs at a time, and tabulate mean ± std.

    python -m experiments.sweep --config=configs/deepseekmoe.py:tokenizer=bpe --sweep=ablation \
        --workdir=runs/ablation --seeds=3 --parallel=2 --metrics=eval/loss,train/moe/load_cv \
        --config.train.steps=250
    python -m experiments.sweep --config=configs/gshard.py:size=pod --sweep=capacity \
        --workdir=gs://bucket/capacity --dry_run      # one launch command per run

Variants come from the config file's `sweep_<name>(add[, config])` function
(`moejax/config/sweeps.py`; it may derive sizes from the base config), times the
`--grid=section.field=v1,v2` axes (their product) and the `--zip=section.field=v1,v2` axes
(taken together), or from those axes alone without `--sweep`. `--config.section.field=value`
changes the base config of every variant (the variant's own overrides win), `--only=NAME`
keeps the variants whose name matches one of the comma-separated globs, and `--seeds=N` runs
each with `train.seed = data.seed = s` for s in 0..N-1 (or `--seeds=0,3,7`).

Every variant is validated before any run starts (against the devices each run will get;
with `--dry_run` against the devices its mesh names: `mesh.topology`'s chips, else the
product of the fixed mesh sizes, not this host's). Each run is one
`python -m moejax.train ... --workdir=<workdir>/<variant>/seed<s>` process whose output goes
to `train.log` there (for a gs:// workdir: under ./sweep_logs), and whose state is
`sweep_status.json` there (any `etils.epath` path):

- a run whose status is `done` with the same command is skipped; any other (interrupted,
  failed, or done with another command, e.g. more steps) is started again, and the trainer
  resumes it from its latest checkpoint, never overwriting one;
- a failed run (non-zero exit) is recorded with its exit status and last log line, and the
  sweep goes on;
- `--parallel=N` runs N at a time and splits the devices between them (`--devices`,
  `--platform`): CUDA_VISIBLE_DEVICES on GPU, one to four chips per run on a TPU VM
  (TPU_VISIBLE_CHIPS and process bounds), the CPU cores (affinity) on CPU;
- Ctrl-C or SIGTERM forwards SIGTERM to the runs (each saves a checkpoint and stops) and
  writes the tables of what finished; rerunning the command resumes the rest.

Afterwards, `<workdir>/results.csv` (one row per run: status, final and best value of each
metric), `results.md` (per variant: mean ± std over the finished seeds, final and best; with
`--baseline=VARIANT` also each variant's final values minus the baseline's, paired seed by
seed, which cancels what a seed's data order does to every variant alike),
`curves.csv` (every logged value of the metrics, step by step: variant, seed, step, metric,
value) and `sweep.json` (the runs, their commands and status). Final = the last logged value,
best = the lowest (every metric swept here is a loss, a spread or a fraction to minimise);
per-layer metrics are averaged over layers first.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

if __package__ in (None, ""):  # `python experiments/sweep.py`: the repository on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.config.files import load_config_file  # noqa: E402
from moejax.config.sweeps import (  # noqa: E402
    Variant,
    apply_overrides,
    format_value,
    grid,
    parse_value,
    product,
    sweep_variants,
    variant_name,
    zip_axes,
)
from moejax.config.validation import validate  # noqa: E402
from moejax.config_section import ConfigError  # noqa: E402
from moejax.sharding.topology import parse_topology  # noqa: E402

STATUS_FILE = "sweep_status.json"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
SEED_FIELDS = ("train.seed", "data.seed")
TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}  # chips per process -> their bounds
TPU_PORT = 8476


class SweepError(Exception):
    """A bad sweep definition or command line: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------------------
# The plan: variants x seeds -> runs.


@dataclasses.dataclass
class Run:
    """One training run of the sweep."""

    variant: str
    seed: int
    overrides: dict[str, Any]  # the whole command line's: base (--config.*), variant, seed
    workdir: str
    config: Any  # the ConfigDict the trainer will build from the command

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


def _config_spec(spec: str) -> tuple[str, str | None]:
    path, _, arg = spec.partition(":")
    return path, arg or None


def _base_config(module: Any, spec: str) -> Any:
    path, arg = _config_spec(spec)
    try:
        return module.get_config(arg)
    except (ConfigError, ValueError, TypeError) as e:
        raise SweepError(f"--config={spec}: {e}") from None


def _axes(items: Sequence[str], base: Any, flag: str) -> dict[str, list[Any]]:
    """`--grid`/`--zip` items `section.field=v1,v2` -> {field: [typed values]}."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SweepError(f"{flag}={item!r} must look like section.field=v1,v2.")
        try:
            axes[key] = [parse_value(base, key, text) for text in values.split(",")]
        except ConfigError as e:
            raise SweepError(f"{flag}={item}: {e}") from None
    return axes


def seeds_of(text: str) -> list[int]:
    """`--seeds=3` -> [0, 1, 2]; `--seeds=0,5` -> [0, 5]."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise SweepError(f"--seeds={text!r} must be a count (3) or a list (0,5,7).") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SweepError(f"--seeds={text!r} must name at least one distinct seed >= 0.")
    return seeds


def plan(
    config_spec: str,
    sweep: str | None,
    workdir: str,
    *,
    seeds: Sequence[int] = (0,),
    overrides: dict[str, str] | None = None,
    grid_items: Sequence[str] = (),
    zip_items: Sequence[str] = (),
    only: str = "",
) -> list[Run]:
    """The runs of a sweep, in order (variant by variant, seed by seed)."""
    path, _ = _config_spec(config_spec)
    try:
        module = load_config_file(path)
    except FileNotFoundError as e:
        raise SweepError(f"--config={config_spec}: {e}") from None
    base = _base_config(module, config_spec)
    try:
        base_overrides = {k: parse_value(base, k, v) for k, v in (overrides or {}).items()}
        apply_overrides(base, base_overrides)
        variants = sweep_variants(module, sweep, base) if sweep else [Variant("base", {})]
        axes = product(
            grid(_axes(grid_items, base, "--grid")) if grid_items else [{}],
            zip_axes(_axes(zip_items, base, "--zip")) if zip_items else [{}],
        )
    except ConfigError as e:
        raise SweepError(str(e)) from None
    if not sweep and axes == [{}]:
        raise SweepError("nothing to sweep: give --sweep=NAME, --grid or --zip.")
    combined = []
    for v in variants:
        for extra in axes:
            clash = sorted(set(v.overrides) & set(extra))
            if clash:
                raise SweepError(
                    f"{clash[0]} is set by sweep variant {v.name!r} and by --grid/--zip; "
                    f"sweep it in one place."
                )
            name = (
                v.name
                if not extra
                else variant_name(extra)
                if not sweep
                else (f"{v.name},{variant_name(extra)}")
            )
            combined.append(Variant(name, {**v.overrides, **extra}))
    if only:
        patterns = [p for p in only.split(",") if p]
        kept = [v for v in combined if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
        if not kept:
            raise SweepError(
                f"--only={only!r} matches none of the variants {[v.name for v in combined]}."
            )
        combined = kept
    runs = []
    for v in combined:
        for seed in seeds:
            config = _base_config(module, config_spec)
            run_overrides = {**base_overrides, **v.overrides, **dict.fromkeys(SEED_FIELDS, seed)}
            try:
                apply_overrides(config, run_overrides)
            except ConfigError as e:
                raise SweepError(f"variant {v.name}: {e}") from None
            run_dir = os.path.join(workdir, v.name, f"seed{seed}")
            runs.append(Run(v.name, seed, run_overrides, run_dir, config))
    return runs


def planned_devices(config: Any) -> int:
    """The devices a config's mesh is laid out for: `mesh.topology`'s chips (times
    `mesh.num_slices`), else the product of its fixed sizes (an axis of -1 counts 1)."""
    mesh = config.mesh
    if mesh.get("topology"):
        try:
            return parse_topology(mesh.topology, mesh.get("num_slices", 1)).chips
        except ValueError as e:
            raise ConfigError(f"mesh.topology={mesh.topology!r}: {e}") from None
    return math.prod(max(int(mesh.get(a, 1)), 1) for a in ("data", "fsdp", "expert", "tensor"))


def check_runs(runs: Sequence[Run], num_devices: int | None) -> None:
    """Validates every variant once (seeds only change seeds) before anything runs;
    `num_devices` None: each against the devices its own mesh names."""
    problems = []
    first = {}
    for run in runs:
        first.setdefault(run.variant, run)
    for run in first.values():
        try:
            devices = planned_devices(run.config) if num_devices is None else num_devices
            validate(run.config, num_devices=devices, num_processes=1)
        except ConfigError as e:
            problems.append(run)
            print(f"sweep: variant {run.variant}: {e}", file=sys.stderr)
    if problems:
        raise SweepError(
            f"{len({r.variant for r in problems})} variant(s) do not validate (above); "
            f"nothing was started."
        )


def train_command(run: Run, config_spec: str, python: str = sys.executable) -> list[str]:
    """`python -m moejax.train --config=... --config.<field>=<value>... --workdir=...`."""
    flags = [f"--config.{k}={format_value(v)}" for k, v in run.overrides.items()]
    return [
        python,
        "-m",
        "moejax.train",
        f"--config={config_spec}",
        *flags,
        f"--workdir={run.workdir}",
    ]


# ----------------------------------------------------------------------------------------
# Devices: what each of the N parallel slots may use.


@dataclasses.dataclass(frozen=True)
class Slot:
    """What one of the parallel runs may use: environment variables, CPU cores, and how many
    accelerator devices that gives it (None: unknown, validate against the mesh)."""

    env: dict[str, str]
    cpus: frozenset[int] | None = None
    num_devices: int | None = None
    label: str = "all devices"


def detect_platform() -> str:
    """cpu, gpu or tpu: JAX_PLATFORMS if set, else the devices this host has (the sweep
    process itself never starts a JAX backend, so a GPU stays free for its runs)."""
    wanted = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if wanted:
        return {"cuda": "gpu", "rocm": "gpu"}.get(wanted, wanted)
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    if shutil.which("nvidia-smi"):
        return "gpu"
    return "cpu"


def detect_devices(platform: str) -> list[str]:
    """The ids of this host's devices of `platform` (CPU: the cores this process may use)."""
    if platform == "gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return [d for d in visible.split(",") if d]
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.strip()]
    if platform == "tpu":
        chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
        return [str(i) for i in range(len(chips))]
    return [str(c) for c in sorted(os.sched_getaffinity(0))]


def simulated_cpu_devices(xla_flags: str | None = None) -> int:
    """The CPU devices each run will see: N of `--xla_force_host_platform_device_count=N` in
    XLA_FLAGS (the runs inherit it: a simulated pod, e.g. `sweep_straggler`'s 8), else 1."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(found[-1]) if found else 1


def device_slots(platform: str, devices: Sequence[str], parallel: int) -> list[Slot]:
    """Splits `devices` into `parallel` equal groups (the remainder unused), one per slot."""
    if parallel < 1:
        raise SweepError(f"--parallel={parallel} must be >= 1.")
    if parallel == 1:
        return [Slot({}, None, len(devices) if platform != "cpu" else None)]
    per = len(devices) // parallel
    if per == 0:
        if platform == "cpu":  # fewer cores than runs: they share them
            return [Slot({}, None, None, "shared cores") for _ in range(parallel)]
        raise SweepError(
            f"--parallel={parallel} runs need at least one {platform} device each, and this "
            f"host has {len(devices)} ({','.join(devices)}); lower --parallel."
        )
    groups = [list(devices[i * per : (i + 1) * per]) for i in range(parallel)]
    slots = []
    for i, group in enumerate(groups):
        ids = ",".join(group)
        if platform == "gpu":
            slots.append(Slot({"CUDA_VISIBLE_DEVICES": ids}, None, per, f"GPU {ids}"))
        elif platform == "tpu":
            if per not in TPU_BOUNDS:
                raise SweepError(
                    f"--parallel={parallel} gives each run {per} TPU chips; a TPU VM splits "
                    f"into runs of {sorted(TPU_BOUNDS)} chips: choose --parallel so that "
                    f"{len(devices)} / parallel is one of those."
                )
            port = TPU_PORT + i
            env = {
                "TPU_VISIBLE_CHIPS": ids,
                "TPU_VISIBLE_DEVICES": ids,
                "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_BOUNDS[per],
                "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
                "TPU_MESH_CONTROLLER_PORT": str(port),
            }
            slots.append(Slot(env, None, per, f"TPU chips {ids}"))
        elif platform == "cpu":
            slots.append(Slot({}, frozenset(int(c) for c in group), None, f"CPU cores {ids}"))
        else:
            raise SweepError(f"--platform={platform!r}: choose cpu, gpu or tpu.")
    return slots


# ----------------------------------------------------------------------------------------
# Running: N at a time, status files, skipping and resuming.


def is_local(path: str) -> bool:
    """Whether `path` is on this machine's file system (not gs:// and the like)."""
    return "://" not in str(path)


def log_path(run: Run) -> str:
    """Where a run's console output goes: `train.log` in its workdir, or for a remote
    workdir (gs://) the same relative path under ./sweep_logs on this machine."""
    if is_local(run.workdir):
        return os.path.join(run.workdir, LOG_FILE)
    return os.path.join("sweep_logs", str(run.workdir).split("://", 1)[1], LOG_FILE)


def read_status(run: Run) -> dict | None:
    path = epath.Path(run.workdir) / STATUS_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def _write_status(run: Run, status: dict) -> None:
    directory = epath.Path(run.workdir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(directory / STATUS_FILE)


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1][:500] if lines else ""


def is_done(run: Run, command: list[str]) -> bool:
    status = read_status(run)
    return bool(status) and status.get("status") == "done" and status.get("command") == command


@dataclasses.dataclass
class _Active:
    run: Run
    proc: subprocess.Popen
    slot: int
    started: float
    log: Any


def run_all(
    runs: Sequence[Run],
    commands: Sequence[list[str]],
    slots: Sequence[Slot],
    *,
    log: Callable[[str], None] = print,
    poll: float = 0.5,
) -> dict[str, str]:
    """Runs every run whose status is not `done` with its command, `len(slots)` at a time;
    returns {run name: status} (done, failed, skipped, interrupted)."""
    outcome: dict[str, str] = {}
    todo = []
    for i, (run, command) in enumerate(zip(runs, commands)):
        if is_done(run, command):
            outcome[run.name] = "skipped"
        else:
            todo.append(i)
    if outcome:
        log(f"sweep: {len(outcome)} run(s) already done, skipped: {', '.join(outcome)}")
    active: dict[int, _Active] = {}
    free = list(range(len(slots)))
    total = len(todo)
    started_count = 0
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or active:
            while todo and free and stop["signal"] is None:
                i = todo.pop(0)
                run, command, slot_index = runs[i], commands[i], free.pop(0)
                slot = slots[slot_index]
                before = read_status(run)
                resumed = (epath.Path(run.workdir) / "checkpoints").exists()
                epath.Path(run.workdir).mkdir(parents=True, exist_ok=True)
                os.makedirs(os.path.dirname(log_path(run)), exist_ok=True)
                logf = open(log_path(run), "a", encoding="utf-8")
                logf.write(f"\n== sweep: {shlex.join(command)}\n")
                logf.flush()
                cpus = slot.cpus
                proc = subprocess.Popen(
                    command,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **slot.env},
                    preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
                )
                _write_status(
                    run,
                    {
                        "status": "running",
                        "command": command,
                        "variant": run.variant,
                        "seed": run.seed,
                        "pid": proc.pid,
                        "started": time.time(),
                        "devices": slot.label,
                    },
                )
                started_count += 1
                how = "resuming" if resumed else "starting"
                if before and before.get("status") == "failed":
                    how = "retrying (failed before)"
                log(f"[{started_count}/{total}] {how} {run.name} on {slot.label}: {run.workdir}")
                active[i] = _Active(run, proc, slot_index, time.time(), logf)
            if stop["signal"] is not None and not todo and not active:
                break
            if stop["signal"] is not None:
                todo.clear()
                for a in active.values():
                    if a.proc.poll() is None:
                        a.proc.send_signal(signal.SIGTERM)
            finished = [i for i, a in active.items() if a.proc.poll() is not None]
            for i in finished:
                a = active.pop(i)
                a.log.close()
                free.append(a.slot)
                free.sort()
                rc = a.proc.returncode
                elapsed = time.time() - a.started
                last = _last_line(log_path(a.run))
                if rc == 0:
                    status = "done"
                elif stop["signal"] is not None:
                    status = "interrupted"
                else:
                    status = "failed"
                _write_status(
                    a.run,
                    {
                        "status": status,
                        "command": commands[i],
                        "variant": a.run.variant,
                        "seed": a.run.seed,
                        "returncode": rc,
                        "seconds": round(elapsed, 1),
                        "finished": time.time(),
                        **({"error": last} if status != "done" else {}),
                    },
                )
                outcome[a.run.name] = status
                detail = "" if status == "done" else f" (exit {rc}): {last}"
                log(f"{status} {a.run.name} in {elapsed:.0f} s{detail}")
            if active:
                time.sleep(poll)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        for run in runs:
            outcome.setdefault(run.name, "not started")
    return outcome


# ----------------------------------------------------------------------------------------
# Results: final and best values, mean ± std over seeds, curves.


def _scalar(value: Any) -> float | None:
    """A logged value as one number: per-layer lists are averaged; None stays None."""
    if value is None:
        return None
    if isinstance(value, list):
        flat = []
        stack = list(value)
        while stack:
            v = stack.pop()
            if isinstance(v, list):
                stack.extend(v)
            elif v is not None:
                flat.append(float(v))
        return sum(flat) / len(flat) if flat else None
    return float(value)


def read_curves(workdir: str, metrics: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} from a run's metrics.jsonl, one value per step (after a
    resume the later record of a repeated step wins), in step order."""
    path = epath.Path(workdir) / METRICS_FILE
    by_step: dict[str, dict[int, float]] = {m: {} for m in metrics}
    if not path.exists():
        return {m: [] for m in metrics}
    with path.open("r") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            for m in metrics:
                value = _scalar(record.get(m))
                if value is not None and math.isfinite(value):
                    by_step[m][int(record["step"])] = value
    return {m: sorted(values.items()) for m, values in by_step.items()}


def summarize(runs: Sequence[Run], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: variant, seed, status, last step, and final/best of each metric."""
    rows = []
    for run in runs:
        status = read_status(run) or {"status": "not started"}
        curves = read_curves(run.workdir, metrics)
        steps = [s for c in curves.values() for s, _ in c]
        row = {
            "variant": run.variant,
            "seed": run.seed,
            "status": status.get("status"),
            "step": max(steps) if steps else None,
            "workdir": run.workdir,
            "error": status.get("error", ""),
        }
        for m in metrics:
            values = [v for _, v in curves[m]]
            row[f"final:{m}"] = values[-1] if values else None
            row[f"best:{m}"] = min(values) if values else None
        rows.append(row)
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant (in sweep order): runs done / total, and mean ± std over the finished
    seeds of each final and best value."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        done = [r for r in mine if r["status"] in ("done", "skipped")]
        entry: dict[str, Any] = {
            "variant": variant,
            "done": len(done),
            "runs": len(mine),
            "failed": sum(r["status"] == "failed" for r in mine),
        }
        for m in metrics:
            for kind in ("final", "best"):
                values = [r[f"{kind}:{m}"] for r in done if r[f"{kind}:{m}"] is not None]
                entry[f"{kind}:{m}"] = mean_std(values) if values else None
        out.append(entry)
    return out


def _pm(value: tuple[float, float] | None, n: int) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def markdown_table(summary: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """The per-variant table: mean ± std over the finished seeds."""
    head = ["variant", "seeds done"]
    for m in metrics:
        head += [f"{m} (final)", f"{m} (best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in summary:
        cells = [
            e["variant"],
            f"{e['done']}/{e['runs']}" + (f" ({e['failed']} failed)" if e["failed"] else ""),
        ]
        for m in metrics:
            cells += [_pm(e[f"final:{m}"], e["done"]), _pm(e[f"best:{m}"], e["done"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str], baseline: str) -> str:
    """Each variant's final values minus the baseline variant's, seed by seed (the same seed:
    the same initialisation seed and data order), as mean ± std over the seeds both finished;
    `*` marks a mean difference larger than its standard deviation over seeds."""
    done = [r for r in rows if r["status"] in ("done", "skipped")]
    base = {r["seed"]: r for r in done if r["variant"] == baseline}
    if not base:
        raise SweepError(
            f"--baseline={baseline!r} has no finished run; the variants are "
            f"{sorted({r['variant'] for r in rows})}."
        )
    head = ["variant", "paired seeds"] + [f"Δ {m} (final)" for m in metrics]
    lines = [
        f"Paired by seed, against {baseline} (negative: lower than {baseline}):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for variant in dict.fromkeys(r["variant"] for r in done):
        if variant == baseline:
            continue
        paired = sorted(r["seed"] for r in done if r["variant"] == variant and r["seed"] in base)
        cells = [variant, str(len(paired))]
        for m in metrics:
            key = f"final:{m}"
            diffs = [
                r[key] - base[r["seed"]][key]
                for r in done
                if r["variant"] == variant
                and r["seed"] in base
                and r[key] is not None
                and base[r["seed"]][key] is not None
            ]
            if not diffs:
                cells.append("-")
                continue
            mean, std = mean_std(diffs)
            mark = " *" if len(diffs) > 1 and abs(mean) > std else ""
            cells.append(f"{mean:+.4f} ± {std:.4f}{mark}" if len(diffs) > 1 else f"{mean:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    workdir: str,
    runs: Sequence[Run],
    commands: Sequence[list[str]],
    metrics: Sequence[str],
    baseline: str | None = None,
) -> str:
    """Writes results.csv, results.md, curves.csv and sweep.json; returns the markdown.
    With `baseline` (a variant), results.md also holds the paired differences against it."""
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs, metrics)
    fields = list(rows[0]) if rows else ["variant", "seed", "status"]
    with (directory / "results.csv").open("w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with (directory / "curves.csv").open("w") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "step", "metric", "value"])
        for run in runs:
            for m, curve in read_curves(run.workdir, metrics).items():
                writer.writerows([run.variant, run.seed, step, m, value] for step, value in curve)
    summary = aggregate(rows, metrics)
    table = markdown_table(summary, metrics)
    failed = [r for r in rows if r["status"] == "failed"]
    text = table + "\n"
    if baseline:
        text += "\n" + paired_table(rows, metrics, baseline) + "\n"
    if failed:
        text += "\nFailed runs:\n\n" + "".join(
            f"- {r['variant']}/seed{r['seed']}: {r['error']}\n" for r in failed
        )
    (directory / "results.md").write_text(text)
    with (directory / "sweep.json").open("w") as f:
        json.dump(
            [
                {
                    "variant": r.variant,
                    "seed": r.seed,
                    "workdir": r.workdir,
                    "overrides": r.overrides,
                    "command": c,
                    "status": (read_status(r) or {}).get("status", "not started"),
                }
                for r, c in zip(runs, commands)
            ],
            f,
            indent=2,
            default=str,
        )
    return text


# ----------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--config.section.field=value: changes the base config of every variant.",
    )
    p.add_argument("--config", required=True, help="configs/X.py[:arg]")
    p.add_argument("--sweep", default=None, help="NAME of a sweep_NAME function of the config")
    p.add_argument("--workdir", required=True, help="the sweep directory (one per sweep)")
    p.add_argument("--metrics", default="eval/loss", help="comma-separated metrics to tabulate")
    p.add_argument("--seeds", default="1", help="N seeds (0..N-1) or a list 0,5,7")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--grid", action="append", default=[], help="section.field=v1,v2 (product)")
    p.add_argument("--zip", action="append", default=[], help="section.field=v1,v2 (together)")
    p.add_argument("--only", default="", help="variant names or globs to run, comma-separated")
    p.add_argument(
        "--baseline", default="", help="a variant: results.md adds differences to it, by seed"
    )
    p.add_argument("--platform", default="auto", choices=["auto", "cpu", "gpu", "tpu"])
    p.add_argument("--devices", default="auto", help="device ids to split (auto: all of them)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print one command per run")
    p.add_argument(
        "--results_only", action="store_true", help="only rewrite the tables from the runs"
    )
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """The flags, and the `--config.section.field=value` overrides in order."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    unknown = []
    for item in rest:
        if item.startswith("--config.") and "=" in item:
            key, _, value = item[len("--config.") :].partition("=")
            overrides[key] = value
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        runs = plan(
            args.config,
            args.sweep,
            args.workdir,
            seeds=seeds_of(args.seeds),
            overrides=overrides,
            grid_items=args.grid,
            zip_items=args.zip,
            only=args.only,
        )
        commands = [train_command(run, args.config) for run in runs]
        metrics = [m for m in args.metrics.split(",") if m]
        if args.baseline and args.baseline not in {r.variant for r in runs}:
            raise SweepError(
                f"--baseline={args.baseline!r} is not a variant of this sweep: "
                f"{sorted({r.variant for r in runs})}."
            )
        if args.results_only:
            print(write_results(args.workdir, runs, commands, metrics, args.baseline or None))
            return 0
        if args.dry_run:
            check_runs(runs, None)  # against each mesh's own devices, not this host's
            for run in runs:  # for a scheduler: its own `python`
                print(shlex.join(train_command(run, args.config, python="python")))
            return 0
        platform = detect_platform() if args.platform == "auto" else args.platform
        devices = (
            detect_devices(platform)
            if args.devices == "auto"
            else [d for d in args.devices.split(",") if d]
        )
        slots = device_slots(platform, devices, args.parallel)
        per_run = slots[0].num_devices if platform != "cpu" else simulated_cpu_devices()
        check_runs(runs, per_run)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 1
    print(
        f"sweep: {len(runs)} run(s) ({len({r.variant for r in runs})} variant(s) x "
        f"{len({r.seed for r in runs})} seed(s)), {len(slots)} at a time on {platform}",
        flush=True,
    )
    outcome = run_all(runs, commands, slots, log=lambda s: print(s, flush=True))
    try:
        text = write_results(args.workdir, runs, commands, metrics, args.baseline or None)
    except SweepError as e:  # e.g. the baseline variant failed: the plain tables are written
        text = write_results(args.workdir, runs, commands, metrics) + f"\n({e})"
    print("\n" + text, flush=True)
    print(f"sweep: tables in {os.path.join(args.workdir, 'results.md')} and results.csv")
    if any(s == "interrupted" for s in outcome.values()):
        return 130
    return 1 if any(s == "failed" for s in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
