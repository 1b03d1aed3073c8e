"""Numerical faults: skipping non-finite updates, stopping after too many, and test hooks.

Inside the jitted step (`moejax.train.step.train_step`):

    finite = isfinite(loss) and every gradient entry is finite          (one fused reduction)
    params', opt_state' = where(finite, updated, previous)               (optax.apply_if_finite
                                                                          style, no host sync)

so a non-finite step leaves the parameters and the optimizer state (Adam moments and count)
exactly as they were; `state.step` still advances, because the batch was consumed. As in
`optax.apply_if_finite`, the optimizer's own count, which drives the learning-rate schedule,
does not advance: the schedule continues where it was. The step reports `nonfinite` (0. or
1.) in its metrics.

On the host, `BadStepGuard` reads those flags only where the trainer already synchronises
(logging and checkpoint steps), counts skipped steps, and decides when to stop: after
`train.max_bad_steps` consecutive non-finite steps when skipping, at the first one when
`train.skip_non_finite=False` (the parameters are then non-finite themselves). The trainer
never checkpoints a step that was non-finite, so a stopped run keeps its last good checkpoint.

Testing hooks (environment variables read by the trainer; nothing in a config enables them):

    MOEJAX_FAULT_NAN_STEPS=3,4,7      poison the batch of these steps (1-based): its loss mask
                                      becomes NaN on the host, so the step computes a NaN loss
                                      and NaN gradients, as after an overflow (the compiled step
                                      is the same program as in a normal run)
    MOEJAX_FAULT_KILL_IN_SAVE=8       SIGKILL the process right after the asynchronous save
                                      of step 8 has started (its files half-written)

`experiments/faults.py` and `tests/train/test_faults.py` use them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from moejax.paths import as_path

NAN_STEPS_ENV = "MOEJAX_FAULT_NAN_STEPS"
KILL_IN_SAVE_ENV = "MOEJAX_FAULT_KILL_IN_SAVE"


# --- Inside the jitted step ------------------------------------------------------------


def all_finite(loss: jax.Array, grads: Any) -> jax.Array:
    """True when the loss and every gradient entry are finite (a scalar bool)."""
    ok = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        ok = ok & jnp.all(jnp.isfinite(g))
    return ok


def keep_if_finite(finite: jax.Array, updated: Any, previous: Any) -> Any:
    """`updated` where `finite`, else `previous`, leaf by leaf (a select, not a branch)."""
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)


# --- Testing hooks read from the environment ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaultHooks:
    """The testing hooks of the module docstring; empty unless their variables are set."""

    nan_steps: tuple[int, ...] = ()
    kill_in_save_step: int | None = None

    @classmethod
    def from_env(cls, environ=None) -> "FaultHooks":
        environ = os.environ if environ is None else environ
        nan = environ.get(NAN_STEPS_ENV, "").strip()
        kill = environ.get(KILL_IN_SAVE_ENV, "").strip()
        try:
            nan_steps = tuple(sorted({int(s) for s in nan.split(",") if s.strip()}))
            kill_step = int(kill) if kill else None
        except ValueError:
            raise ValueError(
                f"{NAN_STEPS_ENV}={nan!r} / {KILL_IN_SAVE_ENV}={kill!r}: these testing hooks "
                f"take step numbers (e.g. {NAN_STEPS_ENV}=3,4); unset them for a normal "
                f"run."
            ) from None
        return cls(nan_steps, kill_step)

    def describe(self) -> str:
        parts = []
        if self.nan_steps:
            parts.append(f"NaN batches at steps {list(self.nan_steps)}")
        if self.kill_in_save_step is not None:
            parts.append(f"SIGKILL during the save of step {self.kill_in_save_step}")
        return "; ".join(parts)

    def poison(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` with a NaN loss mask if the hook names `step`, else `batch` itself."""
        if step not in self.nan_steps:
            return batch
        return {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan, np.float32)}

    def after_save_started(self, step: int) -> None:
        """Kills this process (SIGKILL: no cleanup, no flush) if the hook names `step`."""
        if self.kill_in_save_step == step:
            os.kill(os.getpid(), signal.SIGKILL)


# --- On the host -----------------------------------------------------------------------


class NonFiniteError(FloatingPointError):
    """The run stopped on non-finite losses or gradients; the message says what to do."""


class BadStepGuard:
    """Counts non-finite steps from the per-step `nonfinite` flags and decides when to stop.

    `observe(step, nonfinite, loss)` must see each step once, in order; it returns the stop
    reason (a message without the checkpoint part) or None. `streak` is the number of
    consecutive non-finite steps ending at the last observed one.
    """

    def __init__(self, *, skip: bool, abort: bool, max_bad_steps: int):
        self.skip = skip
        self.abort = abort
        self.max_bad_steps = max_bad_steps if skip else 1
        self.total = 0  # non-finite steps so far in this process
        self.streak = 0
        self.streak_losses: list[float] = []
        self.last_observed = 0

    def observe(self, step: int, nonfinite: bool, loss: float) -> str | None:
        if step <= self.last_observed:
            return None
        self.last_observed = step
        if not nonfinite:
            self.streak, self.streak_losses = 0, []
            return None
        self.total += 1
        self.streak += 1
        self.streak_losses.append(loss)
        if not self.abort or self.streak < self.max_bad_steps:
            return None
        first = step - self.streak + 1
        losses = [float(x) for x in self.streak_losses]
        if self.skip:
            return (
                f"{self.streak} consecutive non-finite steps ({first} to {step}, losses "
                f"{losses}; train.max_bad_steps={self.max_bad_steps}): their updates were "
                f"skipped and the run stops here"
            )
        return (
            f"non-finite loss or gradients at step {step} (loss {losses[-1]}) and "
            f"train.skip_non_finite=False, so the parameters are no longer finite"
        )

    def observe_all(
        self, steps: Sequence[int], flags: Sequence[Any], losses: Sequence[Any]
    ) -> str | None:
        """`observe` over a list of steps; returns the first stop reason."""
        for step, flag, loss in zip(steps, flags, losses):
            reason = self.observe(int(step), bool(np.asarray(flag) > 0), float(loss))
            if reason:
                return reason
        return None

    def stop_message(self, reason: str, latest_checkpoint: int | None, workdir: str) -> str:
        kept = (
            f"The last good checkpoint, step {latest_checkpoint}, is kept in {workdir}; "
            f"rerunning the same command resumes from it"
            if latest_checkpoint is not None
            else "No checkpoint was written yet"
        )
        return (
            f"{reason}. {kept}. Lower train.learning_rate, enable train.grad_clip, or "
            f"inspect the batches of those steps."
        )


# --- Checkpoint damage, for the fault tests and experiments/faults.py ---------------------


def _truncate(path: epath.Path) -> None:
    """Cuts the file to half its length (one object rewritten, in a bucket)."""
    path.write_bytes(path.read_bytes()[: path.stat().length // 2])


# name -> function damaging one checkpoint step directory (a local path or a gs:// URL) in a
# way restore must detect.
CHECKPOINT_CORRUPTIONS = {
    "truncated arrays": lambda d: [_truncate(p) for p in as_path(d).glob("state/d/*")],
    "deleted manifest": lambda d: (as_path(d) / "state" / "manifest.ocdbt").unlink(),
    "truncated tree metadata": lambda d: _truncate(as_path(d) / "state" / "_METADATA"),
    "truncated data json": lambda d: _truncate(as_path(d) / "data" / "metadata"),
}
