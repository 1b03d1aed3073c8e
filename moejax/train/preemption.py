"""Preemption: SIGTERM (the usual notice before a job is evicted) -> final checkpoint -> exit.

`PreemptionWatcher` is a context manager around the training loop. On a single-process run
it installs a SIGTERM handler that only records the signal; the loop asks
`should_stop(step)` after each step, and the trainer then saves that step (forced, whatever
`train.checkpoint_every` says), waits for the save to be on disk and raises `Preempted`.
`python -m moejax.train` turns that into exit status 128 + 15 = 143, the status of a process
ended by SIGTERM, so a scheduler sees an interrupted job, not a finished one; rerunning the
same command resumes from the saved step and loses nothing.

On a multi-process job the hosts must stop at the same step. JAX's preemption service
(started by `jax.distributed.initialize`) catches the signal on whichever host gets it and
agrees on a step with the others; `should_stop` then asks
`multihost_utils.reached_preemption_sync_point(step)` on every host, every step, and this
class installs no handler of its own (it would replace JAX's).

The previous handler is restored on exit. Handlers can only be installed from the main
thread; elsewhere (a notebook worker thread) the watcher watches nothing and says so.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preempted(Exception):
    """The run stopped on a preemption notice after saving `step`."""

    def __init__(self, step: int, signum: int, message: str):
        super().__init__(message)
        self.step = step
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's status for a process ended by that signal."""
        return 128 + self.signum


class PreemptionWatcher:
    """Records SIGTERM during the `with` block; `should_stop(step)` polls it."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.received: int | None = None
        self.multi_process = jax.process_count() > 1
        self.active = False
        self._previous = None

    def _handler(self, signum, frame):
        self.received = signum

    def __enter__(self) -> "PreemptionWatcher":
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)
            self.active = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active:
            signal.signal(self.signum, self._previous)
            self.active = False

    @property
    def watching(self) -> bool:
        return self.active or self.multi_process

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint `step` and stop (every host gets the same answer)."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.signum
                return True
            return False
        return self.received is not None
