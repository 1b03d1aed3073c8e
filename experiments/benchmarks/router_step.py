"""Benchmark: one full train step (forward, backward, AdamW update) per router.

Compares the routers of the README router table at the same model shape: softmax top-k
(`configs/gshard.py`), RMoE's GRU router (`configs/rmoe.py`), top-p (`configs/top_p.py`),
the GRU scorer with top-p selection, and DeepSeek-V3's sigmoid_bias routing (with its bias
update). Every case is built with `build_experiment` (the trainer's own jit-compiled step)
and fed the same fixed batch of packed corpus-like tokens; all cases are compiled first,
then timed in one process with the repeats interleaved and rotated (as `moe_layer.py` does),
so load from other processes hits every case alike.

    python experiments/benchmarks/router_step.py --json
    python experiments/benchmarks/router_step.py --json --runs runs   # trained routers
    python experiments/benchmarks/router_step.py --json --repeats 3 --batch 4 --seq-len 64

By default every case starts from its random init, where a top-p router is nearly uniform
and takes more experts per token than after training. `--runs DIR` restores each case from
the latest checkpoint of `DIR/<config name>` (cases without overrides; e.g. `runs/top_p` by
`python -m moejax.train --config=configs/top_p.py --workdir=runs/top_p`) where one exists,
so the step is timed with the trained router (`restored_step` in the JSON).

`--json` prints one JSON object on stdout (progress goes to stderr): `device`, `shape`, and
`results[case]` with `ms` (median), `ms_min`, `compile_s`, `tokens_per_s`, `experts_per_token`
(mean over the MoE layers on the benchmark batch), `restored_step` (0 = random init) and
`ratio_to_softmax_topk` (median ms over the softmax top-k case's), `_min` (min over min) and
`_paired` (median of the per-repeat ratios: the estimate that best survives load from other
processes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.timing import device_name, measure, sig, summary  # noqa: E402
from moejax.config.files import load_config_file  # noqa: E402
from moejax.config.validation import validate  # noqa: E402
from moejax.sharding.mesh import make_mesh  # noqa: E402
from moejax.sharding.partitioning import shard_batch  # noqa: E402
from moejax.train.checkpoint import Checkpointer  # noqa: E402
from moejax.train.experiment import build_experiment  # noqa: E402

BASELINE = "softmax_topk"
CASES = {  # case -> (config file, overrides)
    "softmax_topk": ("gshard.py", {}),
    "gru": ("rmoe.py", {}),
    "top_p": ("top_p.py", {}),
    "gru+top_p": (
        "rmoe.py",
        {"moe.selection": "top_p", "moe.top_k": 8, "moe.top_p": 0.4, "moe.renormalize": False},
    ),
    # DeepSeek-V3 routing at the same shape: 4 groups of 2, top-2 groups, bias update.
    "sigmoid_bias": (
        "gshard.py",
        {
            "moe.selection": "sigmoid_bias",
            "moe.n_group": 4,
            "moe.topk_group": 2,
            "moe.balance_coef": 0.0,
            "moe.z_loss_coef": 0.0,
            "moe.seq_balance_coef": 1e-4,
        },
    ),
}


def log(msg: str) -> None:
    print(f"[router_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_config(case: str, batch: int, seq_len: int):
    path, overrides = CASES[case]
    c = load_config_file(REPO / "configs" / path).get_config()
    c.data.update(global_batch_size=batch, seq_len=seq_len)
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return validate(c)


def fixed_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two packed documents per row of random bytes: every field the train step reads."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, min(vocab, 259), size=(batch, seq_len + 1)).astype(np.int32)
    half = seq_len // 2
    segment_ids = np.where(np.arange(seq_len) < half, 1, 2).astype(np.int32)
    positions = np.where(
        np.arange(seq_len) < half, np.arange(seq_len), np.arange(seq_len) - half
    ).astype(np.int32)
    rows = lambda a: np.broadcast_to(a, (batch, seq_len)).copy()  # noqa: E731
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": rows(segment_ids),
        "positions": rows(positions),
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "domains": np.zeros((batch, seq_len), np.int32),
    }


def initial_state(case: str, exp, runs: str | None):
    """(state, restored step): the latest checkpoint of `runs/<config name>`, else init.
    Cases that override their config file (another model than that run's) start at init."""
    init = lambda: exp.init_fn(jax.random.PRNGKey(0))  # noqa: E731
    path, overrides = CASES[case]
    workdir = Path(runs or "") / Path(path).stem
    if runs is None or overrides or not (workdir / "checkpoints").is_dir():
        return init(), 0
    # keep: large, so opening the manager can never prune anything of the user's run.
    ckpt = Checkpointer(str(workdir), keep=1 << 30, save_every=1 << 30, async_save=False)
    state, _, step = ckpt.restore_or_init(init, exp.abstract_state)
    ckpt.close()
    return state, step


def run(cases: list[str], batch: int, seq_len: int, repeats: int, runs: str | None = None) -> dict:
    t_start = time.perf_counter()
    steps, compile_s, experts, restored = {}, {}, {}, {}
    for case in cases:
        s = make_config(case, batch, seq_len)
        mesh = make_mesh(s.mesh)
        exp = build_experiment(s, mesh)
        data = shard_batch(fixed_batch(batch, seq_len, s.model.vocab_size), mesh, s.mesh.rules)
        state, restored[case] = initial_state(case, exp, runs)
        holder = {"state": state}
        t0 = time.perf_counter()
        holder["state"], metrics = exp.step_fn(holder["state"], data)
        jax.block_until_ready(metrics)
        compile_s[case] = time.perf_counter() - t0
        experts[case] = float(np.mean(jax.device_get(metrics["moe/experts_per_token"])))

        def step(exp=exp, data=data, holder=holder):
            holder["state"], m = exp.step_fn(holder["state"], data)
            jax.block_until_ready(m)

        steps[case] = step
        log(
            f"{case}: compiled and ran one step in {compile_s[case]:.1f}s, "
            f"{experts[case]:.2f} experts/token"
            + (f" (restored step {restored[case]})" if restored[case] else " (random init)")
        )
    times = measure(steps, repeats, log)
    tokens = batch * seq_len
    base = times.get(BASELINE)
    results = {}
    for case in cases:
        s = summary(times[case])
        entry = {
            **s,
            "compile_s": round(compile_s[case], 2),
            "tokens_per_s": round(tokens / s["ms"] * 1e3, 1),
            "experts_per_token": round(experts[case], 3),
            "restored_step": restored[case],
        }
        if base:
            b = summary(base)
            entry.update(
                ratio_to_softmax_topk=sig(s["ms"] / b["ms"]),
                ratio_to_softmax_topk_min=sig(s["ms_min"] / b["ms_min"]),
                ratio_to_softmax_topk_paired=sig(
                    statistics.median(a / c for a, c in zip(times[case], base))
                ),
            )
        results[case] = entry
    return {
        "benchmark": "router_step",
        "device": device_name(),
        "jax": jax.__version__,
        "shape": {
            "batch": batch,
            "seq_len": seq_len,
            "repeats": repeats,
            "model": "tiny (configs/gshard.py shape: d 128, 4 layers, 8 x 320)",
        },
        "results": results,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--runs", default=None, help="restore each case from DIR/<config name> (trained routers)"
    )
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown --cases {unknown}; choose from {list(CASES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    log(f"device {device_name()}")
    report = run(args.cases, args.batch, args.seq_len, args.repeats, args.runs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for case, r in report["results"].items():
            print(
                f"{case:14s} {r['ms']:9.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
                f"x{r.get('ratio_to_softmax_topk', float('nan')):.3f} vs softmax_topk  "
                f"{r['experts_per_token']:.2f} experts/token"
            )
    return report


if __name__ == "__main__":
    main()
