r"""Benchmark: TFLOP/s of the grouped matmul (`gmm`) and its weight gradient (`tgmm`).

Every implementation is timed in one process against a dense matmul of the same FLOPs
(`[M, K] @ [K, N]` for gmm, `[K, M] @ [M, N]` for tgmm: the practical limit) and against
`jax.lax.ragged_dot` (for tgmm: its VJP with respect to `rhs`, what autodiff runs):

- `dense`: the same-FLOP dense matmul; `ragged_dot`: `jax.lax.ragged_dot`;
- `tile_loop`: moejax's XLA grouped matmul (`moejax.moe.grouped_matmul`, a loop of dense tiles);
- `pallas`: `pallas_kernels.gmm` / `tgmm` (Mosaic TPU on TPU, Mosaic GPU on GPU);
- `pallas_triton` (GPU): the same with `backend="pallas_gpu"`, Pallas's Triton lowering;
- `torch_grouped_mm` (GPU, when torch imports): `torch._grouped_mm` on the same buffers
  (`torch_gmm_peer.py`);
- `megablox`: JAX's Mosaic TPU kernel `jax.experimental.pallas.ops.tpu.megablox` (TPU peer);
- `tokamax`: `tokamax.ragged_dot` (its `xla` implementation on CPU, `triton`/`mosaic` on
  GPU/TPU) when `tokamax` imports (`pip install -e '.[bench]'`).

Where there is no compiled Pallas (CPU; megablox everywhere but TPU) the Pallas kernels run
in interpret mode and are reported as `pallas_interpret` / `megablox_interpret`: interpret
mode is a correctness tool, so those times say nothing about kernel speed, and they are
timed only on shapes up to `--interpret-max-gflop` (`--scale 8` brings DeepSeek-small
there). Each case also reports its largest error relative to `ragged_dot`'s output
(`max_rel_err`).

Shapes (`--shapes full`): DeepSeek-like M = 16384 tokens x top-6, K = 2048, N = 1408, G = 64;
Mixtral-like M = 16384 x top-2, K = 4096, N = 14336, G = 8. `--shapes small` (the CPU default)
divides tokens by 16 and K, N by 4; `--scale s` divides tokens by s on top. Group sizes:
`balanced` (M / G each) and `skewed` (Dirichlet(0.3) shares, seed 0; some groups get none).

    python experiments/benchmarks/gmm.py --json                     # CPU: small shapes, ~2 min
    python experiments/benchmarks/gmm.py --json --shapes full       # GPU / TPU
    python experiments/benchmarks/gmm.py --json --scale 8 --repeats 1 --skip tokamax  # ~5 min
    python experiments/benchmarks/gmm.py --json --scale 64 --repeats 1 --groups skewed \
        --skip megablox,tokamax --interpret-max-gflop 0.2                # ~30 s (the test)

(5 minutes on this 2-core CPU with `--scale 8`, almost all of it megablox's kernel
interpreted: 47-68 s a call.)

`--json` prints one JSON object on stdout (progress on stderr): `device`, `shapes`,
`results[shape][groups][op][impl]` = {`ms`, `ms_min`, `tflops`, `ratio_to_dense`
(time / dense time), `ratio_to_ragged_dot`, `max_rel_err`}, and `skipped` (what could not
run, and why). On GPU each timed sample runs `--inner` calls back to back (default 10) and
reports the time per call, so host dispatch overhead is not counted; an implementation whose
one call would make the repeats outlast `--impl-budget-s` is timed once (`timed_once`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from experiments.benchmarks.timing import back_to_back, device_name, measure  # noqa: E402
from moejax.moe import grouped_matmul  # noqa: E402

TOKENS = 16384
FULL = {
    "deepseek": dict(tokens=TOKENS, top_k=6, k=2048, n=1408, g=64),
    "mixtral": dict(tokens=TOKENS, top_k=2, k=4096, n=14336, g=8),
}
SMALL_DIV = {"tokens": 16, "k": 4, "n": 4}
IMPLS = (
    "dense",
    "ragged_dot",
    "tile_loop",
    "pallas",
    "pallas_triton",
    "megablox",
    "tokamax",
    "torch_grouped_mm",
)
EAGER = ("torch_grouped_mm",)  # not JAX: called as is, never jitted
PALLAS_PLATFORMS = ("gpu", "tpu")  # where `pallas` runs compiled
MEGABLOX_PLATFORMS = ("tpu",)


def log(msg: str) -> None:
    print(f"[gmm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shapes(which: str, scale: float) -> dict[str, dict]:
    out = {}
    for name, s in FULL.items():
        tokens, k, n = s["tokens"], s["k"], s["n"]
        if which == "small":
            tokens, k, n = (tokens // SMALL_DIV["tokens"], k // SMALL_DIV["k"], n // SMALL_DIV["n"])
        tokens = max(int(tokens / scale), s["g"])
        out[name] = {
            "m": tokens * s["top_k"],
            "k": k,
            "n": n,
            "g": s["g"],
            "tokens": tokens,
            "top_k": s["top_k"],
        }
    return out


def group_sizes(m: int, g: int, kind: str) -> np.ndarray:
    """`balanced`: m / g each (remainder to the first groups); `skewed`: Dirichlet(0.3)."""
    if kind == "balanced":
        return np.full(g, m // g) + (np.arange(g) < m % g)
    shares = np.random.default_rng(0).dirichlet(np.full(g, 0.3))
    sizes = np.floor(shares * m).astype(np.int64)
    sizes[np.argmax(sizes)] += m - sizes.sum()
    return sizes


def tokamax_ragged_dot():
    try:
        import tokamax
        from absl import flags
    except Exception as e:  # noqa: BLE001 -- optional peer
        return None, f"{type(e).__name__}: {e}"
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; this script's are argparse's
        flags.FLAGS.mark_as_parsed()
    return tokamax.ragged_dot, None


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """megablox needs tiles dividing M, K and N: the largest power of two <= 128 that does."""
    return tuple(next(t for t in (128, 64, 32, 16, 8, 4, 2, 1) if d % t == 0) for d in (m, k, n))


def _suffix(interpret: bool) -> str:
    return "_interpret" if interpret else ""


def gmm_fns(platform: str, skip: set[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> f(lhs, rhs, sizes) for the forward; and the reasons for the ones left out."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    fns = {
        "ragged_dot": jax.lax.ragged_dot,
        "tile_loop": lambda a, b, s: grouped_matmul.gmm(a, b, s, impl="tile_loop"),
    }
    skipped = {}
    p_int, mb_int = platform not in PALLAS_PLATFORMS, platform not in MEGABLOX_PLATFORMS
    fns["pallas" + _suffix(p_int)] = lambda a, b, s: pallas_kernels.gmm(a, b, s, interpret=p_int)
    if platform == "gpu":
        fns["pallas_triton"] = lambda a, b, s: pallas_kernels.gmm(a, b, s, backend="pallas_gpu")
    fns["megablox" + _suffix(mb_int)] = lambda a, b, s: megablox_gmm(
        a,
        b,
        s,
        preferred_element_type=a.dtype,
        interpret=mb_int,
        tiling=megablox_tiling(a.shape[0], a.shape[1], b.shape[2]),
    )
    tok, reason = (None, "--skip") if "tokamax" in skip else tokamax_ragged_dot()
    if tok is None:
        skipped["tokamax"] = reason
    else:
        fns["tokamax"] = lambda a, b, s: tok(a, b, s)
    return fns, skipped


def tgmm_fns(platform: str, skip: set[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> f(lhs, grad, sizes, rhs) -> [G, K, N] (rhs only gives ragged_dot's VJP a point)."""
    from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as megablox_tgmm

    def vjp_rhs(fn):
        return lambda a, dy, s, b: jax.vjp(lambda w: fn(a, w, s), b)[1](dy)[0]

    fns = {
        "ragged_dot": vjp_rhs(jax.lax.ragged_dot),
        "tile_loop": lambda a, dy, s, b: grouped_matmul.tgmm(a, dy, s),
    }
    skipped = {}
    p_int, mb_int = platform not in PALLAS_PLATFORMS, platform not in MEGABLOX_PLATFORMS
    fns["pallas" + _suffix(p_int)] = lambda a, dy, s, b: pallas_kernels.tgmm(
        a, dy, s, interpret=p_int
    )
    if platform == "gpu":
        fns["pallas_triton"] = lambda a, dy, s, b: pallas_kernels.tgmm(
            a, dy, s, backend="pallas_gpu"
        )
    fns["megablox" + _suffix(mb_int)] = lambda a, dy, s, b: megablox_tgmm(
        a.T,
        dy,
        s,
        preferred_element_type=a.dtype,
        interpret=mb_int,
        tiling=megablox_tiling(a.shape[1], a.shape[0], dy.shape[1]),
    )
    tok, reason = (None, "--skip") if "tokamax" in skip else tokamax_ragged_dot()
    if tok is None:
        skipped["tokamax"] = reason
    else:
        fns["tokamax"] = vjp_rhs(lambda a, b, s: tok(a, b, s))
    return fns, skipped


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _add_torch_peer(op: str, platform: str, skip: set[str], fns: dict, skipped: dict) -> None:
    if platform != "gpu":
        return
    if "torch_grouped_mm" in skip:
        skipped["torch_grouped_mm"] = "--skip"
        return
    from experiments.benchmarks.torch_gmm_peer import torch_fns

    peer, reason = torch_fns()
    if peer is None:
        skipped["torch_grouped_mm"] = reason
    elif op == "gmm":
        fns["torch_grouped_mm"] = peer["gmm"]
    else:
        fns["torch_grouped_mm"] = lambda a, dy, s, b: peer["tgmm"](a, dy, s)


