r"""Benchmark: forward+backward of one `MoELayer` per dispatcher vs a dense SwiGLU MLP.

Times `jax.jit(jax.value_and_grad(loss, argnums=(params, x)))` with
`loss = sum(y**2) + sum(aux_losses)` for the MoE layer (router + dispatcher + routed experts +
shared experts) under every dispatcher in `moejax.moe.dispatch.DISPATCHERS`, and for a dense
SwiGLU `DenseMLP` of the same active FLOPs, width `(top_k + n_shared) * d_expert`. All cases are
compiled first (compile time reported apart), then timed in one process with the repeats
interleaved (repeat r runs every case once, starting from case r) so that load from other
processes hits every case alike; the median and the min are reported.

Run from the repository root:

    python experiments/benchmarks/moe_layer.py --json                       # default shape
    python experiments/benchmarks/moe_layer.py --json --batch 1 --dtype bfloat16
    python experiments/benchmarks/moe_layer.py --dispatchers ragged --gmm-impl ragged_dot \
        --skip hf,breakdown                                                 # lax.ragged_dot
    python experiments/benchmarks/moe_layer.py --json --dtype bfloat16 --skip hf \
        --dispatchers pallas,pallas+fused,ragged --profile dense_mlp,pallas  # GPU: per kernel
    python experiments/benchmarks/moe_layer.py --json --tokens 256 --d-model 32 --experts 8 \
        --d-expert 16 --top-k 2 --shared 1 --repeats 1                      # seconds (the test)

Default shape: T = 8192 tokens as [8, 1024], d_model 512, 64 experts of width 256, top-6,
2 shared (DeepSeekMoE-style fine-grained experts), float32.

`--json` prints one JSON object on stdout (progress goes to stderr). The baseline is the
fastest dense SwiGLU of the same active width, `(top_k + n_shared) * d_expert`, on `[T, d]`
rows: `dense_mlp` (moejax's `DenseMLP`), `dense_swiglu_2d` (the same three matmuls in plain
jnp) or `dense_swiglu_2d_fused` (gate and up as one matmul, as `+fused` does for the experts);
`baseline` names the one that was fastest in this run. `results[name]` holds `ms` (median),
`ms_min`, `compile_s` and `active_gflop_per_s` for each and for every dispatcher.
Dispatchers add `ratio_to_dense` (= ms / baseline ms), `ratio_to_dense_min` (min over min),
`ratio_to_dense_paired` (median over repeats of the ratio within one repeat: the estimate that
best survives load from other processes), `fwd_ms` (forward alone), `dropped_fraction`, with
the HF peer `vs_hf` (= ms / HF block ms, also `_min` and `_paired`), and for the `hybrid` plan
`overflow_fraction` (the share of assignments past the capacity buffers, run by its tile
loop). The plans that sort into a grouped matmul (`ragged`, `pallas`, and `auto` where it
resolves to either) add `experts_ms`: fwd+bwd of the routed SwiGLU alone on the
expert-sorted rows (no router, permutation, combine or shared experts) and `experts_share` of
the layer; `hybrid` (and `auto` on CPU) adds the same for its batched matmuls on capacity
buffers that every expert fills exactly (`[E, ceil(T k / E), d]`: no gathers, overflow loop
or empty slots). With them come `shared_ms` (the shared experts alone), `floor_ms` =
experts_ms + shared_ms and `floor_ratio_to_dense`: what the layer would cost with routing,
permutation and combine free and perfect balance, so how much of `ratio_to_dense` any
dispatch overhead can still remove.
`routing` holds the measured expert load (max/mean, min/mean, CV) of the random-init router.
`active_gflop_per_s` counts the active FLOPs only (what the dense MLP also does), so plans that
compute more (`dense_reference`: all E experts on every token; capacity padding) show less.

`pallas` (the `ragged` plan on `pallas_kernels`: fused permute, Pallas gmm, fused
unpermute + combine) runs compiled on GPU/TPU; on CPU its kernels run in Pallas interpret
mode, which is for correctness, so there it is timed only when tokens x top_k fits
`--pallas-interpret-max-rows` (the tiny test shape does; the default shape is skipped).

Variants: `--dispatchers pallas+fused` runs a dispatcher with `moe.fuse_gate_up=True` (the
gate and up projections as one grouped matmul on `[W_gate | W_up]`); its `experts_ms` is the
fused SwiGLU's. `--profile dense_mlp,pallas` traces those cases after the timing and adds
`profile[case]`: the device time per call summed by op name, heaviest first
(`kernel_profile.py`; GPU/TPU only, a CPU run says it has no device plane).

`dense_reference` does E/k times the routed FLOPs; it runs only if its predicted time (from the
dense MLP's measured speed) fits `--reference-budget-s`, else `skipped` says why. At the default
shape on a 2-core CPU it takes ~9 s a call (25 s the first) and 10 GB, so it is skipped.

Peer (when torch and transformers import, `pip install -e '.[hf]'`): Hugging Face's
`DeepseekV3MoE` and a torch SwiGLU of the same active width (`torch_dense_mlp`, reported beside
the baseline), timed in the same loop (`hf_peer.py`); `auto_vs_hf` = moejax auto ms / HF ms
(also `_min` and `_paired`). Torch's
OpenMP threads suffer more than XLA's pool when other processes load the cores, so read the
HF numbers from a quiet machine, or at least from `ms_min`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: import moejax from this checkout
    sys.path.insert(0, str(REPO))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.kernel_profile import profile_step  # noqa: E402
from experiments.benchmarks.timing import device_name, measure, sig, summary  # noqa: E402
from moejax.models.config import ModelConfig  # noqa: E402
from moejax.moe.config import MoEConfig  # noqa: E402
from moejax.moe.dispatch import AUTO_PLAN, DISPATCHERS, resolve_gmm_impl  # noqa: E402
from moejax.moe.experts import swiglu_expert_fn  # noqa: E402
from moejax.moe.grouped_matmul import gmm  # noqa: E402
from moejax.moe.hybrid import batched_mm, head_capacity  # noqa: E402
from moejax.moe.layer import MoELayer, shared_width  # noqa: E402
from moejax.moe.routers import ROUTERS  # noqa: E402
from moejax.nn.mlp import DenseMLP  # noqa: E402

OPTIONAL = ("dense_reference", "hf", "breakdown")  # what --skip takes besides dispatcher names
# `--dispatchers name+variant`: the dispatcher with these `moe` fields changed
VARIANTS = {"fused": {"fuse_gate_up": True}}


def split_variant(name: str) -> tuple[str, dict]:
    """`"pallas+fused"` -> ("pallas", {"fuse_gate_up": True})."""
    base, *variants = name.split("+")
    fields = {}
    for v in variants:
        fields.update(VARIANTS[v])
    return base, fields


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int = 8192
    batch: int = 8
    d_model: int = 512
    experts: int = 64
    d_expert: int = 256
    top_k: int = 6
    shared: int = 2
    dtype: str = "float32"
    gmm_tile: int = 256
    gmm_impl: str = "auto"

    def __post_init__(self):
        if self.tokens % self.batch:
            raise ValueError(f"--tokens {self.tokens} is not a multiple of --batch {self.batch}")
        if not 0 < self.top_k <= self.experts:
            raise ValueError(f"--top-k must be in [1, --experts]; got {self.top_k}")

    @property
    def seq_len(self) -> int:
        return self.tokens // self.batch

    @property
    def dense_width(self) -> int:
        return (self.top_k + self.shared) * self.d_expert

    def gflop(self, experts_per_token: int, router: bool = True) -> float:
        """GFLOP of fwd+bwd (3x the forward) when each token runs `experts_per_token` experts
        of width d_expert (shared ones included): a SwiGLU of width f costs 6*d*f per token."""
        fwd = 6 * self.d_model * self.d_expert * experts_per_token
        fwd += 2 * self.d_model * self.experts if router else 0
        return 3 * self.tokens * fwd / 1e9

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "seq_len": self.seq_len,
            "dense_width": self.dense_width,
            "gflop_fwd_bwd": {
                "moe_active": sig(self.gflop(self.top_k + self.shared)),
                "dense_mlp": sig(self.gflop(self.top_k + self.shared, router=False)),
                "dense_reference": sig(self.gflop(self.experts + self.shared)),
            },
        }


def log(msg: str) -> None:
    print(f"[moe_layer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def moe_config(shape: Shape, dispatcher: str) -> MoEConfig:
    dispatcher, fields = split_variant(dispatcher)
    return MoEConfig(
        **fields,
        num_experts=shape.experts,
        top_k=shape.top_k,
        d_expert=shape.d_expert,
        n_shared=shape.shared,
        dispatcher=dispatcher,
        gmm_tile=shape.gmm_tile,
        gmm_impl=shape.gmm_impl,
    )


def model_config(shape: Shape) -> ModelConfig:
    return ModelConfig(d_model=shape.d_model, dtype=shape.dtype, param_dtype="float32")


# ------------------------------------------------------------------------------ JAX cases
def compile_step(fn: Callable, *args) -> tuple[Callable[[], object], float]:
    """AOT-compiles `fn(*args)`; returns a step that runs it and blocks, and the compile time."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s


