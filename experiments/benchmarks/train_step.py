r"""Benchmark: whole training steps of a config (tokens/s, model TFLOP/s, MFU, memory).

Builds the trainer's own model, optimizer and jitted train step (`build_experiment`: forward,
backward, AdamW update, donated state) for each case, feeds it one fixed synthetic batch
(random token ids of the config's vocabulary, one document per row, every token counted in
the loss; the batch format of `moejax.data.model_batch`), so no data pipeline is timed and
nothing is downloaded or written. Each case is compiled ahead of time
(`step.lower(state, batch).compile()`, `compile_s`), run `--warmup` steps, then `--steps`
timed steps, each blocked on its result, each fed the state the previous one returned. Cases
run one after the other (one model's state in memory at a time), not interleaved.

    python experiments/benchmarks/train_step.py --json      # H200: 130 s; CPU: ~1-2 min
    python experiments/benchmarks/train_step.py --json --dispatchers auto --remat none
    python experiments/benchmarks/train_step.py --json --batch 2 --seq-len 32 --warmup 1 \
        --steps 2 --set moe.capacity_factor=4 --dispatchers ragged,capacity_einsum,bogus \
        --remat none                                        # seconds (the test)

`--config` defaults to `configs/deepseekmoe.py:size=gpu` on GPU/TPU (16 layers, d 1024,
64 experts of 512, top-6, 2 shared, bfloat16, 8 x 4096 tokens: 1.70B parameters, 0.34B
active) and to the tiny `configs/deepseekmoe.py` on CPU (16 x 256 tokens). `--set
section.field=value` (repeatable) overrides the config as `python -m moejax.train`'s
`--config.section.field=value` does; `--batch` and `--seq-len` set `data.global_batch_size`
and `data.seq_len`.

Cases: `dense`, the baseline, is the same model with a dense SwiGLU FFN in every layer at
the same active width, d_ff = top_k x d_expert + the shared width (`model.moe_every=0`); one
case per `moe.dispatcher` that applies on the platform: `auto` first, then `pallas` (skipped
on CPU, where its kernels run in Pallas interpret mode), `capacity_einsum`, `hybrid` (the
XLA:CPU plan: CPU only unless named in `--dispatchers`), `ragged`; `expert_parallel` and
`fssdp` with more than one device only (`mesh.expert` set to split the experts);
`dense_reference` never (E/k times the routed FLOPs); the plan `auto` resolves to runs last
(the same program as `auto`: the first to go when time is short). Then `auto` under each
`model.remat` policy of `--remat` other than the config's own (default: `full` and `none`),
as `auto/remat=full`. `--dispatchers` and `--remat` replace those lists, `--skip` drops cases
by name. `--dispatchers auto+fused` runs a dispatcher with `moe.fuse_gate_up=True`
(`moe_layer.py`'s `VARIANTS`); `--profile auto,dense` traces those cases for two more steps
and adds `profile` to their entries, the device time per step summed by op name
(`kernel_profile.py`; GPU/TPU). A case that raises (out of memory on a GPU, a bad name) is
recorded as `{"error": "<type>: <first line>"}` and the run goes on. A case whose steps
would take over `--case-budget-s` (judged from its first) runs one warm-up step at most and
fewer timed ones (`steps` says how many); on GPU/TPU a case that would start after
`--time-budget-s` (default 180) is skipped, so the JSON is out within a short session. Each
case's result is also logged to stderr as it completes. A config without MoE layers runs as
`dense` alone.

`--json` prints one JSON object on stdout (progress on stderr; else a table): `device`,
`device_kind`, `platform`, `num_devices`, `device_bytes_limit` (GPU), `jax`, `jaxlib`,
`python`, `cuda` (CUDA runtime / cuDNN / ... versions jax's CUDA plugin reports, else null),
`environment_info` (`jax.print_environment_info`), `peak_tflops` and `peak_source` (bf16 data
sheet per device, `moejax.train.mfu`; on CPU a measured float32 matmul), `config`,
`overrides` (`--set`), `batch`, `seq_len`, `tokens_per_step`, the config's `params_total`,
`params_active` (per token) and training `flops_per_token` (`moejax.models.flops`: 6 N_active
+ attention), `auto_plan`, `attention_kernel` (on GPU "cudnn" where cuDNN's fused attention
compiled fwd+bwd at the config's head shape, else why not), `remat`, `warmup`, `steps`,
`baseline` ("dense"), `results`, `skipped` (case: reason), `wall_s`. `results[case]`:
`dispatcher`, `remat`, `ms` (median step), `ms_min`, `steps` (timed), `compile_s`,
`tokens_per_s` (= tokens_per_step / (ms / 1000)), `model_tflops_per_s` (per device:
flops_per_token x tokens_per_s / num_devices / 1e12, the case's own `flops_per_token`),
`mfu` (= model_tflops_per_s / peak_tflops), `loss_first` (the first step's loss: about
ln(vocab) at init, equal across dispatchers up to float error and capacity drops),
`dropped_fraction` (first step, mean over MoE layers), `params_total`, `params_active`,
`ratio_to_dense` (ms / dense ms) and `_min`, and `memory`: `argument_bytes`, `output_bytes`,
`alias_bytes` (donated), `temp_bytes`, `generated_code_bytes` of
`compiled.memory_analysis()` (null where unavailable), `estimate_bytes` (argument + output -
alias + temp), and `process_peak_bytes_after`, the device's `peak_bytes_in_use` after the
case: a high-water mark of the whole process, over this and every earlier case (null where
the device keeps no stats: CPU). Cases run in turn, so on a shared CPU load from other
processes can move one case and not another: compare cases from a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: import moejax from this checkout
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.device_info import device_stats, environment, memory_of  # noqa: E402
from experiments.benchmarks.kernel_profile import profile_step  # noqa: E402
from experiments.benchmarks.moe_layer import VARIANTS, split_variant  # noqa: E402
from experiments.benchmarks.timing import device_name, sig, summary  # noqa: E402
from moejax.config.files import load_config_file  # noqa: E402
from moejax.config.sweeps import apply_overrides, parse_value  # noqa: E402
from moejax.config.validation import validate  # noqa: E402
from moejax.data.model_batch import to_model_batch  # noqa: E402
from moejax.models.attention_kernels import _cudnn_attention, resolve_impl  # noqa: E402
from moejax.models.flops import count_params, train_flops_per_token  # noqa: E402
from moejax.moe.dispatch import AUTO_PLAN, DISPATCHERS  # noqa: E402
from moejax.moe.layer import shared_width  # noqa: E402
from moejax.sharding.mesh import make_mesh  # noqa: E402
from moejax.sharding.partitioning import shard_batch  # noqa: E402
from moejax.train.experiment import build_experiment  # noqa: E402
from moejax.train.mfu import device_peak_tflops  # noqa: E402

GPU_CONFIG, CPU_CONFIG = "configs/deepseekmoe.py:size=gpu", "configs/deepseekmoe.py"
# Dispatcher order: the one the trainer runs by default first.
ORDER = ("auto", "pallas", "capacity_einsum", "hybrid", "ragged", "expert_parallel", "fssdp")


def log(msg: str) -> None:
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:500]


def load_config(spec: str, sets: list[str], batch: int | None, seq_len: int | None):
    """(ConfigDict of `path[:arg]` with the overrides applied, the `--set` values)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file() and (REPO / path).is_file():
        path = str(REPO / path)
    c = load_config_file(path).get_config(arg or None)
    overrides = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.field=value")
        overrides[key] = parse_value(c, key, text)
    if batch:
        overrides["data.global_batch_size"] = batch
    if seq_len:
        overrides["data.seq_len"] = seq_len
    return apply_overrides(c, overrides), overrides


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Random token ids, one document per row: every target counts in the loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq_len + 1))
    ones = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(seq_len + 1), tokens.shape)
    return to_model_batch(tokens, ones, positions, np.zeros_like(tokens))


