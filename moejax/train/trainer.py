"""The training loop: config -> mesh -> data -> model and optimizer -> sharded state ->
jit-compiled steps -> logging, evaluation, checkpoints, resume.

`train(config, workdir)` runs (or resumes) one experiment and returns its final metrics.
Everything it writes lives in `workdir`: `config.json`, `checkpoints/`, `metrics.jsonl`,
`tensorboard/`.

Reliability (issue 8): every input is checked before compiling (`preflight.py`); a run
killed at any step and restarted with the same command continues from its latest complete
checkpoint bit-identically (state, data position; the step has no randomness); SIGTERM
saves a final checkpoint and raises `Preempted` (`preemption.py`); non-finite steps are
skipped inside the jitted step and the run stops after `train.max_bad_steps` in a row,
never checkpointing a non-finite step (`faults.py`); router health is checked at each log
step (`router_health.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moejax.config import Sections, validate
from moejax.data import DOMAINS, describe, make_batches
from moejax.lora import trainable as trainable_lib
from moejax.lora.adapter import COLLECTIONS as LORA_COLLECTIONS
from moejax.models.flops import count_params, train_flops_per_token
from moejax.models.transformer import Transformer
from moejax.moe.selection import BIAS_COLLECTION, selection_rule
from moejax.sharding.context import InMesh
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import (
    check_divisible,
    logical_shardings,
    shard_batch,
    under_rules,
)
from moejax.train import adapter_checkpoint as lora_ckpt
from moejax.train import preflight
from moejax.train.checkpoint import Checkpointer
from moejax.train.distributed import gather_data_states, local_data_state
from moejax.train.faults import BadStepGuard, FaultHooks, NonFiniteError
from moejax.train.mfu import device_peak_tflops
from moejax.train.optimizer import drop_masked_boxes, learning_rate_schedule, make_optimizer
from moejax.train.preemption import Preempted, PreemptionWatcher
from moejax.train.router_health import RouterHealth
from moejax.train.routing_stability import RoutingStability
from moejax.train.step import TrainState, eval_step, train_step
from moejax.train.writers import make_writers

# ----------------------------------------------------------------------------------------
# Run directory and config bookkeeping.


def _write_config(workdir: str, config_dict: dict) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------
# Metrics formatting.


def _flatten_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-MoE-layer arrays [n_layers, ...] -> one entry per layer plus the layer mean."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name.startswith("moe/") and value.ndim >= 1:
            for i, v in enumerate(value):
                out[f"{prefix}{name}/layer{i}"] = v
            if value.ndim == 1:
                out[f"{prefix}{name}"] = float(value.mean())
        else:
            out[f"{prefix}{name}"] = value
    return out


def _measured_flops_per_token(s: Sections, metrics: dict[str, Any]) -> float | None:
    """Training FLOPs per token from the measured experts per token, where routing makes it
    vary (top-p); None (the static count) otherwise."""
    if not s.model.num_moe_layers or selection_rule(s.moe) != "top_p":
        return None
    used = float(np.mean(metrics["moe/experts_per_token"]))
    return train_flops_per_token(s.model, s.moe, s.data.seq_len, experts_per_token=used)


class _Throughput:
    """Tokens/s, TFLOP/s per device and MFU over a logging interval."""

    def __init__(self, flops_per_token: float, num_devices: int, peak_tflops: float):
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak_tflops
        self.reset()

    def reset(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int):
        self.tokens += tokens

    def read(self, flops_per_token: float | None = None) -> dict[str, float]:
        """`flops_per_token` overrides the static count (top-p: from measured experts)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        tflops = tps * (flops_per_token or self.flops_per_token) / self.num_devices / 1e12
        out = {"perf/tokens_per_sec": tps, "perf/tflops_per_device": tflops}
        if self.peak > 0:
            out["perf/mfu"] = tflops / self.peak
        self.reset()
        return out


# ----------------------------------------------------------------------------------------
# Evaluation.


def _routing_summary(result: dict[str, Any]) -> str:
    """Experts per token (when it varies by design, e.g. top-p) and routing stability."""
    parts = []
    if "eval/moe/experts_per_token" in result:
        parts.append(f"experts/token {float(result['eval/moe/experts_per_token']):.2f}")
    if "eval/moe/top1_changed" in result:
        parts.append(f"top-1 changed {100 * float(result['eval/moe/top1_changed']):.1f}%")
    return ("; " + ", ".join(parts)) if parts else ""


