"""A step-time simulator for FSDP, EP and FSSDP at pod scale (Hecate, arXiv 2502.02581).

`python -m experiments.fssdp_sim [--chips 8,32,128,512,1024] [--skews 0,0.8,1.2]
[--loads zipf|drift|metrics.jsonl] [--link ici|nvlink|ib] [--out FILE]` prints one JSON
object: per (skew, P) and per strategy, the mean over steps of each device's tokens, the
bytes of every collective and an alpha-beta time for ONE MoE layer's forward + backward.

Loads (assignments per expert per step, `[steps, E]`): synthetic Zipf (expert of rank r
gets weight r^-skew, ranks a random permutation), `drift` (the same, the ranking moved by
a few random swaps each step), or recorded (`train/moe/load/layer{i}` of a run's
`metrics.jsonl`, the router's per-expert fractions; P must divide that run's E).

Strategies, per device per step (W = bytes of one expert's weights, A = bytes of one
token row, k assignments per token, T tokens per device):
  fsdp       every device computes its own T k assignments; the E experts are all-gathered
             forward and their gradients reduce-scattered backward: 2 (P-1)/P E W.
  ep         expert e on device e // (E/P); a device computes its experts' assignments; four
             ragged token exchanges (dispatch, combine, and their transposes): a device
             sends its T k rows and receives its load, each (P-1)/P off-device.
  fssdp      EP plus S replica slots per device filled each step by
             `moejax.moe.placement.greedy_placement` (the function the `fssdp` dispatcher
             runs, owner send cap R); a device computes its share of its experts' and
             replicas' assignments; the sparse all-gather (receive the filled slots, send
             the owner's replicas) and its transpose, the sparse reduce-scatter.
  fssdp_het  fssdp on a heterogeneous layout (Hecate's heterogeneous sharding): every
             `--reshard_every` steps the experts are re-assigned to devices from the last
             window's loads (largest first to the least-loaded device that owns fewer than
             `--mem_experts`; a device may own 0 of them), and the moved experts'
             parameters and Adam state (`--state_factor` x W each) are sent once, the cost
             spread over the window.

Time model (alpha-beta, no overlap): a collective costs `latency` per peer message plus
max(bytes sent, bytes received) / `bandwidth` on the slowest device; compute costs
18 d f FLOPs per assignment (a SwiGLU expert forward + backward) at `--peak_flops` on the
device with the most assignments (the straggler sets the step). The FSSDP closed forms are
the compiled bound of `experiments/fssdp_bytes.py`; `tests/experiments/test_fssdp_sim.py`
checks them against the saved compiled bytes and hand-computed small cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe.placement import greedy_placement
from moejax.train.expert_relayout import balanced_groups


@dataclasses.dataclass(frozen=True)
class Link:
    """Per-device link: `bandwidth` (B/s each direction) and `latency` (s per message)."""

    bandwidth: float
    latency: float


LINKS = {  # defaults; override with --bandwidth / --latency
    "ici": Link(90e9, 1e-6),  # v5p ICI, one chip's share of an all-to-all
    "nvlink": Link(450e9, 2e-6),  # H100 NVLink 4, one direction
    "ib": Link(50e9, 5e-6),  # 400 Gb/s InfiniBand NDR per GPU
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One MoE layer: d_model, d_expert, k, tokens per device, bytes per element."""

    d: int = 4096
    f: int = 1408
    k: int = 8
    tokens: int = 4096
    weight_bytes: int = 2
    act_bytes: int = 2

    @property
    def expert_set(self) -> float:  # W
        return 3 * self.d * self.f * self.weight_bytes

    @property
    def row(self) -> float:  # A
        return self.d * self.act_bytes


def zipf_loads(steps, e, total, skew, drift, seed):
    """[steps, E] assignments: Zipf(skew) over a random ranking, `drift` swaps per step."""
    rng = np.random.default_rng(seed)
    rank = rng.permutation(e)
    weights = (np.arange(e) + 1.0) ** -skew
    out = np.zeros((steps, e))
    for t in range(steps):
        for _ in range(drift):
            i, j = rng.integers(0, e, 2)
            rank[[i, j]] = rank[[j, i]]
        p = np.zeros(e)
        p[rank] = weights / weights.sum()
        out[t] = rng.multinomial(total, p)
    return out


def metrics_loads(path, layer, total):
    """[steps, E] from `train/moe/load/layer{layer}` fractions of a metrics.jsonl."""
    rows = []
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            key = f"train/moe/load/layer{layer}"
            if key in m:
                frac = np.asarray(m[key], np.float64)
                rows.append(np.round(frac / frac.sum() * total))
    if not rows:
        raise SystemExit(f"{path} has no train/moe/load/layer{layer} rows")
    return np.stack(rows)


def contiguous_owner(e, p):
    return np.arange(e) // (e // p)


