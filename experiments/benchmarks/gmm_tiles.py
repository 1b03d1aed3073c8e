"""Tile sweep for the Mosaic GPU grouped matmuls: where the `mosaic_gpu` rows of the tile table
in `pallas_kernels/tiling.py` come from.

Times `gmm_mosaic_gpu` / `tgmm_mosaic_gpu` at the DeepSeek-like and Mixtral-like shapes of
`gmm.py` (balanced groups, bf16) for every candidate tiling and pipeline depth, against the
dense matmul of the same FLOPs measured in the same process, and checks each result against
`jax.lax.ragged_dot` (max relative error). GPU only (Hopper):

    python experiments/benchmarks/gmm_tiles.py --json

Prints one JSON object: `device`, `results[shape][op]` = list of {`tiling`, `stages`, `ms`,
`ratio_to_dense`, `max_rel_err`} sorted by time, and `best[shape][op]`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.gmm import FULL, group_sizes, rel_err  # noqa: E402
from experiments.benchmarks.timing import back_to_back, device_name, measure  # noqa: E402
from pallas_kernels import gmm_mosaic_gpu as mgpu  # noqa: E402
from pallas_kernels.tiling import Tiling  # noqa: E402

GMM_TILES = [(128, 64, 128), (64, 64, 128), (192, 64, 128), (128, 64, 64), (128, 128, 128)]
TGMM_TILES = [(64, 128, 128), (128, 128, 128), (64, 64, 128), (64, 128, 64)]
STAGES = (3, 4, 5)


def ms_per_call(fn, args, repeats: int, inner: int) -> float:
    """Median over `repeats` samples of `inner` back-to-back calls, per call."""
    return statistics.median(measure({"fn": back_to_back(fn, args, inner)}, repeats)["fn"]) / inner


def sweep(name: str, spec: dict, repeats: int, inner: int) -> dict:
    m, k, n, g = spec["tokens"] * spec["top_k"], spec["k"], spec["n"], spec["g"]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (g, k, n)) / k**0.5).astype(jnp.bfloat16)
    grad = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    sizes = jnp.asarray(group_sizes(m, g, "balanced"), jnp.int32)
    out = {}
    for op in ("gmm", "tgmm"):
        if op == "gmm":
            dense = jax.jit(lambda a, b: jnp.dot(a, b[0]))
            dense_ms = ms_per_call(dense, (lhs, rhs), repeats, inner)
            want = jax.lax.ragged_dot(lhs, rhs, sizes)
        else:
            dense = jax.jit(lambda a, dy: jnp.dot(a.T, dy))
            dense_ms = ms_per_call(dense, (lhs, grad), repeats, inner)
            want = jax.vjp(lambda w: jax.lax.ragged_dot(lhs, w, sizes), rhs)[1](grad)[0]
        rows = []
        for tiles in GMM_TILES if op == "gmm" else TGMM_TILES:
            tiling = Tiling(*tiles)
            if not mgpu.mosaic_gpu_supports(op, jnp.bfloat16, k, n, tiling):
                continue
            for stages in STAGES:
                if op == "gmm":
                    fn = functools.partial(
                        mgpu.gmm_mosaic_gpu,
                        tiling=tiling,
                        stages=stages,
                        out_dtype=jnp.bfloat16,
                        interpret=False,
                    )
                    args = (lhs, rhs, sizes)
                else:
                    fn = functools.partial(
                        mgpu.tgmm_mosaic_gpu,
                        tiling=tiling,
                        stages=stages,
                        out_dtype=jnp.bfloat16,
                        num_groups=g,
                        interpret=False,
                    )
                    args = (lhs, grad, sizes)
                try:
                    got = jax.block_until_ready(fn(*args))
                except Exception as e:  # noqa: BLE001 -- e.g. over the shared memory
                    rows.append(
                        {
                            "tiling": tiles,
                            "stages": stages,
                            "error": f"{type(e).__name__}: {str(e)[:160]}",
                        }
                    )
                    continue
                ms = ms_per_call(fn, args, repeats, inner)
                rows.append(
                    {
                        "tiling": tiles,
                        "stages": stages,
                        "ms": round(ms, 4),
                        "ratio_to_dense": round(ms / dense_ms, 3),
                        "max_rel_err": float(f"{rel_err(got, want):.3g}"),
                    }
                )
                print(
                    f"[tiles] {name} {op} {tiles} stages {stages}: {ms:.3f} ms "
                    f"({ms / dense_ms:.2f}x dense {dense_ms:.3f} ms)",
                    file=sys.stderr,
                    flush=True,
                )
        rows.sort(key=lambda r: r.get("ms", float("inf")))
        out[op] = {"dense_ms": round(dense_ms, 4), "m": m, "k": k, "n": n, "g": g, "runs": rows}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--shapes", default="deepseek,mixtral")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        p.error("the Mosaic GPU kernels need a GPU (Hopper); on CPU use the tests' interpret mode")
    report = {"device": device_name(), "jax": jax.__version__, "results": {}, "best": {}}
    for name in args.shapes.split(","):
        res = sweep(name, FULL[name], args.repeats, args.inner)
        report["results"][name] = res
        report["best"][name] = {op: r["runs"][0] for op, r in res.items() if r["runs"]}
    print(json.dumps(report) if args.json else json.dumps(report["best"], indent=1))
    return report


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