def dense_mlp(shape: Shape, width: int) -> DenseMLP:
    """moejax's dense SwiGLU of `width` at the benchmark's dtypes (the dense baseline at
    `shape.dense_width`, the layer's shared experts at their width)."""
    model = model_config(shape)
    return DenseMLP(width, model.init_std, model.init_std, model.dtype, model.param_dtype)


def shared_mlp(shape: Shape) -> DenseMLP:
    """The layer's shared experts alone: a dense SwiGLU of the shared width."""
    return dense_mlp(shape, shared_width(moe_config(shape, "auto")))


def moe_loss(layer: MoELayer) -> Callable:
    def loss(params, x):
        out = layer.apply({"params": params}, x)
        loss = jnp.sum(jnp.square(out.y.astype(jnp.float32))) + sum(out.aux_losses.values())
        return loss, out.metrics

    return loss


def dense_loss(mlp: DenseMLP) -> Callable:
    def loss(params, x):
        y = mlp.apply({"params": params}, x)
        return jnp.sum(jnp.square(y.astype(jnp.float32))), {}

    return loss


def plain_dense_loss(dtype: str, fuse_gate_up: bool = False) -> Callable:
    """The same SwiGLU in plain jnp on `[T, d]` (no Flax, no logical axes): the baseline
    candidate with the least around its three matmuls. `fuse_gate_up`: gate and up as one
    matmul on `[W_gate | W_up]`, concatenated inside the step like `moe.fuse_gate_up`."""

    def loss(w, x):
        x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
        if fuse_gate_up:
            both = jnp.concatenate([w["w_gate"], w["w_up"]], axis=-1).astype(dtype)
            gate, up = jnp.split(x2 @ both, 2, axis=-1)
        else:
            gate, up = x2 @ w["w_gate"].astype(dtype), x2 @ w["w_up"].astype(dtype)
        h = jax.nn.silu(gate) * up
        return jnp.sum(jnp.square((h @ w["w_down"].astype(dtype)).astype(jnp.float32))), {}

    return loss