def balanced_owner(window_load, p, mem_experts):
    """Heterogeneous layout: the trainer's rule (`moejax.train.expert_relayout`), experts
    by load, largest first, each to the least-loaded device owning fewer than `mem_experts`
    (a device may end with none); owner[E]."""
    owner = np.zeros(window_load.shape[0], np.int64)
    for d, group in enumerate(balanced_groups(window_load, p, mem_experts)):
        owner[group] = d
    return owner


_placement = jax.jit(greedy_placement, static_argnums=(1, 2, 3))


def fssdp_step(load, owner, p, slots, max_sends):
    """(device_tokens[P], slots_filled[P], sends[P]) of one step's greedy placement."""
    slot_expert = np.asarray(
        _placement(jnp.asarray(load, jnp.float32), p, slots, max_sends, jnp.asarray(owner))
    )
    e = load.shape[0]
    hold = np.zeros((p, e), bool)
    hold[owner, np.arange(e)] = True
    filled = slot_expert >= 0
    rows, cols = np.nonzero(filled)
    hold[rows, slot_expert[rows, cols]] = True
    tokens = (hold * (load / hold.sum(0))).sum(1)
    sends = np.bincount(owner[slot_expert[filled]], minlength=p)
    return tokens, filled.sum(1), sends


def collective_time(sent, received, peers, link):
    """Alpha-beta time of one collective: the slowest device's messages and bytes."""
    return peers * link.latency + np.max(np.maximum(sent, received)) / link.bandwidth


def token_exchange(device_tokens, shape, p, link):
    """Bytes and time of the four ragged token exchanges (fwd dispatch/combine, bwd)."""
    off = (p - 1) / p
    sent = np.full(p, shape.tokens * shape.k * shape.row * off)
    received = device_tokens * shape.row * off
    one = collective_time(sent, received, p - 1, link)
    return {"bytes": 4 * float(np.max(np.maximum(sent, received))), "time": 4 * one}


def compute_time(device_tokens, shape, peak):
    return float(np.max(device_tokens)) * 18 * shape.d * shape.f / peak


def simulate(loads, p, shape, link, slots, max_sends, reshard_every, mem_experts, peak, state):
    """Mean per-step metrics of each strategy for loads [steps, E] at P devices."""
    steps, e = loads.shape
    w = shape.expert_set
    out = {name: [] for name in ("fsdp", "ep", "fssdp", "fssdp_het")}
    het_owner = contiguous_owner(e, p)
    for t in range(steps):
        load = loads[t]
        # FSDP: own tokens, all E experts gathered and their gradients reduce-scattered.
        own = np.full(p, shape.tokens * shape.k, np.float64)
        ag = e * w * (p - 1) / p
        out["fsdp"].append(
            {
                "tokens": own,
                "weight_bytes": 2 * ag,
                "token_bytes": 0.0,
                "time_weights": 2 * collective_time(ag, ag, p - 1, link),
                "time_tokens": 0.0,
                "time_compute": compute_time(own, shape, peak),
            }
        )
        # EP: the owners compute everything.
        owner = contiguous_owner(e, p)
        ep_tokens = np.bincount(owner, weights=load, minlength=p)
        ex = token_exchange(ep_tokens, shape, p, link)
        out["ep"].append(
            {
                "tokens": ep_tokens,
                "weight_bytes": 0.0,
                "token_bytes": ex["bytes"],
                "time_weights": 0.0,
                "time_tokens": ex["time"],
                "time_compute": compute_time(ep_tokens, shape, peak),
            }
        )
        # FSSDP, on the fixed and on the heterogeneous layout.
        if reshard_every and t and t % reshard_every == 0:
            new = balanced_owner(loads[t - reshard_every : t].sum(0), p, mem_experts)
            moved = int(np.sum(new != het_owner))
            het_owner = new
        else:
            moved = 0
        for name, own_of in (("fssdp", owner), ("fssdp_het", het_owner)):
            tokens, filled, sends = fssdp_step(load, own_of, p, slots, max_sends)
            ex = token_exchange(tokens, shape, p, link)
            recv, sent = filled * w, sends * w
            peers = int(max(np.max(filled), np.max(sends)))
            row = {
                "tokens": tokens,
                # received forward (slots) + backward (replicas' gradients), the quantity
                # the compiled bound (S + R) W counts
                "weight_bytes": float(np.max(recv + sent)),
                "token_bytes": ex["bytes"],
                "time_weights": 2 * collective_time(sent, recv, peers, link),
                "time_tokens": ex["time"],
                "time_compute": compute_time(tokens, shape, peak),
            }
            if name == "fssdp_het":
                # One resharding transfer of the moved experts' parameters and optimizer
                # state, spread over the window it serves.
                relayout = moved * w * state / p  # per device, evenly spread
                row["relayout_bytes"] = relayout / max(reshard_every, 1)
                row["time_weights"] += row["relayout_bytes"] / link.bandwidth
            out[name].append(row)
    return {name: summarize(rows) for name, rows in out.items()}


