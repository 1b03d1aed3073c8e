"""The training loop: config -> mesh -> data -> experiment (`experiment.py`: model,
optimizer, sharded state, compiled steps) -> restored or initialised state -> steps ->
logging, evaluation (`evaluation.py`), checkpoints, resume.

`train(config, workdir)` runs (or resumes) one experiment and returns its final metrics.
Everything it writes lives in `workdir`, a local directory or a gs:// URL (`moejax.paths`):
`config.json`, `checkpoints/`, `metrics.jsonl`, `tensorboard/`. Process 0 writes the shared
files (config, metrics, events); every process writes its shards of each checkpoint.

Reliability (issue 8): every input is checked before compiling (`preflight.py`); a run
killed at any step and restarted with the same command continues from its latest complete
checkpoint bit-identically (state, data position; the step has no randomness); SIGTERM
saves a final checkpoint and raises `Preempted` (`preemption.py`); non-finite steps are
skipped inside the jitted step and the run stops after `train.max_bad_steps` in a row,
never checkpointing a non-finite step (`faults.py`); router health is checked at each log
step (`router_health.py`). Re-sharded FSSDP (`moe.fssdp_reshard_every`) re-lays out the
experts' owners after every such step, before its evaluation and checkpoint
(`expert_relayout.py`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import numpy as np

from moejax.config.renames import apply_renames
from moejax.config.validation import Sections, validate
from moejax.data import describe
from moejax.models.config import layer_moe_config
from moejax.models.flops import count_params, train_flops_per_token
from moejax.paths import join, write_text
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import shard_batch
from moejax.train import config_history, preflight
from moejax.train.adapter_checkpoint import restore_adapter_run, saved_state
from moejax.train.checkpoint import Checkpointer
from moejax.train.distributed import compile_together, gather_data_states, local_data_state
from moejax.train.evaluation import evaluate
from moejax.train.experiment import Experiment, build_experiment
from moejax.train.expert_relayout import Relayout, relayout_due
from moejax.train.faults import BadStepGuard, FaultHooks, NonFiniteError
from moejax.train.metric_format import eval_line, interval_metrics
from moejax.train.mfu import Throughput, device_peak_tflops, measured_flops_per_token
from moejax.train.preemption import Preempted, PreemptionWatcher
from moejax.train.router_health import RouterHealth
from moejax.train.routing_stability import RoutingStability
from moejax.train.step import TrainState
from moejax.train.writers import MultiWriter, make_writers

# ----------------------------------------------------------------------------------------
# Run directory and config bookkeeping.


def _write_config(workdir: str, config_dict: dict) -> None:
    write_text(join(workdir, "config.json"), json.dumps(config_dict, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------
# Start: the state restored from the workdir or initialised, and the banner.


def _restore_or_init(
    s: Sections, workdir: str, exp: Experiment, rng, ckpt: Checkpointer, notes: list[str]
) -> tuple[TrainState, Any, int, dict | None]:
    """(state, data state, start step, base reference): from the latest complete checkpoint
    in the workdir, or initialised (start step 0). Adapter runs checkpoint their adapters
    apart from the frozen base (`adapter_checkpoint.py`); the base reference is None for
    the others."""
    if s.lora.method != "none":
        return restore_adapter_run(
            s, workdir, lambda: exp.init_fn(rng), exp.abstract_state, ckpt, notes
        )
    state, data_state, start_step = ckpt.restore_or_init(
        lambda: exp.init_fn(rng), exp.abstract_state, log=notes.append
    )
    return state, data_state, start_step, None


def _log_banner(
    log: Callable[[str], None],
    s: Sections,
    mesh,
    workdir: str,
    start_step: int,
    throughput: Throughput,
    peak_source: str,
    hooks: FaultHooks,
    notes: list[str],
) -> None:
    """Devices and mesh, parameter and FLOP counts, data, fault hooks, restore notes, and
    where the run starts."""
    counts = count_params(s.model, s.moe)
    log(
        f"moejax: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.process_count()} process(es)); mesh {dict(mesh.shape)}"
    )
    log(
        f"params: total {counts.total / 1e6:.2f}M, active per token {counts.active / 1e6:.2f}M "
        f"({counts.active_matmul / 1e6:.2f}M in matmuls); "
        f"{throughput.flops_per_token / 1e6:.1f} MFLOP/token (train); "
        f"peak {throughput.peak:.3g} TFLOP/s per device ({peak_source})"
    )
    try:
        stats = describe(s.data)
        log(
            f"data: tokenizer {s.data.tokenizer}; "
            + "; ".join(
                ", ".join(f"{key} {value}" for key, value in [("source", name), *v.items()])
                for name, v in stats.items()
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


# ----------------------------------------------------------------------------------------
# The steps: what the loop works with, and what it does at log, eval and checkpoint steps.


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the step loop works with, built once per call of `train`."""

    s: Sections
    workdir: str
    config_dict: dict
    exp: Experiment
    ckpt: Checkpointer
    writers: MultiWriter
    hooks: FaultHooks
    train_batches: Any
    base_ref: dict | None  # adapter runs: the base their checkpoints refer to
    throughput: Throughput
    guard: BadStepGuard
    health: RouterHealth
    stability: RoutingStability
    relayout_fn: Relayout  # re-sharded FSSDP's re-layout, compiled once

    @property
    def adapter_run(self) -> bool:
        """Checkpoints hold the adapters only, with a reference to their frozen base."""
        return self.s.lora.method != "none"

    def log_interval(self, step: int, pending: list[tuple[int, dict]]) -> dict[str, Any]:
        """Writes the metrics of the steps since the last log step (`metric_format.py`) with
        the throughput, says how many were skipped as non-finite, and prints router health
        warnings. Returns what it wrote."""
        fetched = jax.device_get([m for _, m in pending])
        out = interval_metrics(fetched)
        out.update(self.throughput.read(measured_flops_per_token(self.s, fetched[-1])))
        self.writers.write(step, out)
        bad = int(out["train/nonfinite_steps"])
        if bad:
            self.writers.log_line(
                f"skipped the update of {bad} non-finite step(s) among "
                f"steps {pending[0][0]}-{step} ({self.guard.total} in this run so far)"
            )
        for warning in self.health.observe(step, fetched):
            self.writers.log_line(f"WARNING {warning}")
        return out

    def evaluate_and_log(self, step: int, state: TrainState) -> dict[str, Any]:
        """Evaluates `state`, writes and prints the result; returns it ({} without eval
        batches)."""
        result = evaluate(
            self.exp.eval_fn,
            state.params,
            self.s,
            self.exp.mesh,
            self.stability,
            collections=state.collections,
        )
        if result:
            self.writers.write(step, result)
            self.writers.log_line(eval_line(step, result))
        return result

    def save(self, step: int, state: TrainState, force: bool) -> None:
        """Checkpoints `step` with every process's data position and the config (adapter
        runs: the adapters and the base reference), unless its loss or gradients were
        non-finite."""
        if self.guard.streak:
            self.writers.log_line(
                f"not checkpointing step {step}: its loss or gradients were non-finite; "
                f"the latest checkpoint stays step {self.ckpt.latest_step()}"
            )
            return
        # A metrics.jsonl in a bucket is uploaded whole: first, so it covers the checkpoint.
        self.writers.flush()
        if self.ckpt.save(
            step,
            saved_state(state, self.adapter_run),
            data_state=gather_data_states(self.train_batches.get_state()),
            extra={
                "config": self.config_dict,
                **({"base": self.base_ref} if self.adapter_run else {}),
            },
            force=force,
        ):
            self.hooks.after_save_started(step)

    def relayout(self, step: int, state: TrainState) -> TrainState:
        """Re-lays out the experts' owners from the last window's loads
        (`expert_relayout.py`); logs and writes what moved."""
        state, report = self.relayout_fn(state, dict(self.exp.mesh.shape).get("expert", 1))
        self.writers.write(step, report.metrics())
        self.writers.log_line(report.line(step))
        return state

    def stop_preempted(self, step: int, watcher: PreemptionWatcher) -> NoReturn:
        """Waits for the checkpoint of `step`, closes the run and raises `Preempted`."""
        self.ckpt.wait()  # the save is on disk
        message = (
            f"preemption notice (signal {watcher.received}) after step {step}: "
            f"the latest checkpoint, step {self.ckpt.latest_step()}, is on disk in "
            f"{self.ckpt.directory}; rerun the same command to resume."
        )
        self.ckpt.close()
        self.writers.log_line(message)
        self.writers.flush()
        self.writers.close()
        raise Preempted(step, watcher.received, message)

    def close(self) -> None:
        """Waits for the last save and closes the checkpointer, the writers and the data
        iterator (its grain worker processes, with data.worker_count)."""
        self.ckpt.wait()
        self.ckpt.close()
        self.writers.flush()
        self.writers.close()
        if hasattr(self.train_batches, "close"):
            self.train_batches.close()


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