def _eval_batches(s: Sections):
    """This process's eval batches, padded so every process runs the same number of steps
    (a multi-host eval step is a collective; a process that ran out feeds padding)."""
    batches = make_batches(s.data, s.data.eval_split, repeat=False)
    i = 0
    while not s.train.eval_batches or i < s.train.eval_batches:
        batch = next(batches, None)
        done = batch is None
        if jax.process_count() > 1:  # stop only once every process has run out
            from jax.experimental import multihost_utils

            done = bool(np.all(multihost_utils.process_allgather(np.array(done))))
        if done:
            return
        yield batches.padding_batch() if batch is None else batch
        i += 1


def evaluate(
    eval_fn,
    params,
    s: Sections,
    mesh,
    stability: RoutingStability | None = None,
    router_bias: Any = None,
    lora_state: Any = None,
) -> dict[str, float]:
    """Loss over the validation batches (overall, per domain), MoE metrics, experts per token
    per domain, and with `stability` the fraction of tokens whose first-choice expert changed
    since the previous call. `router_bias`: the state's router bias collection, if any."""
    totals: dict[str, Any] = {}
    top1 = []
    bias_kw = {} if router_bias is None else {"router_bias": router_bias}
    if lora_state is not None:
        bias_kw["lora_state"] = lora_state
    for batch in _eval_batches(s):
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh, s.mesh.rules), **bias_kw))
        if "top1_expert" in out:
            top1.append(out.pop("top1_expert").reshape(s.model.num_moe_layers, -1))
        totals = out if not totals else jax.tree.map(np.add, totals, out)
    if not totals:
        return {}
    n = float(totals["batches"])
    loss = float(totals["ce_sum"] / max(totals["tokens"], 1.0))
    result = {
        "eval/loss": loss,
        "eval/bits_per_byte": loss / math.log(2),
        "eval/tokens": float(totals["tokens"]),
        "eval/aux_loss": totals["aux_loss_sum"] / n,
    }
    for d, name in enumerate(DOMAINS):
        if totals["domain_tokens"][d] > 0:
            result[f"eval/loss/{name}"] = float(
                totals["domain_ce_sum"][d] / totals["domain_tokens"][d]
            )
    moe = {k: v / n for k, v in totals.items() if k.startswith("moe/")}
    if stability is not None and top1:
        moe.update(stability.update(np.concatenate(top1, axis=1)))
    result.update(_flatten_metrics("eval/", moe))
    if "domain_experts_sum" in totals:  # [num_moe_layers, domains]
        per_domain = totals["domain_experts_sum"] / np.maximum(totals["domain_tokens"], 1.0)
        for d, name in enumerate(DOMAINS):
            if totals["domain_tokens"][d] > 0:
                result.update(
                    _flatten_metrics("eval/", {f"moe/experts_per_token/{name}": per_domain[:, d]})
                )
    return result