def skip_reason(name: str, explicit: bool, platform_: str, devices: int) -> str | None:
    if name == "dense_reference":
        return "E/k times the routed FLOPs of the dropless plans (every expert on every token)"
    if name in ("expert_parallel", "fssdp") and devices == 1:
        return "one device: no expert axis to split"
    if name == "pallas" and platform_ == "cpu":
        return "Pallas interpret mode on CPU (a correctness tool, not compiled kernels)"
    if name == "hybrid" and platform_ != "cpu" and not explicit:
        return "the XLA:CPU plan; name it in --dispatchers to time it here"
    return None


def plan_cases(c, args, platform_: str, devices: int) -> tuple[dict, dict]:
    """({case: config overrides}, {case: skip reason}) in run order."""
    explicit = args.dispatchers is not None
    names = args.dispatchers.split(",") if explicit else list(ORDER) + ["dense_reference"]
    names = [n for n in names if n]
    if not explicit:  # the plan `auto` runs here: the same program again, so last
        twin = AUTO_PLAN.get(platform_, AUTO_PLAN["cpu"])[0]
        names.sort(key=lambda n: n == twin)
    base_remat = c.model.remat
    remats = args.remat.split(",") if args.remat is not None else ["full", "none"]
    width = c.moe.top_k * c.moe.d_expert + shared_width(c.moe)
    cases = {"dense": {"model.moe_every": 0, "model.layer_kinds": "", "model.d_ff": width}}
    if not c.model.moe_every and not c.model.layer_kinds.strip():  # a dense config: as it is
        cases, names = {"dense": {}}, []
    skipped = {}
    for name in names:
        try:
            dispatcher, fields = split_variant(name)  # "auto+fused": moe.fuse_gate_up
        except KeyError as e:
            skipped[name] = f"unknown variant +{e.args[0]} (variants: {', '.join(VARIANTS)})"
            continue
        reason = skip_reason(dispatcher, explicit, platform_, devices)
        if reason:
            skipped[name] = reason
            continue
        cases[name] = {"moe.dispatcher": dispatcher, **{f"moe.{k}": v for k, v in fields.items()}}
        if name in ("expert_parallel", "fssdp") and c.mesh.expert == 1:
            cases[name].update({"mesh.expert": math.gcd(devices, c.moe.num_experts)})
        if name == "auto":
            for r in dict.fromkeys(r for r in remats if r and r != base_remat):
                cases[f"auto/remat={r}"] = {"moe.dispatcher": "auto", "model.remat": r}
    for name in [n for n in args.skip.split(",") if n]:
        if cases.pop(name, None) is not None:
            skipped[name] = "--skip"
    return cases, skipped