def _run_steps(
    run: _Run, state: TrainState, start_step: int, watcher: PreemptionWatcher
) -> dict[str, Any]:
    """Steps `start_step + 1 .. train.steps`; returns the last logged and evaluated metrics."""
    s, log = run.s, run.writers.log_line
    batch_tokens = s.data.global_batch_size * s.data.seq_len
    t_start = time.perf_counter()
    final: dict[str, Any] = {}
    pending: list[tuple[int, dict]] = []  # (step, metrics) not yet logged
    for step in range(start_step + 1, s.train.steps + 1):
        batch = shard_batch(
            run.hooks.poison(step, next(run.train_batches)), run.exp.mesh, s.mesh.rules
        )
        if step == start_step + 1:
            compile_together(run.exp.step_fn, state, batch)  # multi-process: all compiled
        state, metrics = run.exp.step_fn(state, batch)
        if step == start_step + 1:  # compile time is not throughput
            jax.block_until_ready(metrics)
            log(f"compiled and ran the first step in {time.perf_counter() - t_start:.1f} s")
            run.throughput.reset()
        else:
            run.throughput.add(batch_tokens)
        pending.append((step, metrics))
        if relayout_due(s, step):  # before this step's evaluation and checkpoint
            state = run.relayout(step, state)
        last_step = step == s.train.steps
        preempted = watcher.should_stop(step) and not last_step
        log_now = step % s.train.log_every == 0 or last_step or preempted
        save_now = step % s.train.checkpoint_every == 0 or last_step or preempted
        # Non-finite steps are counted where the host synchronises anyway (log and
        # checkpoint steps); that also keeps a non-finite step out of every checkpoint.
        if log_now or save_now:
            _check_finite(run.guard, pending, run.ckpt, run.workdir)
        if log_now:
            final.update(run.log_interval(step, pending))
            pending = []
        if s.train.eval_every and (step % s.train.eval_every == 0 or step == s.train.steps):
            final.update(run.evaluate_and_log(step, state))
            run.throughput.reset()  # evaluation time is not training throughput
        if save_now:
            run.save(step, state, force=last_step or preempted)
        if preempted:
            run.stop_preempted(step, watcher)
    return final


