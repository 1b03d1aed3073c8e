r"""Multi-host runs: `jax.distributed.initialize` from flags or the environment, and the
data-iterator state of every process in one checkpoint.

One process per host (or per GPU), each started with the same command plus its index:

    python -m moejax.train --config=... --workdir=/shared/run \
        --coordinator=host0:1234 --num_processes=2 --process_id=0     # on host 0
    python -m moejax.train ... --coordinator=host0:1234 --num_processes=2 --process_id=1

or with the environment variables MOEJAX_COORDINATOR (or JAX_COORDINATOR_ADDRESS),
MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID. On TPU pods and SLURM/Open MPI clusters JAX
finds all three itself: set MOEJAX_DISTRIBUTED=1 (or pass `--distributed`) to initialise
with auto-detection. Each process feeds its own share of every batch (`moejax.data`), only
process 0 writes logs and metrics, and orbax writes the checkpoint from all of them.

On CPU the cross-process collectives go through gloo
(`jax_cpu_collectives_implementation`), which must be set before initialisation; it is
harmless on GPU and TPU, whose collectives do not use it.

Losing a host. JAX's coordination service (on process 0) expects a heartbeat from every
process; one silent for `--heartbeat_timeout` seconds (MOEJAX_HEARTBEAT_TIMEOUT, default 100,
JAX's) is declared dead and every other process is terminated with JAX's fatal error
"Terminating process because the JAX distributed service detected fatal errors ... another
task died" (a C++ abort, exit status 134), so a survivor never waits forever in a collective.
SIGTERM to any one process is handled by JAX's preemption sync point (`preemption.py`): all
save the same step and exit 143. A process that cannot reach `--coordinator` at start gets
`CoordinatorUnreachable` naming the address after `--init_timeout` seconds (default 300)
instead of JAX's abort. In every case rerunning the same commands resumes from the newest
complete checkpoint (`experiments/faults.py`'s `mh_*` scenarios).
"""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np

from moejax.config_section import ConfigError

ENV_COORDINATOR = ("MOEJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("MOEJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("MOEJAX_PROCESS_ID", "JAX_PROCESS_ID")
ENV_HEARTBEAT = ("MOEJAX_HEARTBEAT_TIMEOUT",)
ENV_INIT_TIMEOUT = ("MOEJAX_INIT_TIMEOUT",)
DEFAULT_HEARTBEAT_TIMEOUT = 100  # s, jax.distributed's default
DEFAULT_INIT_TIMEOUT = 300  # s, likewise
COMPILE_BARRIER_S = 3600  # s: how long processes wait for each other's first compile


class CoordinatorUnreachable(ConfigError):
    """A process could not join the job: the coordinator's address is wrong or unreachable."""


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _as_int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={value!r} must be an integer.") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    heartbeat_timeout: int | None = None,
    init_timeout: int | None = None,
) -> bool:
    """Joins a multi-process job when asked (arguments first, then the environment);
    returns whether it did. With nothing given (and `auto` False) it is a no-op.

    `heartbeat_timeout` (MOEJAX_HEARTBEAT_TIMEOUT, default 100 s, JAX's): a process that
    sends no heartbeat for that long is declared dead and every other process is stopped
    (see "Losing a host" above). `init_timeout` (MOEJAX_INIT_TIMEOUT, default 300 s): how
    long to keep trying to reach the coordinator before `CoordinatorUnreachable`."""
    coordinator = coordinator or _env(ENV_COORDINATOR)
    num_processes = _as_int(
        num_processes if num_processes is not None else _env(ENV_NUM_PROCESSES), "--num_processes"
    )
    process_id = _as_int(
        process_id if process_id is not None else _env(ENV_PROCESS_ID), "--process_id"
    )
    auto = auto or os.environ.get("MOEJAX_DISTRIBUTED", "") not in ("", "0")
    if not (coordinator or num_processes or process_id is not None or auto):
        return False
    if not auto:
        missing = [
            name
            for name, v in (
                ("--coordinator", coordinator),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            )
            if v is None
        ]
        if missing:
            raise ConfigError(
                f"a multi-process run needs --coordinator, --num_processes and --process_id "
                f"(or MOEJAX_COORDINATOR, MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID); missing "
                f"{', '.join(missing)}. On TPU pods and SLURM use --distributed instead."
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
            )
    heartbeat_timeout = _as_int(
        heartbeat_timeout if heartbeat_timeout is not None else _env(ENV_HEARTBEAT),
        "--heartbeat_timeout",
    )
    init_timeout = _as_int(
        init_timeout if init_timeout is not None else _env(ENV_INIT_TIMEOUT), "--init_timeout"
    )
    try:  # a JAX whose CPU collectives need no choice may not have the option
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    timeouts = {
        "heartbeat_timeout_seconds": heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT,
        "initialization_timeout": init_timeout or DEFAULT_INIT_TIMEOUT,
    }
    if process_id is not None and process_id != 0 and coordinator:
        # JAX aborts the process (a C++ fatal error blaming "another task") when it cannot
        # register with the coordinator; reaching its port first gives the real reason.
        _wait_for_coordinator(coordinator, process_id, timeouts["initialization_timeout"])
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        **timeouts,
    )
    return True


def _wait_for_coordinator(address: str, process_id: int, timeout: float) -> None:
    """Retries a TCP connection to `address` until it succeeds or `timeout` s have passed
    (process 0 may start after this one); raises CoordinatorUnreachable."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline or isinstance(e, ValueError):
                raise CoordinatorUnreachable(
                    f"process {process_id} could not reach the coordinator at --coordinator="
                    f"{address} within --init_timeout={timeout:g} s ({type(e).__name__}: {e}). "
                    f"Start process 0 with the same --coordinator (its host's address and a "
                    f"free port), check that this host can reach it (firewall, hostname), "
                    f"or raise --init_timeout; nothing was started."
                ) from e
        time.sleep(0.5)


def compile_together(step_fn, *args, timeout_s: int = COMPILE_BARRIER_S) -> None:
    """Multi-process: compiles `step_fn` for `args` before its first call, then waits until
    every process has (a barrier of the coordination service, not a collective). Without it
    a process that compiles faster runs the step first, and on CPU gloo gives up after 30 s
    waiting for the others to join its first collective. A no-op for one process; the
    call that follows reuses the compiled executable."""
    if jax.process_count() == 1:
        return
    step_fn.lower(*args).compile()
    # jax.distributed's client: its barrier has no public wrapper (multihost_utils' is a
    # collective, which is what must wait here).
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(
        "moejax-first-step-compiled", timeout_in_ms=timeout_s * 1000
    )


def gather_data_states(state: dict) -> dict:
    """Every process's iterator state in one JSON dict (all processes must call it): orbax
    writes JSON items from process 0 only, so each process's own position travels inside."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return {"per_process": [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]}


def local_data_state(state: dict | None) -> dict | None:
    """This process's iterator state out of `gather_data_states`' dict (or a plain state)."""
    if state is None or "per_process" not in state:
        return state
    per_process = state["per_process"]
    if len(per_process) != jax.process_count():
        raise ConfigError(
            f"the checkpoint holds the data positions of {len(per_process)} processes but "
            f"this run has {jax.process_count()}; resume with the same number of processes "
            f"(the mesh shape may change)."
        )
    return per_process[jax.process_index()]
