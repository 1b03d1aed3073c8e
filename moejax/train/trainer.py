"""The training loop: config -> mesh -> data -> model and optimizer -> sharded state ->
jit-compiled steps -> logging, evaluation, checkpoints, resume.

`train(config, workdir)` runs (or resumes) one experiment and returns its final metrics.
Everything it writes lives in `workdir`: `config.json`, `checkpoints/`, `metrics.jsonl`,
`tensorboard/`.
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

from moejax.config import ConfigError, Sections, validate
from moejax.data import DOMAINS, describe, make_batches
from moejax.models.flops import count_params, train_flops_per_token
from moejax.models.transformer import Transformer
from moejax.moe.selection import BIAS_COLLECTION
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import check_divisible, logical_shardings, shard_batch
from moejax.train.checkpoint import Checkpointer
from moejax.train.mfu import device_peak_tflops
from moejax.train.optimizer import learning_rate_schedule, make_optimizer
from moejax.train.routing_stability import RoutingStability
from moejax.train.step import TrainState, eval_step, train_step
from moejax.train.writers import make_writers

# ----------------------------------------------------------------------------------------
# Run directory and config bookkeeping.


def _check_resume_config(workdir: str, config_dict: dict) -> None:
    """A workdir with checkpoints must be resumed with the same model; anything else would
    fail deep inside the restore or, worse, silently train a different model."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    with open(path) as f:
        saved = json.load(f)
    for section in ("model", "moe"):
        for key, value in config_dict[section].items():
            old = saved.get(section, {}).get(key)
            if old is not None and json.dumps(old) != json.dumps(value):
                raise ConfigError(
                    f"{workdir} holds checkpoints of a run with {section}.{key}={old!r}, but "
                    f"this config has {value!r}. Resume with the same {section} settings, or "
                    f"pass a new --workdir to start a separate run (nothing was changed).")


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

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        tflops = tps * self.flops_per_token / self.num_devices / 1e12
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