# ----------------------------------------------------------------------------------------
# The experiment.


def train(config, workdir: str) -> dict[str, float]:
    """Runs or resumes the experiment `config` in `workdir`; returns the final metrics.

    SIGTERM is watched for the whole call: once the first step has run, the trainer saves
    the current step and raises `Preempted` (see `preemption.py`).
    """
    with PreemptionWatcher() as watcher:
        return _train(config, workdir, watcher)


def _train(config, workdir: str, watcher: PreemptionWatcher) -> dict[str, float]:
    # Config and inputs: validated and checked once, before any compilation.
    config_dict = apply_renames(config)  # written to config.json in the new spelling
    s = validate(config_dict)
    # model.vocab_size=0 means data.tokenizer's size: the run records the size it built.
    config_dict["model"]["vocab_size"] = s.model.vocab_size
    hooks = FaultHooks.from_env()
    workdir = preflight.check_workdir(workdir)
    preflight.check_resume_config(workdir, config_dict)
    train_batches = preflight.open_train_data(s)
    is_main = jax.process_index() == 0

    # Checkpoint: resume from the latest complete step in the workdir, or initialise; a
    # resume that changed the schedule sets where train.resume_lr applies from.
    ckpt = Checkpointer(
        workdir,
        keep=s.train.keep_checkpoints,
        save_every=s.train.checkpoint_every,
        async_save=s.train.async_checkpoint,
    )
    resume = config_history.plan_resume(workdir, config_dict, s.train, ckpt)

    # Mesh, model, optimizer, shardings, compiled steps.
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh, schedule_start=resume.schedule_start)
    rng = jax.random.PRNGKey(s.train.seed)

    notes: list[str] = []
    state, data_state, start_step, base_ref = _restore_or_init(s, workdir, exp, rng, ckpt, notes)
    resume.record(start_step, notes.append, write=is_main)  # config changes, config_history/
    if start_step == 0:
        if is_main:
            _write_config(workdir, config_dict)
    else:
        preflight.resume_data(train_batches, local_data_state(data_state), start_step)

    flops_per_token = train_flops_per_token(s.model, s.moe, s.data.seq_len)
    peak, peak_source = device_peak_tflops(s.train.peak_tflops)
    writers = make_writers(workdir, s.train.steps, start_step, is_main)
    throughput = Throughput(flops_per_token, jax.device_count(), peak)
    _log_banner(
        writers.log_line, s, mesh, workdir, start_step, throughput, peak_source, hooks, notes
    )

    run = _Run(
        s=s,
        workdir=workdir,
        config_dict=config_dict,
        exp=exp,
        ckpt=ckpt,
        writers=writers,
        hooks=hooks,
        train_batches=train_batches,
        base_ref=base_ref,
        throughput=throughput,
        guard=BadStepGuard(
            skip=s.train.skip_non_finite,
            abort=s.train.abort_on_nan,
            max_bad_steps=s.train.max_bad_steps,
        ),
        health=RouterHealth(
            dead_expert_logs=s.train.dead_expert_logs,
            max_dropped_fraction=s.train.max_dropped_fraction,
            max_load_cv=s.train.max_load_cv,
            bias_balanced=s.moe.selection == "sigmoid_bias",
            layer_experts=[
                layer_moe_config(kind, s.moe).num_experts
                for kind in s.model.layer_layout
                if kind.moe
            ],
        ),
        stability=RoutingStability(),
        relayout_fn=Relayout(exp.state_shardings),
    )
    final = _run_steps(run, state, start_step, watcher)
    run.close()
    final["step"] = s.train.steps
    final["train/nonfinite_total"] = run.guard.total
    return {k: float(np.asarray(v).mean()) if np.ndim(v) else float(v) for k, v in final.items()}