def summarize(rows):
    tok = np.stack([r["tokens"] for r in rows])
    summary = {
        "device_tokens_max_over_mean": float(np.mean(tok.max(1) / tok.mean(1))),
        "weight_bytes": float(np.mean([r["weight_bytes"] for r in rows])),
        "token_bytes": float(np.mean([r["token_bytes"] for r in rows])),
    }
    for key in ("time_weights", "time_tokens", "time_compute"):
        summary[key] = float(np.mean([r[key] for r in rows]))
    if "relayout_bytes" in rows[0]:
        summary["relayout_bytes"] = float(np.mean([r["relayout_bytes"] for r in rows]))
    summary["time"] = summary["time_weights"] + summary["time_tokens"] + summary["time_compute"]
    return summary


def fssdp_weight_bound(slots: int, max_sends: int, expert_set: float) -> float:
    """Bytes per device per step of the compiled sparse all-gather + reduce-scatter: the
    static bound (S received + R-row send buffer), what `experiments/fssdp_bytes.py` reads
    from the TPU HLO."""
    return (slots + max_sends) * expert_set


def markdown(result: dict) -> str:
    """The README table of a saved result: per (skew, P) the straggler ratio and step time
    of each strategy, and the EP / FSSDP ratios."""
    names = ("fsdp", "ep", "fssdp", "fssdp_het")
    head = ["skew", "P", "E"] + [f"{n} max/mean" for n in names] + [f"{n} ms" for n in names]
    head += ["EP / FSSDP", "EP / FSSDP-het", "FSSDP weights ms", "EP tokens ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in result["rows"]:
        st = row["strategies"]
        cells = [str(row["skew"]), str(row["P"]), str(row["E"])]
        cells += [f"{st[n]['device_tokens_max_over_mean']:.2f}" for n in names]
        cells += [f"{1e3 * st[n]['time']:.1f}" for n in names]
        cells += [f"{row['ep_over_fssdp']:.2f}", f"{row['ep_over_fssdp_het']:.2f}"]
        cells += [
            f"{1e3 * st['fssdp']['time_weights']:.2f}",
            f"{1e3 * st['ep']['time_tokens']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", default="", help="print the markdown table of a saved result")
    ap.add_argument("--chips", default="8,32,128,512,1024")
    ap.add_argument("--experts_per_chip", type=int, default=2)
    ap.add_argument("--skews", default="0,0.8,1.2")
    ap.add_argument("--loads", default="zipf", help="zipf | drift | path to metrics.jsonl")
    ap.add_argument("--layer", type=int, default=0, help="metrics.jsonl: which MoE layer")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--max_sends", type=int, default=4)
    ap.add_argument("--reshard_every", type=int, default=5)
    ap.add_argument("--mem_slack", type=float, default=2.0, help="owned experts <= slack E/P")
    ap.add_argument("--state_factor", type=float, default=7.0, help="bf16 W + f32 m, v, master")
    ap.add_argument("--link", default="ici", choices=sorted(LINKS))
    ap.add_argument("--bandwidth", type=float, default=0.0)
    ap.add_argument("--latency", type=float, default=-1.0)
    ap.add_argument("--peak_flops", type=float, default=459e12)  # v5p bf16
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=1408)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return
    link = LINKS[args.link]
    link = Link(
        args.bandwidth or link.bandwidth, link.latency if args.latency < 0 else args.latency
    )
    shape = Shape(d=args.d, f=args.f, k=args.k, tokens=args.tokens)
    rows = []
    recorded = args.loads not in ("zipf", "drift")
    for skew in [None] if recorded else [float(s) for s in args.skews.split(",")]:
        for p in [int(c) for c in args.chips.split(",")]:
            e = p * args.experts_per_chip
            total = shape.tokens * shape.k * p
            if recorded:
                loads = metrics_loads(args.loads, args.layer, total)[: args.steps]
                e = loads.shape[1]
                if e % p:
                    raise SystemExit(f"--chips {p} does not divide the run's {e} experts")
            else:
                drift = max(1, e // 64) if args.loads == "drift" else 0
                loads = zipf_loads(args.steps, e, total, skew, drift, args.seed)
            mem = max(1, int(np.ceil(args.mem_slack * e / p)))
            r = max(1, min(args.max_sends, (p - 1) * args.slots))
            res = simulate(
                loads, p, shape, link, args.slots, r, args.reshard_every, mem,
                args.peak_flops, args.state_factor,
            )  # fmt: skip
            rows.append(
                {
                    "skew": skew,
                    "P": p,
                    "E": e,
                    "R": r,
                    "strategies": res,
                    "ep_over_fssdp": res["ep"]["time"] / res["fssdp"]["time"],
                    "ep_over_fssdp_het": res["ep"]["time"] / res["fssdp_het"]["time"],
                    "fsdp_over_fssdp": res["fsdp"]["time"] / res["fssdp"]["time"],
                    "fssdp_weight_bound_bytes": fssdp_weight_bound(args.slots, r, shape.expert_set),
                }
            )
    text = json.dumps(
        {"args": vars(args), "link": dataclasses.asdict(link), "rows": rows,
         "hecate_reported_speedup_over_ep": [1.26, 1.78]},
        indent=1,
    )  # fmt: skip
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