def fwd_bwd(loss: Callable) -> Callable:
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def experts_only_step(shape: Shape, params, x, impl: str, fuse_gate_up: bool = False):
    """fwd+bwd of the routed SwiGLU alone over the expert-sorted rows (the grouped matmuls)."""
    cfg = moe_config(shape, "ragged")
    x_flat = x.reshape(shape.tokens, shape.d_model)
    router = ROUTERS[cfg.scorer](cfg, param_dtype="float32")
    ids = np.asarray(jax.jit(router.apply)({"params": params["router"]}, x_flat).expert_ids)
    # the ragged plan's row order: assignments numbered choice-major (`moejax.moe.permute`)
    order = np.argsort(ids.T.reshape(-1), kind="stable")
    sizes = jnp.asarray(np.bincount(ids.reshape(-1), minlength=shape.experts), jnp.int32)
    x_sorted = x_flat[jnp.asarray(order % shape.tokens)]
    return compile_step(
        jax.value_and_grad(experts_only_loss(shape, impl, fuse_gate_up), argnums=(0, 1)),
        params["experts"],
        x_sorted,
        sizes,
    )


def experts_only_loss(shape: Shape, impl: str, fuse_gate_up: bool = False) -> Callable:
    """`loss(expert_weights, x_sorted[T*k, d], group_sizes[E])`: the routed SwiGLU alone."""

    def loss(w, xs, group_sizes):
        expert_fn = swiglu_expert_fn(
            w["w_gate"], w["w_up"], w["w_down"], jnp.dtype(shape.dtype), None, fuse_gate_up
        )
        y = expert_fn(
            xs, lambda lhs, rhs: gmm(lhs, rhs, group_sizes, impl=impl, tile=shape.gmm_tile)
        )
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    return loss