# One jitted function per (op, implementation) for the whole run: the balanced and skewed cases
# of a shape then share one compilation (group sizes are run-time values).
_JITTED: dict[tuple[str, str], Callable] = {}


def bench_shape(
    s: dict,
    kind: str,
    dtype,
    repeats: int,
    platform: str,
    skipped: dict,
    skip_impls: set[str],
    interpret_max_gflop: float,
    inner: int = 1,
    impl_budget_s: float = float("inf"),
) -> dict:
    """Times gmm and tgmm for one shape and group-size distribution; returns per-op entries."""
    m, k, n, g = s["m"], s["k"], s["n"], s["g"]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    lhs = jax.random.normal(keys[0], (m, k), dtype)
    rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / k**0.5).astype(dtype)
    grad = jax.random.normal(keys[2], (m, n), dtype)
    sizes = jnp.asarray(group_sizes(m, g, kind), jnp.int32)
    flops = 2 * m * k * n
    out = {}
    for op in ("gmm", "tgmm"):
        if op == "gmm":
            fns, skip = gmm_fns(platform, skip_impls)
            _add_torch_peer(op, platform, skip_impls, fns, skip)
            args = (lhs, rhs, sizes)
            dense = jax.jit(lambda a, b: jnp.dot(a, b[0]))
            dense_args = (lhs, rhs)
        else:
            fns, skip = tgmm_fns(platform, skip_impls)
            _add_torch_peer(op, platform, skip_impls, fns, skip)
            args = (lhs, grad, sizes, rhs)
            dense = jax.jit(lambda a, dy: jnp.dot(a.T, dy))
            dense_args = (lhs, grad)
        skipped.update({f"{op}/{name}": why for name, why in skip.items()})
        steps, outputs, once = {"dense": back_to_back(dense, dense_args, inner)}, {}, {}
        steps["dense"]()
        for name, fn in fns.items():
            if name.removesuffix("_interpret") in skip_impls:
                skipped[f"{op}/{name}"] = "--skip"
                continue
            if name.endswith("_interpret") and flops / 1e9 > interpret_max_gflop:
                skipped[f"{op}/{name}@{s['m']}x{k}x{n}"] = (
                    f"interpret mode: {flops / 1e9:.2g} GFLOP > --interpret-max-gflop "
                    f"{interpret_max_gflop:g}"
                )
                continue
            compiled = fn if name in EAGER else _JITTED.setdefault((op, name), jax.jit(fn))
            t0 = time.perf_counter()
            try:
                outputs[name] = jax.block_until_ready(compiled(*args))
                t1 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                call_s = time.perf_counter() - t1
            except Exception as e:  # noqa: BLE001 -- a peer that cannot run is reported
                skipped[f"{op}/{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            log(f"{op} {kind} {name}: first call {t1 - t0:.1f}s, then {call_s * 1e3:.1f} ms")
            if call_s * repeats * inner > impl_budget_s:  # too slow to repeat: this call alone
                once[name] = [call_s * 1e3]
                continue
            steps[name] = back_to_back(compiled, args, inner)
        times = measure(steps, repeats)
        times = {name: [t / inner for t in ts] for name, ts in times.items()} | once
        med = {name: statistics.median(t) for name, t in times.items()}
        ref = "ragged_dot" if "ragged_dot" in outputs else "tile_loop"  # for max_rel_err
        entries = {}
        for name, t in times.items():
            entry = {
                "ms": round(med[name], 3),
                "ms_min": round(min(t), 3),
                "tflops": round(flops / med[name] / 1e9, 4),
                "ratio_to_dense": round(med[name] / med["dense"], 3),
            }
            if "ragged_dot" in med:
                entry["ratio_to_ragged_dot"] = round(med[name] / med["ragged_dot"], 4)
            if name in outputs and ref in outputs:
                entry["max_rel_err"] = float(f"{rel_err(outputs[name], outputs[ref]):.3g}")
            if name in once:
                entry["timed_once"] = True
            entries[name] = entry
        out[op] = entries
        log(
            f"{op} {kind} m={m} k={k} n={n} g={g}: "
            + ", ".join(
                f"{name} {e['ms']:.1f}ms ({e['ratio_to_dense']:.2f}x dense)"
                for name, e in entries.items()
            )
        )
    return out


def run(args) -> dict:
    t_start = time.perf_counter()
    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    report = {
        "device": device_name(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "inner": args.inner,
        "shapes": shapes(args.shapes, args.scale),
        "group_sizes": {"balanced": "M / G each", "skewed": "Dirichlet(0.3) shares (seed 0)"},
        "results": {},
        "skipped": {},
    }
    if platform not in PALLAS_PLATFORMS:
        report["interpret_note"] = (
            f"no compiled Pallas on {platform}: `pallas_interpret` and "
            "`megablox_interpret` run in Pallas interpret mode, a "
            "correctness tool; their times are not kernel speed"
        )
    skip_impls = {n for n in args.skip.split(",") if n}
    for name, s in report["shapes"].items():
        report["results"][name] = {}
        for kind in args.groups.split(","):
            report["results"][name][kind] = bench_shape(
                s,
                kind,
                dtype,
                args.repeats,
                platform,
                report["skipped"],
                skip_impls,
                args.interpret_max_gflop,
                args.inner,
                args.impl_budget_s,
            )
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


def format_table(report: dict) -> str:
    lines = [f"{report['device']}, jax {report['jax']}, {report['dtype']}"]
    sections = [(name, report["shapes"][name], r) for name, r in report["results"].items()]
    for name, s, res in sections:
        for kind, ops in res.items():
            for op, entries in ops.items():
                lines.append(f"{name} {kind} {op} (m={s['m']} k={s['k']} n={s['n']} g={s['g']})")
                for impl, e in entries.items():
                    lines.append(
                        f"  {impl:<20}{e['ms']:>10.2f} ms{e['tflops']:>9.4f} TFLOP/s"
                        f"{e['ratio_to_dense']:>8.2f}x dense"
                        f"  err {e.get('max_rel_err', float('nan')):.2g}"
                    )
    lines.append(f"skipped: {report['skipped']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_cpu = jax.default_backend() == "cpu"
    p.add_argument("--shapes", choices=("small", "full"), default="small" if on_cpu else "full")
    p.add_argument("--scale", type=float, default=1.0, help="divide tokens by this as well")
    p.add_argument("--groups", default="balanced,skewed", help="comma list: balanced,skewed")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32" if on_cpu else "bfloat16"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--inner",
        type=int,
        default=1 if on_cpu else 10,
        help="calls per timed sample (back to back, blocked on the last)",
    )
    p.add_argument(
        "--impl-budget-s",
        type=float,
        default=30.0,
        help="time an implementation once if its repeats would take longer",
    )
    p.add_argument(
        "--interpret-max-gflop",
        type=float,
        default=0.5,
        help="time interpret-mode kernels only on shapes up to this many GFLOP",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma list of implementations not to time, out of " + ",".join(IMPLS[1:]),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    bad = [g for g in args.groups.split(",") if g not in ("balanced", "skewed")]
    if bad:
        p.error(f"--groups: unknown {bad}; choose from balanced,skewed")
    bad = [n for n in args.skip.split(",") if n and n not in IMPLS[1:]]
    if bad:
        p.error(f"--skip: unknown {bad}; choose from {','.join(IMPLS[1:])}")
    if args.repeats < 1 or args.inner < 1 or args.scale <= 0:
        p.error("--repeats and --inner must be >= 1 and --scale > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    log(f"device {device_name()}; shapes {shapes(args.shapes, args.scale)}")
    report = run(args)
    print(json.dumps(report) if args.json else format_table(report))
    return report


if __name__ == "__main__":
    main()