def attention_kernel(s) -> str:
    """What `model.attention_impl` runs here. On GPU cuDNN's fused attention, probed fwd+bwd
    at the config's head shape (256 tokens): where it is refused the model takes the "xla"
    path, whose [B, H, L, L] scores at 8 x 4096 tokens do not fit without remat."""
    kernel = resolve_impl(s.model.attention_impl)
    if kernel != "cudnn" or s.model.attention != "gqa":
        return kernel
    q = jnp.zeros((1, 256, s.model.num_heads, s.model.resolved_head_dim), s.model.dtype)
    kv, seg = q[:, :, : s.model.num_kv_heads], jnp.ones((1, 256), jnp.int32)
    if jax.eval_shape(lambda: _cudnn_attention(q, kv, kv, seg)) is None:
        return "xla (cuDNN refused the shape)"
    loss = lambda q: _cudnn_attention(q, kv, kv, seg).astype(jnp.float32).sum()  # noqa: E731
    try:
        jax.block_until_ready(jax.jit(jax.grad(loss))(q))
    except Exception as e:  # noqa: BLE001 -- reported, the cases then show what it costs
        return f"cudnn failed here: {error_line(e)}"
    return kernel


def run_case(c, overrides: dict, args, peak: float, profile: bool = False) -> dict:
    """Builds, compiles and times one case (and traces it, `profile`); returns its entry."""
    c = apply_overrides(c.copy_and_resolve_references(), overrides)
    s = validate(c)
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    state = exp.init_fn(jax.random.PRNGKey(s.train.seed))
    tokens = s.data.global_batch_size * s.data.seq_len
    batch = synthetic_batch(s.data.global_batch_size, s.data.seq_len, s.model.vocab_size)
    batch = shard_batch(batch, mesh, s.mesh.rules)
    t0 = time.perf_counter()
    compiled = exp.step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times, first, warmup, steps = [], None, args.warmup, args.steps
    with jax.set_mesh(mesh):  # as the trainer's InMesh calls its step
        while len(times) < warmup + steps:
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)  # the state is donated
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            if first is None:
                first = jax.device_get(metrics)
                # Too slow for --case-budget-s: one warm-up step at most, fewer timed ones.
                if times[0] * (warmup + steps - 1) > args.case_budget_s:
                    warmup = min(warmup, 1)
                    steps = max(1, min(steps, int(args.case_budget_s / times[0])))
    trace = None
    if profile:  # after the timing; each traced step is fed the state the last one returned

        def one_step():
            nonlocal state
            state, out = compiled(state, batch)
            return out

        with jax.set_mesh(mesh):
            trace = profile_step(one_step, calls=2, top=20)
    timed = summary([t * 1e3 for t in times[warmup:]])
    counts = count_params(s.model, s.moe)
    flops = train_flops_per_token(s.model, s.moe, s.data.seq_len)
    tps = tokens / (timed["ms"] / 1e3)
    tflops = flops * tps / jax.device_count() / 1e12
    drops = first.get("moe/dropped_fraction")
    return {
        "dispatcher": s.moe.dispatcher if s.model.num_moe_layers else None,
        "remat": s.model.remat,
        **timed,
        "steps": len(times) - warmup,
        "compile_s": round(compile_s, 2),
        "tokens_per_s": round(tps, 2),
        "model_tflops_per_s": sig(tflops, 6),
        "mfu": sig(tflops / peak, 6) if peak > 0 else None,
        "loss_first": float(first["loss"]),
        "dropped_fraction": None if drops is None else round(float(np.mean(drops)), 6),
        "params_total": counts.total,
        "params_active": counts.active,
        "flops_per_token": flops,
        "memory": {
            **memory_of(compiled),
            "process_peak_bytes_after": device_stats().get("peak_bytes_in_use"),
        },
        **({"profile": trace} if trace is not None else {}),
    }