def evaluate(eval_fn, params, s: Sections, mesh, stability: RoutingStability | None = None,
             router_bias: Any = None) -> dict[str, float]:
    """Loss over the validation batches (overall, per domain), MoE metrics, experts per token
    per domain, and with `stability` the fraction of tokens whose first-choice expert changed
    since the previous call. `router_bias`: the state's router bias collection, if any."""
    totals: dict[str, Any] = {}
    top1 = []
    bias_kw = {} if router_bias is None else {"router_bias": router_bias}
    for batch in _eval_batches(s):
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh, s.mesh.rules), **bias_kw))
        if "top1_expert" in out:
            top1.append(out.pop("top1_expert").reshape(s.model.num_moe_layers, -1))
        totals = out if not totals else jax.tree.map(np.add, totals, out)
    if not totals:
        return {}
    n = float(totals["batches"])
    loss = float(totals["ce_sum"] / max(totals["tokens"], 1.0))
    result = {"eval/loss": loss, "eval/bits_per_byte": loss / math.log(2),
              "eval/tokens": float(totals["tokens"]), "eval/aux_loss": totals["aux_loss_sum"] / n}
    for d, name in enumerate(DOMAINS):
        if totals["domain_tokens"][d] > 0:
            result[f"eval/loss/{name}"] = float(
                totals["domain_ce_sum"][d] / totals["domain_tokens"][d])
    moe = {k: v / n for k, v in totals.items() if k.startswith("moe/")}
    if stability is not None and top1:
        moe.update(stability.update(np.concatenate(top1, axis=1)))
    result.update(_flatten_metrics("eval/", moe))
    if "domain_experts_sum" in totals:  # [num_moe_layers, domains]
        per_domain = totals["domain_experts_sum"] / np.maximum(totals["domain_tokens"], 1.0)
        for d, name in enumerate(DOMAINS):
            if totals["domain_tokens"][d] > 0:
                result.update(_flatten_metrics(
                    "eval/", {f"moe/experts_per_token/{name}": per_domain[:, d]}))
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
    model = Transformer(s.model, s.moe)
    tx = make_optimizer(s.train)
    schedule = learning_rate_schedule(s.train)
    dummy = jnp.zeros((1, s.data.seq_len), jnp.int32)

    def init_boxed(rng):
        variables = model.init(rng, dummy)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          router_bias=variables.get(BIAS_COLLECTION))

    # Sharding: abstract boxed state -> logical specs -> NamedShardings -> jit(init).
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    check_divisible(abstract_boxed, mesh, s.mesh.rules)
    state_shardings = logical_shardings(abstract_boxed, mesh, s.mesh.rules)
    abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        nn.unbox(abstract_boxed), state_shardings)
    init_fn = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=state_shardings)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, grad_accum=s.train.grad_accum,
                          schedule=schedule),
        out_shardings=(state_shardings, None), donate_argnums=(0,))
    # Replicated outputs: every process can read the per-token `top1_expert` of the batch.
    eval_fn = jax.jit(functools.partial(eval_step, model=model, num_domains=len(DOMAINS)),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    return Experiment(model, tx, schedule, mesh, state_shardings, abstract_state, init_fn,
                      step_fn, eval_fn)


# ----------------------------------------------------------------------------------------
# The experiment.


def train(config, workdir: str) -> dict[str, float]:
    # Config: validated once, before any compilation.
    s = validate(config)
    config_dict = config.to_dict()
    os.makedirs(workdir, exist_ok=True)
    _check_resume_config(workdir, config_dict)
    is_main = jax.process_index() == 0

    # Mesh, model, optimizer, shardings, compiled steps.
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    rng = jax.random.PRNGKey(s.train.seed)

    # Checkpoint: resume from the latest step in the workdir, or initialise.
    ckpt = Checkpointer(workdir, keep=s.train.keep_checkpoints,
                        save_every=s.train.checkpoint_every, async_save=s.train.async_checkpoint)
    state, data_state, start_step = ckpt.restore_or_init(lambda: exp.init_fn(rng),
                                                          exp.abstract_state)
    if start_step == 0:
        _write_config(workdir, config_dict)

    # Input.
    train_batches = make_batches(s.data, s.data.train_split)
    if data_state is not None:
        train_batches.set_state(data_state)

    # Banner.
    counts = count_params(s.model, s.moe)
    flops_per_token = train_flops_per_token(s.model, s.moe, s.data.seq_len)
    peak, peak_source = device_peak_tflops(s.train.peak_tflops)
    writers = make_writers(workdir, s.train.steps, start_step, is_main)
    log = writers.log_line
    log(f"moejax: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.process_count()} process(es)); mesh {dict(mesh.shape)}")
    log(f"params: total {counts.total / 1e6:.2f}M, active per token {counts.active / 1e6:.2f}M "
        f"({counts.active_matmul / 1e6:.2f}M in matmuls); "
        f"{flops_per_token / 1e6:.1f} MFLOP/token (train); peak {peak:.3g} TFLOP/s "
        f"per device ({peak_source})")
    try:
        stats = describe(s.data)
        log("data: " + "; ".join(f"{k}: {v.get('documents')} docs, {v.get('bytes')} bytes"
                                 for k, v in stats.items()))
    except Exception as e:  # describe is informational only
        log(f"data: (no description: {e})")
    log(("resuming from step %d" % start_step) if start_step else f"workdir: {workdir}")
    if start_step >= s.train.steps:
        log(f"{workdir} already holds step {start_step} >= train.steps={s.train.steps}: nothing "
            f"to train. Raise --config.train.steps to continue, or use a new workdir.")

    batch_tokens = s.data.global_batch_size * s.data.seq_len
    throughput = _Throughput(flops_per_token, jax.device_count(), peak)

    # Loop.
    stability = RoutingStability()
    t_start = time.perf_counter()
    final: dict[str, float] = {}
    pending: list[dict] = []
    last_logged = start_step
    for step in range(start_step + 1, s.train.steps + 1):
        batch = shard_batch(next(train_batches), mesh, s.mesh.rules)
        state, metrics = exp.step_fn(state, batch)
        if step == start_step + 1:  # compile time is not throughput
            jax.block_until_ready(metrics)
            log(f"compiled and ran the first step in {time.perf_counter() - t_start:.1f} s")
            throughput.reset()
        else:
            throughput.add(batch_tokens)
        pending.append(metrics)
        last_step = step == s.train.steps
        log_now = step % s.train.log_every == 0 or last_step
        # Losses are checked before every checkpoint too, so a non-finite state is never saved.
        if s.train.abort_on_nan and (log_now or step % s.train.checkpoint_every == 0):
            losses = np.array([float(m["loss"]) for m in pending])
            if not np.all(np.isfinite(losses)):
                ckpt.wait()
                latest = ckpt.latest_step()
                saved = (f"the last checkpoint is step {latest}; resume from {workdir}"
                         if latest is not None else "no checkpoint was written yet")
                raise FloatingPointError(
                    f"non-finite loss between steps {last_logged + 1} and {step} "
                    f"(losses {losses.tolist()}); {saved}. Lower train.learning_rate or "
                    f"enable train.grad_clip.")
        if log_now:
            fetched = jax.device_get(pending)
            pending = []
            last = fetched[-1]
            out = _flatten_metrics("train/", {k: v for k, v in last.items()
                                              if k not in ("loss", "learning_rate")})
            out["train/loss"] = float(np.mean([float(m["loss"]) for m in fetched]))
            out["train/lr"] = float(last.get("learning_rate", 0.0))
            out.update(throughput.read())
            writers.write(step, out)
            final.update(out)
            last_logged = step
        if s.train.eval_every and (step % s.train.eval_every == 0 or step == s.train.steps):
            result = evaluate(exp.eval_fn, state.params, s, mesh, stability,
                              router_bias=state.router_bias)
            if result:
                writers.write(step, result)
                log(f"eval @ {step}: loss {result['eval/loss']:.4f} "
                    f"({result['eval/bits_per_byte']:.3f} bits/byte) " + " ".join(
                        f"{d}={result[f'eval/loss/{d}']:.3f}" for d in DOMAINS
                        if f"eval/loss/{d}" in result) + _routing_summary(result))
                final.update(result)
            throughput.reset()  # evaluation time is not training throughput
        ckpt.save(step, state, data_state=train_batches.get_state(),
                  extra={"config": config_dict}, force=step == s.train.steps)
    ckpt.wait()
    ckpt.close()
    writers.flush()
    writers.close()
    final["step"] = s.train.steps
    return {k: float(np.asarray(v).mean()) if np.ndim(v) else float(v) for k, v in final.items()}