def experts_batched_step(shape: Shape, params, x, fuse_gate_up: bool = False):
    """fwd+bwd of the routed SwiGLU alone as the `hybrid` plan's batched matmuls, on
    capacity buffers `[E, ceil(T k / E), d]` that every expert fills exactly: its buffers
    with no gathers, combine, overflow loop or empty slots."""
    rows = shape.tokens * shape.top_k
    cap = -(-rows // shape.experts)
    x_flat = x.reshape(shape.tokens, shape.d_model)
    slots = x_flat[jnp.arange(shape.experts * cap) % shape.tokens]
    slots = slots.reshape(shape.experts, cap, shape.d_model)

    def loss(w, xs):
        expert_fn = swiglu_expert_fn(
            w["w_gate"], w["w_up"], w["w_down"], jnp.dtype(shape.dtype), None, fuse_gate_up
        )
        return jnp.sum(jnp.square(expert_fn(xs, batched_mm).astype(jnp.float32)))

    return compile_step(jax.value_and_grad(loss, argnums=(0, 1)), params["experts"], slots)


def shared_experts_step(shape: Shape, params, x):
    """fwd+bwd of the layer's shared experts alone (a dense SwiGLU of the shared width)."""
    return compile_step(fwd_bwd(dense_loss(shared_mlp(shape))), params["shared"], x)


def experts_key(dispatcher: str, shape: Shape) -> str | None:
    """The case that times a dispatcher's routed experts alone (None: no such case): the
    grouped matmul it sorts into (`experts/IMPL`) or the `hybrid` plan's batched matmuls
    (`experts/batched`), `+fused` with `moe.fuse_gate_up`."""
    impl = "batched" if plan_of(dispatcher) == "hybrid" else ragged_impl(dispatcher, shape)
    if impl is None:
        return None
    return f"experts/{impl}" + ("+fused" if moe_config(shape, dispatcher).fuse_gate_up else "")


def ragged_impl(dispatcher: str, shape: Shape) -> str | None:
    """The grouped-matmul impl a dispatcher sorts into, or None if it is not a sorted plan
    (`pallas` sorts into the Pallas grouped matmul)."""
    plan = plan_of(dispatcher)
    if plan == "pallas":
        return "pallas"
    if plan != "ragged":
        return None
    if split_variant(dispatcher)[0] == "auto":
        return AUTO_PLAN.get(jax.default_backend(), AUTO_PLAN["cpu"])[1]
    return resolve_gmm_impl(shape.gmm_impl)


DENSE_BASELINES = ("dense_mlp", "dense_swiglu_2d", "dense_swiglu_2d_fused")


def plan_of(dispatcher: str) -> str:
    """The plan a dispatcher name runs (`auto` resolves by platform; variants dropped)."""
    dispatcher = split_variant(dispatcher)[0]
    if dispatcher == "auto":
        return AUTO_PLAN.get(jax.default_backend(), AUTO_PLAN["cpu"])[0]
    return dispatcher


def overflow_fraction(shape: Shape, load) -> float:
    """The share of assignments the `hybrid` plan sends through its tile loop: per expert,
    the load past the buffer's C rows (`load` is each expert's share of assignments)."""
    rows = shape.tokens * shape.top_k
    cap = head_capacity(rows, shape.experts, MoEConfig().hybrid_capacity_factor)
    counts = np.asarray(load, np.float64) * rows
    return round(float(np.maximum(counts - cap, 0).sum() / rows), 4)


def reference_skip_reason(
    shape: Shape, dense_call_s: float, repeats: int, budget_s: float
) -> str | None:
    """Why `dense_reference` is too slow to time (None if it fits the budget), predicted from
    the dense MLP's time per call and the FLOP ratio (E + n_shared) / (k + n_shared)."""
    ratio = shape.gflop(shape.experts + shape.shared) / shape.gflop(
        shape.top_k + shape.shared, router=False
    )
    calls = repeats + 2  # warm-up, timed repeats, and about one more for compiling
    predicted = calls * dense_call_s * ratio
    if predicted <= budget_s:
        return None
    return (
        f"predicted {predicted:.0f}s for {calls} fwd+bwd calls ({ratio:.1f}x the dense MLP "
        f"FLOPs) > --reference-budget-s {budget_s:g}"
    )


def load_hf_peer():
    """The torch peer module, or the reason it cannot run (torch/transformers missing)."""
    try:
        from experiments.benchmarks import hf_peer
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return hf_peer, None


# ------------------------------------------------------------------------------ main
def pallas_skip_reason(shape: Shape, max_rows: int) -> str | None:
    """Why the `pallas` dispatcher is not timed (None if it is): on CPU its kernels run in
    Pallas interpret mode, a correctness tool, so only small shapes are worth the wait."""
    rows = shape.tokens * shape.top_k
    if jax.default_backend() != "cpu" or rows <= max_rows:
        return None
    return (
        f"interpret mode on CPU (no compiled Pallas): {rows} rows > "
        f"--pallas-interpret-max-rows {max_rows}"
    )


def run(
    shape: Shape,
    dispatchers: list[str],
    repeats: int,
    skip: set[str],
    reference_budget_s: float,
    hf_impls: list[str],
    torch_threads: int,
    pallas_interpret_max_rows: int = 4096,
    profile: tuple[str, ...] = (),
) -> dict:
    t_start = time.perf_counter()
    key_x, key_init, key_dense = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(key_x, (shape.batch, shape.seq_len, shape.d_model)).astype(shape.dtype)
    model = model_config(shape)
    steps, compile_s, first_call_s, metrics, skipped = {}, {}, {}, {}, {}

    def add(name, step_and_compile, keep_metrics=False):
        step, compile_s[name] = step_and_compile
        t0 = time.perf_counter()
        out = step()
        first_call_s[name] = time.perf_counter() - t0
        if keep_metrics:  # ((loss, metrics), grads) of a MoE fwd+bwd; drop the grads
            metrics[name] = jax.device_get(out[0][1])
        steps[name] = step
        log(
            f"{name}: compiled in {compile_s[name]:.1f}s, "
            f"first call {first_call_s[name] * 1e3:.1f}ms"
        )

    mlp = dense_mlp(shape, shape.dense_width)
    dense_params = nn.unbox(jax.jit(mlp.init)(key_dense, x))["params"]
    add("dense_mlp", compile_step(fwd_bwd(dense_loss(mlp)), dense_params, x))
    add("dense_swiglu_2d", compile_step(fwd_bwd(plain_dense_loss(shape.dtype)), dense_params, x))
    fused = plain_dense_loss(shape.dtype, fuse_gate_up=True)
    add("dense_swiglu_2d_fused", compile_step(fwd_bwd(fused), dense_params, x))
    t0 = time.perf_counter()
    steps["dense_mlp"]()  # a second call: the first one also allocates
    dense_call_s = time.perf_counter() - t0

    init_layer = MoELayer(moe_config(shape, "auto"), model)
    params = nn.unbox(jax.jit(init_layer.init)(key_init, x))["params"]
    for name in dispatchers:
        if name in skip:
            skipped[name] = "--skip"
            continue
        if plan_of(name) == "pallas":
            reason = pallas_skip_reason(shape, pallas_interpret_max_rows)
            if reason:
                skipped[name] = reason
                log(f"skipping pallas: {reason}")
                continue
        if name == "dense_reference":
            reason = reference_skip_reason(shape, dense_call_s, repeats, reference_budget_s)
            if reason:
                skipped[name] = reason
                log(f"skipping dense_reference: {reason}")
                continue
        layer = MoELayer(moe_config(shape, name), model)
        add(name, compile_step(fwd_bwd(moe_loss(layer)), params, x), keep_metrics=True)
        if "breakdown" not in skip and name != "dense_reference":
            add(f"{name}/fwd", compile_step(moe_loss(layer), params, x))
            key, fused = experts_key(name, shape), moe_config(shape, name).fuse_gate_up
            if key is not None and key not in steps:
                if plan_of(name) == "hybrid":
                    add(key, experts_batched_step(shape, params, x, fused))
                else:
                    add(key, experts_only_step(shape, params, x, ragged_impl(name, shape), fused))
            if key is not None and shape.shared and "shared_experts" not in steps:
                add("shared_experts", shared_experts_step(shape, params, x))

    hf_info = {"available": False}
    if "hf" in skip:
        hf_info["reason"] = "--skip hf"
    else:
        hf_peer, reason = load_hf_peer()
        if hf_peer is None:
            hf_info["reason"] = reason
        else:
            try:
                hf_steps, info = hf_peer.build_steps(
                    shape, experts_impls=hf_impls, threads=torch_threads
                )
                hf_info = {"available": True, **info}
                for name, step in hf_steps.items():
                    add(name, (step, 0.0))
            except Exception as e:  # noqa: BLE001 -- the optional peer must not sink the run
                hf_info = {"available": False, "reason": f"{type(e).__name__}: {e}"}
                for name in [n for n in steps if n.startswith(("hf_", "torch_"))]:
                    del steps[name]
                log(f"HF peer failed: {hf_info['reason']}")

    log(f"timing {len(steps)} cases x {repeats} repeats")
    times = measure(steps, repeats, log)
    report = assemble(shape, times, compile_s, first_call_s, metrics, hf_info, repeats)
    if profile:  # after the timing, so tracing cannot perturb it
        report["profile"] = {n: profile_step(steps[n]) for n in profile if n in steps}
    if skipped:
        report["skipped"] = skipped
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


def assemble(
    shape: Shape,
    times: dict[str, list[float]],
    compile_s: dict[str, float],
    first_call_s: dict[str, float],
    metrics: dict[str, dict],
    hf_info: dict,
    repeats: int,
) -> dict:
    """The JSON report from the per-case times (ms) and each MoE case's warm-up metrics."""
    res = {}
    candidates = [n for n in DENSE_BASELINES if n in times]
    for name in candidates:
        d = summary(times[name])
        res[name] = {
            **d,
            "compile_s": round(compile_s.get(name, 0.0), 2),
            "active_gflop_per_s": round(
                shape.gflop(shape.top_k + shape.shared, router=False) / d["ms"] * 1e3, 2
            ),
        }
    baseline = min(candidates, key=lambda n: res[n]["ms"])  # the fastest dense SwiGLU
    dense = res[baseline]
    hf_times = times.get("hf_deepseek_v3_moe") if hf_info.get("available") else None
    routing = None
    for name, m in metrics.items():
        s = summary(times[name])
        paired = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        entry = {
            **s,
            "ratio_to_dense": sig(s["ms"] / dense["ms"]),
            "ratio_to_dense_min": sig(s["ms_min"] / dense["ms_min"]),
            "ratio_to_dense_paired": sig(paired),
            "compile_s": round(compile_s[name], 2),
            "active_gflop_per_s": round(shape.gflop(shape.top_k + shape.shared) / s["ms"] * 1e3, 2),
            "dropped_fraction": round(float(m["dropped_fraction"]), 6),
        }
        if hf_times:
            hf = summary(hf_times)
            entry["vs_hf"] = sig(s["ms"] / hf["ms"])
            entry["vs_hf_min"] = sig(s["ms_min"] / hf["ms_min"])
            entry["vs_hf_paired"] = sig(
                statistics.median(a / b for a, b in zip(times[name], hf_times))
            )
        if plan_of(name) == "hybrid":
            entry["overflow_fraction"] = overflow_fraction(shape, m["load"])
        if f"{name}/fwd" in times:
            fwd = summary(times[f"{name}/fwd"])
            entry.update(fwd_ms=fwd["ms"], fwd_ms_min=fwd["ms_min"])
        impl = ragged_impl(name, shape)
        if impl is not None:
            entry["gmm_impl"] = impl
        key = experts_key(name, shape)
        if key in times:
            ex = summary(times[key])
            entry.update(
                experts_ms=ex["ms"],
                experts_ms_min=ex["ms_min"],
                experts_share=sig(ex["ms"] / s["ms"]),
            )
            shared = summary(times["shared_experts"])["ms"] if "shared_experts" in times else 0.0
            if shared or not shape.shared:
                entry.update(
                    shared_ms=shared,
                    floor_ms=round(ex["ms"] + shared, 3),
                    floor_ratio_to_dense=sig((ex["ms"] + shared) / dense["ms"]),
                )
        res[name] = entry
        if routing is None:
            load = np.asarray(m["load"], np.float64)
            routing = {
                "scorer": moe_config(shape, name).scorer,
                "selection": moe_config(shape, name).selection,
                "max_over_mean": sig(float(load.max() / load.mean())),
                "min_over_mean": sig(float(load.min() / load.mean())),
                "cv": sig(float(load.std() / load.mean())),
            }
    report = {
        "baseline": baseline,
        "device": device_name(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "shape": shape.as_dict(),
        "repeats": repeats,
        "loss": "sum(y**2) + router aux losses; grads w.r.t. params and x",
        "auto_plan": dict(
            zip(("dispatcher", "gmm_impl"), AUTO_PLAN.get(jax.default_backend(), AUTO_PLAN["cpu"]))
        ),
        "routing": routing,
        "results": res,
    }
    if hf_info.get("available") and "hf_deepseek_v3_moe" in times:
        tdense = summary(times["torch_dense_mlp"])
        res["torch_dense_mlp"] = tdense
        for name in [n for n in times if n.startswith("hf_deepseek_v3_moe")]:
            s = summary(times[name])
            res[name] = {
                **s,
                "ratio_to_own_dense": sig(s["ms"] / tdense["ms"]),
                "ratio_to_own_dense_min": sig(s["ms_min"] / tdense["ms_min"]),
                "first_call_ms": round(first_call_s[name] * 1e3, 1),
            }
        hf_info["jax_dense_vs_torch_dense"] = sig(dense["ms"] / tdense["ms"])
        if "auto" in res:
            hf = res["hf_deepseek_v3_moe"]
            report["auto_vs_hf"] = sig(res["auto"]["ms"] / hf["ms"])
            report["auto_vs_hf_min"] = sig(res["auto"]["ms_min"] / hf["ms_min"])
            report["auto_vs_hf_paired"] = sig(
                statistics.median(a / b for a, b in zip(times["auto"], times["hf_deepseek_v3_moe"]))
            )
    report["hf"] = hf_info
    return report


def arg_parser() -> argparse.ArgumentParser:
    """The flags (shape, dispatchers, peers); `moe_layer_tpu_cost.py` reuses them."""
    d = Shape()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=d.tokens)
    p.add_argument("--batch", type=int, default=d.batch, help="x is [batch, tokens / batch, d]")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--d-expert", type=int, default=d.d_expert)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--shared", type=int, default=d.shared)
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=d.dtype,
        help="compute dtype; parameters stay float32",
    )
    p.add_argument("--gmm-tile", type=int, default=d.gmm_tile)
    p.add_argument(
        "--gmm-impl",
        default=d.gmm_impl,
        help="moe.gmm_impl for the `ragged` dispatcher: auto|tile_loop|ragged_dot",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--dispatchers",
        default=",".join(DISPATCHERS),
        help="comma list out of " + ",".join(DISPATCHERS) + ", each optionally with "
        "+VARIANT (" + ",".join(VARIANTS) + ": moe.fuse_gate_up=True), e.g. pallas+fused",
    )
    p.add_argument(
        "--skip", default="", help="comma list of dispatchers and/or " + ",".join(OPTIONAL)
    )
    p.add_argument(
        "--reference-budget-s",
        type=float,
        default=60.0,
        help="run dense_reference only if its predicted time fits (inf: always)",
    )
    p.add_argument(
        "--pallas-interpret-max-rows",
        type=int,
        default=4096,
        help="on CPU, time the pallas dispatcher (interpret mode) only up to this "
        "many tokens x top_k rows",
    )
    p.add_argument(
        "--hf-impl",
        default="grouped_mm",
        help="comma list of transformers experts_implementation for the HF peer "
        "(grouped_mm|eager|batched_mm); the first is `hf_deepseek_v3_moe`",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count(),
        help="torch.set_num_threads for the HF peer (JAX uses every core)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma list of timed cases (e.g. dense_mlp,pallas) whose device ops are traced "
        "after the timing and summed by name (kernel_profile.py; GPU/TPU only)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = arg_parser()
    args = p.parse_args(argv)
    for flag, names, allowed in [
        ("--dispatchers", args.dispatchers, DISPATCHERS),
        ("--skip", args.skip, (*DISPATCHERS, *OPTIONAL)),
    ]:
        unknown = [
            n
            for n in names.split(",")
            if n
            and (n.split("+")[0] not in allowed or any(v not in VARIANTS for v in n.split("+")[1:]))
        ]
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {','.join(allowed)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def shape_from_args(args: argparse.Namespace) -> Shape:
    return Shape(
        tokens=args.tokens,
        batch=args.batch,
        d_model=args.d_model,
        experts=args.experts,
        d_expert=args.d_expert,
        top_k=args.top_k,
        shared=args.shared,
        dtype=args.dtype,
        gmm_tile=args.gmm_tile,
        gmm_impl=args.gmm_impl,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = shape_from_args(args)
    log(f"shape {shape}; device {device_name()}")
    report = run(
        shape,
        [n for n in args.dispatchers.split(",") if n],
        args.repeats,
        {n for n in args.skip.split(",") if n},
        args.reference_budget_s,
        [n for n in args.hf_impl.split(",") if n],
        args.torch_threads,
        args.pallas_interpret_max_rows,
        tuple(n for n in args.profile.split(",") if n),
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return report


def format_table(report: dict) -> str:
    lines = [
        f"{report['device']}, jax {report['jax']}, shape {report['shape']}",
        f"{'case':<24}{'ms':>10}{'ms_min':>10}{'x dense':>9}{'fwd ms':>9}{'experts ms':>11}",
    ]
    for name, r in report["results"].items():
        ratio = r.get("ratio_to_dense", r.get("ratio_to_own_dense", math.nan))
        lines.append(
            f"{name:<24}{r['ms']:>10.1f}{r['ms_min']:>10.1f}{ratio:>9.2f}"
            f"{r.get('fwd_ms', math.nan):>9.1f}{r.get('experts_ms', math.nan):>11.1f}"
        )
    for key in ("routing", "auto_vs_hf", "skipped", "hf"):
        if key in report:
            lines.append(f"{key}: {report[key]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