def run(args) -> dict:
    t_start = time.perf_counter()
    platform_, devices = jax.default_backend(), jax.device_count()
    spec = args.config or (CPU_CONFIG if platform_ == "cpu" else GPU_CONFIG)
    c, overrides = load_config(spec, args.set, args.batch, args.seq_len)
    s = validate(c.copy_and_resolve_references())  # a bad config fails here, once
    counts = count_params(s.model, s.moe)
    peak, peak_source = device_peak_tflops(s.train.peak_tflops)
    cases, skipped = plan_cases(c, args, platform_, devices)
    budget = args.time_budget_s if args.time_budget_s is not None else (platform_ != "cpu") * 180
    log(
        f"{device_name()}; {spec} {overrides or ''}: {counts.total / 1e9:.3f}B params, "
        f"{counts.active / 1e9:.3f}B active; cases {list(cases)}; skipped {list(skipped)}"
    )
    report = {
        "benchmark": "train_step",
        "device": device_name(),
        "device_kind": jax.devices()[0].device_kind,
        "platform": platform_,
        "num_devices": devices,
        "jax": jax.__version__,
        **environment(),
        "device_bytes_limit": device_stats().get("bytes_limit"),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "config": spec,
        "overrides": overrides,
        "batch": s.data.global_batch_size,
        "seq_len": s.data.seq_len,
        "tokens_per_step": s.data.global_batch_size * s.data.seq_len,
        "params_total": counts.total,
        "params_active": counts.active,
        "flops_per_token": train_flops_per_token(s.model, s.moe, s.data.seq_len),
        "auto_plan": list(AUTO_PLAN.get(platform_, AUTO_PLAN["cpu"])),
        "attention_kernel": attention_kernel(s),
        "remat": s.model.remat,
        "warmup": args.warmup,
        "steps": args.steps,
        "baseline": "dense",
        "results": {},
        "skipped": skipped,
    }
    results = report["results"]
    for name, case_overrides in cases.items():
        if budget and time.perf_counter() - t_start > budget:
            skipped[name] = f"--time-budget-s {budget:g} spent before it started"
            continue
        log(f"{name}: building and compiling ({case_overrides})")
        try:
            profile = name in args.profile.split(",")
            results[name] = run_case(c, case_overrides, args, peak, profile)
        except Exception as e:  # noqa: BLE001 -- one failing case (OOM) must not sink the run
            results[name] = {"error": error_line(e)}
        gc.collect()
        jax.clear_caches()  # the case's executables; its buffers went with its state
        log(f"{name}: {json.dumps(results[name])}")
    dense = results.get("dense", {})
    for name, r in results.items():
        if name != "dense" and "ms" in r and "ms" in dense:
            r["ratio_to_dense"] = sig(r["ms"] / dense["ms"])
            r["ratio_to_dense_min"] = sig(r["ms_min"] / dense["ms_min"])
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default=None, help=f"path[:arg]; default {GPU_CONFIG} (GPU/TPU), {CPU_CONFIG}"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. moe.top_k=4"
    )
    p.add_argument("--batch", type=int, default=None, help="data.global_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="data.seq_len")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dispatchers", default=None, help="comma list out of " + ",".join(DISPATCHERS))
    p.add_argument(
        "--remat", default=None, help="comma list of model.remat for auto (default full,none)"
    )
    p.add_argument("--skip", default="", help="comma list of case names (dense, auto/remat=full)")
    p.add_argument(
        "--profile",
        default="",
        help="comma list of cases whose device ops are traced for 2 steps after the timing "
        "(kernel_profile.py: `profile` in their entry; GPU/TPU only)",
    )
    p.add_argument("--case-budget-s", type=float, default=60.0)
    p.add_argument(
        "--time-budget-s", type=float, default=None, help="0: none (default 180 on GPU/TPU)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def format_table(report: dict) -> str:
    lines = [
        f"{report['device']}, jax {report['jax']}, {report['config']}: "
        f"{report['params_total'] / 1e9:.3f}B params, {report['tokens_per_step']} tokens/step, "
        f"peak {report['peak_tflops']:.4g} TFLOP/s ({report['peak_source']})",
        f"{'case':<20}{'ms':>10}{'ms_min':>10}{'x dense':>9}{'tok/s':>11}{'TFLOP/s':>9}"
        f"{'MFU':>7}{'loss':>8}{'compile s':>10}",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"{name:<20}{r['error']}")
            continue
        lines.append(
            f"{name:<20}{r['ms']:>10.1f}{r['ms_min']:>10.1f}{r.get('ratio_to_dense', 1.0):>9.2f}"
            f"{r['tokens_per_s']:>11.0f}{r['model_tflops_per_s']:>9.3g}"
            f"{r['mfu'] if r['mfu'] is not None else math.nan:>7.3f}{r['loss_first']:>8.3f}"
            f"{r['compile_s']:>10.1f}"
        )
    lines += [f"skipped {k}: {v}" for k, v in report["skipped"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report) if args.json else format_table(report), flush=True)
    return report


if __name__ == "__main__":
    main()