# ----------------------------------------------------------------------------------------
# Model, optimizer, sharded state and compiled steps for one mesh.


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything compiled for one config on one mesh (also handy in notebooks and tests)."""

    model: Transformer
    tx: Any
    schedule: Any
    mesh: Any
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the checkpoint restore target
    init_fn: Any  # rng -> TrainState, placed by state_shardings
    step_fn: Any  # (state, batch) -> (state, metrics); donates the state
    eval_fn: Any  # (params, batch, router_bias=None) -> sums


def build_experiment(s: Sections, mesh) -> Experiment:
    adapters_only = s.lora.method != "none"
    model = Transformer(s.model, s.moe, lora=s.lora if adapters_only else None)
    tx = make_optimizer(s.train, adapters_only=adapters_only)
    schedule = learning_rate_schedule(s.train)
    dummy = jnp.zeros((1, s.data.seq_len), jnp.int32)

    def init_boxed(rng):
        variables = model.init(rng, dummy)
        params = variables["params"]
        lora_state = {k: variables[k] for k in LORA_COLLECTIONS if k in variables}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=drop_masked_boxes(tx.init(params)),
            router_bias=variables.get(BIAS_COLLECTION),
            lora_state=lora_state or None,
        )

    # Sharding: abstract boxed state -> logical specs -> NamedShardings -> jit(init).
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    check_divisible(abstract_boxed, mesh, s.mesh.rules)
    state_shardings = logical_shardings(abstract_boxed, mesh, s.mesh.rules)
    abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        nn.unbox(abstract_boxed),
        state_shardings,
    )
    init_fn = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=state_shardings)
    # The steps run under the activation rules and with `mesh` as the context mesh: the
    # expert_parallel and fssdp dispatchers shard_map over it (init runs without: the dummy
    # batch is one row).
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        grad_accum=s.train.grad_accum,
        schedule=schedule,
        skip_non_finite=s.train.skip_non_finite,
        adapters_only=adapters_only,
    )
    step_fn = InMesh(
        jax.jit(
            under_rules(step, mesh, s.mesh.rules),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        ),
        mesh,
    )
    # Replicated outputs: every process can read the per-token `top1_expert` of the batch.
    evaluate_ = functools.partial(eval_step, model=model, num_domains=len(DOMAINS))
    eval_fn = InMesh(
        jax.jit(
            under_rules(evaluate_, mesh, s.mesh.rules),
            out_shardings=NamedSharding(mesh, PartitionSpec()),
        ),
        mesh,
    )
    return Experiment(
        model, tx, schedule, mesh, state_shardings, abstract_state, init_fn, step_fn, eval_fn
    )


# ----------------------------------------------------------------------------------------
# The experiment.


def _check_finite(guard: BadStepGuard, pending: list, ckpt: Checkpointer, workdir: str) -> None:
    """Feeds the not yet observed steps of `pending` to the guard (one small device_get);
    raises NonFiniteError, after waiting for any save in flight, when the run must stop."""
    new = [(step, m) for step, m in pending if step > guard.last_observed]
    if not new:
        return
    flags, losses = jax.device_get(([m["nonfinite"] for _, m in new], [m["loss"] for _, m in new]))
    reason = guard.observe_all([step for step, _ in new], flags, losses)
    if reason:
        ckpt.wait()
        raise NonFiniteError(guard.stop_message(reason, ckpt.latest_step(), workdir))


def _saved_state(state: TrainState, adapter_run: bool) -> TrainState:
    """What a checkpoint holds: the whole state, or for an adapter run its adapters only."""
    return state.replace(params=lora_ckpt.adapter_part(state.params)) if adapter_run else state


def _restore_adapter_run(
    s: Sections, workdir: str, exp: Experiment, rng, ckpt: Checkpointer, notes: list[str]
):
    """Loads the frozen base (`moejax.train.adapter_checkpoint`), then resumes the adapters from the
    latest checkpoint (checking that the base is the one they were trained on) or
    initialises them. Returns (full state, data state, start step, base reference)."""
    abstract = exp.abstract_state
    source = lora_ckpt.base_source(s.lora, workdir)
    if source["kind"] == "own" and ckpt.latest_step() is None:
        fresh = exp.init_fn(rng)
        lora_ckpt.save_own_base(workdir, fresh.params, fresh.router_bias)
        del fresh
    base, source = lora_ckpt.load_base(
        s.lora, workdir, abstract.params, abstract.router_bias, s.model
    )
    fp = lora_ckpt.fingerprint(base["params"])

    def init():
        fresh = exp.init_fn(rng)
        bias = base["router_bias"] if base["router_bias"] is not None else fresh.router_bias
        return fresh.replace(params=lora_ckpt.adapter_part(fresh.params), router_bias=bias)

    target = abstract.replace(params=lora_ckpt.adapter_part(abstract.params))
    state, data_state, start_step = ckpt.restore_or_init(init, target, log=notes.append)
    if start_step:
        extra = ckpt.read_extra(start_step) or {}
        if "base" not in extra:
            raise lora_ckpt.BaseModelError(
                f"{ckpt.step_dir(start_step)} has no base reference; it was not written by an "
                f"adapter run. Pass a new --workdir."
            )
        lora_ckpt.check_fingerprint(extra["base"]["fingerprint"], fp, source, start_step)
    n_train = trainable_lib.count(abstract.params)
    n_base = sum(x.size for x in jax.tree.leaves(base["params"]))
    notes.append(
        f"adapters: {n_train} trainable params ({100 * n_train / n_base:.3f}% of the "
        f"{n_base / 1e6:.2f}M frozen base from {source['kind']}: {source['path']})"
    )
    state = state.replace(params=lora_ckpt.with_base(state.params, base["params"]))
    return state, data_state, start_step, lora_ckpt.base_extra(source, fp)


def train(config, workdir: str) -> dict[str, float]:
    """Runs or resumes the experiment `config` in `workdir`; returns the final metrics.

    SIGTERM is watched for the whole call: once the first step has run, the trainer saves
    the current step and raises `Preempted` (see `preemption.py`).
    """
    with PreemptionWatcher() as watcher:
        return _train(config, workdir, watcher)


def _train(config, workdir: str, watcher: PreemptionWatcher) -> dict[str, float]:
    # Config and inputs: validated and checked once, before any compilation.
    s = validate(config)
    config_dict = config.to_dict()
    hooks = FaultHooks.from_env()
    workdir = preflight.check_workdir(workdir)
    preflight.check_resume_config(workdir, config_dict)
    train_batches = preflight.open_train_data(s)
    is_main = jax.process_index() == 0

    # Mesh, model, optimizer, shardings, compiled steps.
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    rng = jax.random.PRNGKey(s.train.seed)

    # Checkpoint: resume from the latest complete step in the workdir, or initialise.
    notes: list[str] = []
    ckpt = Checkpointer(
        workdir,
        keep=s.train.keep_checkpoints,
        save_every=s.train.checkpoint_every,
        async_save=s.train.async_checkpoint,
    )
    adapter_run = s.lora.method != "none"
    if adapter_run:  # adapters checkpointed apart from their frozen base
        state, data_state, start_step, base_ref = _restore_adapter_run(
            s, workdir, exp, rng, ckpt, notes
        )
    else:
        state, data_state, start_step = ckpt.restore_or_init(
            lambda: exp.init_fn(rng), exp.abstract_state, log=notes.append
        )
    if start_step == 0:
        if is_main:
            _write_config(workdir, config_dict)
    else:
        preflight.resume_data(train_batches, local_data_state(data_state), start_step)

    # Banner.
    counts = count_params(s.model, s.moe)
    flops_per_token = train_flops_per_token(s.model, s.moe, s.data.seq_len)
    peak, peak_source = device_peak_tflops(s.train.peak_tflops)
    writers = make_writers(workdir, s.train.steps, start_step, is_main)
    log = writers.log_line
    log(
        f"moejax: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.process_count()} process(es)); mesh {dict(mesh.shape)}"
    )
    log(
        f"params: total {counts.total / 1e6:.2f}M, active per token {counts.active / 1e6:.2f}M "
        f"({counts.active_matmul / 1e6:.2f}M in matmuls); "
        f"{flops_per_token / 1e6:.1f} MFLOP/token (train); peak {peak:.3g} TFLOP/s "
        f"per device ({peak_source})"
    )
    try:
        stats = describe(s.data)
        log(
            "data: "
            + "; ".join(
                f"{k}: {v.get('documents')} docs, {v.get('bytes')} bytes" for k, v in stats.items()
            )
        )
    except Exception as e:  # describe is informational only
        log(f"data: (no description: {e})")
    if hooks.describe():
        log(f"fault injection (testing hooks): {hooks.describe()}")
    for note in notes:
        log(note)
    log(("resuming from step %d" % start_step) if start_step else f"workdir: {workdir}")
    if start_step >= s.train.steps:
        log(
            f"{workdir} already holds step {start_step} >= train.steps={s.train.steps}: nothing "
            f"to train. Raise --config.train.steps to continue, or use a new workdir."
        )

    batch_tokens = s.data.global_batch_size * s.data.seq_len
    throughput = _Throughput(flops_per_token, jax.device_count(), peak)
    guard = BadStepGuard(
        skip=s.train.skip_non_finite,
        abort=s.train.abort_on_nan,
        max_bad_steps=s.train.max_bad_steps,
    )
    health = RouterHealth(
        dead_expert_logs=s.train.dead_expert_logs,
        max_dropped_fraction=s.train.max_dropped_fraction,
        max_load_cv=s.train.max_load_cv,
    )

    # Loop.
    stability = RoutingStability()
    t_start = time.perf_counter()
    final: dict[str, float] = {}
    pending: list[tuple[int, dict]] = []  # (step, metrics) not yet logged
    for step in range(start_step + 1, s.train.steps + 1):
        batch = shard_batch(hooks.poison(step, next(train_batches)), mesh, s.mesh.rules)
        state, metrics = exp.step_fn(state, batch)
        if step == start_step + 1:  # compile time is not throughput
            jax.block_until_ready(metrics)
            log(f"compiled and ran the first step in {time.perf_counter() - t_start:.1f} s")
            throughput.reset()
        else:
            throughput.add(batch_tokens)
        pending.append((step, metrics))
        last_step = step == s.train.steps
        preempted = watcher.should_stop(step) and not last_step
        log_now = step % s.train.log_every == 0 or last_step or preempted
        save_now = step % s.train.checkpoint_every == 0 or last_step or preempted
        # Non-finite steps are counted where the host synchronises anyway (log and
        # checkpoint steps); that also keeps a non-finite step out of every checkpoint.
        if log_now or save_now:
            _check_finite(guard, pending, ckpt, workdir)
        if log_now:
            fetched = jax.device_get([m for _, m in pending])
            first_logged = pending[0][0]
            pending = []
            last = fetched[-1]
            out = _flatten_metrics(
                "train/",
                {k: v for k, v in last.items() if k not in ("loss", "learning_rate", "nonfinite")},
            )
            losses = np.array([float(m["loss"]) for m in fetched])
            bad = np.array([float(m["nonfinite"]) > 0 for m in fetched])
            out["train/loss"] = float(np.mean(losses[~bad])) if (~bad).any() else math.nan
            out["train/nonfinite_steps"] = float(bad.sum())
            out["train/lr"] = float(last.get("learning_rate", 0.0))
            out.update(throughput.read(_measured_flops_per_token(s, last)))
            writers.write(step, out)
            final.update(out)
            if bad.any():
                log(
                    f"skipped the update of {int(bad.sum())} non-finite step(s) among "
                    f"steps {first_logged}-{step} ({guard.total} in this run so far)"
                )
            for warning in health.observe(step, fetched):
                log(f"WARNING {warning}")
        if s.train.eval_every and (step % s.train.eval_every == 0 or step == s.train.steps):
            result = evaluate(
                exp.eval_fn,
                state.params,
                s,
                mesh,
                stability,
                router_bias=state.router_bias,
                lora_state=state.lora_state,
            )
            if result:
                writers.write(step, result)
                log(
                    f"eval @ {step}: loss {result['eval/loss']:.4f} "
                    f"({result['eval/bits_per_byte']:.3f} bits/byte) "
                    + " ".join(
                        f"{d}={result[f'eval/loss/{d}']:.3f}"
                        for d in DOMAINS
                        if f"eval/loss/{d}" in result
                    )
                    + _routing_summary(result)
                )
                final.update(result)
            throughput.reset()  # evaluation time is not training throughput
        if save_now and guard.streak:
            log(
                f"not checkpointing step {step}: its loss or gradients were non-finite; "
                f"the latest checkpoint stays step {ckpt.latest_step()}"
            )
        elif save_now and ckpt.save(
            step,
            _saved_state(state, adapter_run),
            data_state=gather_data_states(train_batches.get_state()),
            extra={"config": config_dict, **({"base": base_ref} if adapter_run else {})},
            force=last_step or preempted,
        ):
            hooks.after_save_started(step)
        if preempted:
            ckpt.wait()  # the save is on disk
            message = (
                f"preemption notice (signal {watcher.received}) after step {step}: "
                f"the latest checkpoint, step {ckpt.latest_step()}, is on disk in "
                f"{ckpt.directory}; rerun the same command to resume."
            )
            ckpt.close()
            log(message)
            writers.flush()
            writers.close()
            raise Preempted(step, watcher.received, message)
    ckpt.wait()
    ckpt.close()
    writers.flush()
    writers.close()
    final["step"] = s.train.steps
    final["train/nonfinite_total"] = guard.total
    return {k: float(np.asarray(v).mean()) if np.ndim(v) else float(v) for k, v in final.items()}
