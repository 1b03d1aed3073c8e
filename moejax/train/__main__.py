"""Command line: `python -m moejax.train --config=configs/X.py[:arg] --workdir=DIR`.

Multi-host: add `--coordinator=HOST:PORT --num_processes=N --process_id=I` to each
process's command (or set MOEJAX_COORDINATOR etc.; `--distributed` on TPU pods and SLURM
lets JAX find them); see moejax/train/distributed.py.

Any field can be overridden: `--config.train.steps=1000 --config.moe.top_k=4`; old field
spellings (e.g. `--config.moe.router=gru`) are read with a warning that names the new fields
(moejax.config.renames).

Exit status: 0 when the run reached `train.steps`; 1 with one message on stderr when an
input is wrong (config, workdir, dataset, checkpoint) or the run stopped on non-finite
steps; 143 (128 + SIGTERM) after a preemption notice, once the final checkpoint is saved.
Rerunning the same command resumes from the latest complete checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax.config.base import default_config
from moejax.config_section import ConfigError, unknown_names
from moejax.data import DataError
from moejax.train.checkpoint import CheckpointError
from moejax.train.distributed import initialize
from moejax.train.faults import NonFiniteError
from moejax.train.loop import train
from moejax.train.preemption import Preempted
from moejax.train.preflight import WorkdirError

# Overrides may name fields the config does not have: an old spelling such as
# --config.moe.router=gru is read by moejax.config.renames, and any other unknown field is
# refused by validate() with the list of valid ones.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/*.py[:arg]).",
    lock_config=False,
    accept_new_attributes=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed with auto-detection (TPU, SLURM)."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    None,
    "Seconds without a heartbeat after which a process counts as lost and the job stops "
    "(default 100; MOEJAX_HEARTBEAT_TIMEOUT).",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout",
    None,
    "Seconds to keep trying to reach --coordinator at start (default 300; MOEJAX_INIT_TIMEOUT).",
)
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message names the problem and the fix: printed alone, without a traceback.
_EXPLAINED = (ConfigError, DataError, CheckpointError, WorkdirError, NonFiniteError)


def override_path_problem(argv: list[str]) -> str | None:
    """The first `--config.a.b=...` override whose path leaves the config tree (a section
    that does not exist, a field used as a section), as one line naming the valid names;
    None when every path is fine. The last name of a path may be unknown here: renamed
    fields are read by moejax.config.renames, and validate() names any other."""
    tree = default_config().to_dict()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        flag = arg.split("=", 1)[0]
        parts = flag[len("--config.") :].split(".")
        node, where = tree, "config"
        for part in parts[:-1]:
            if not isinstance(node, dict):
                return f"{flag}: {where} is a field, not a section; set it as --{where}=VALUE"
            if part not in node:
                kind = "section" if where == "config" else "field"
                return (
                    f"{flag}: {where} has no {kind} {unknown_names([part], list(node))[1:-1]}; "
                    f"valid {kind}s are {sorted(node)}"
                )
            node, where = node[part], f"{where}.{part}"
        if not isinstance(node, dict):
            return f"{flag}: {where} is a field, not a section; set it as --{where}=VALUE"
    return None


def _fail(message: str) -> None:
    print(f"moejax: error: {message} (--helpshort lists the flags)", file=sys.stderr, flush=True)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag (a config file that raises for its `:arg`, a
    missing --workdir, an override path that is not in the config) reported as one line and
    exit status 1, not a flags-parsing dump or a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file's own error is the last line of the traceback ml_collections quotes.
        problem = lines[-1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        where = lines[0].split(": Error whilst parsing", 1)[0] if len(lines) > 1 else ""
        _fail(f"{where}: {problem}" if where and where != problem else problem)
    except (KeyError, AttributeError) as e:  # ml_collections walking an override's path
        _fail(override_path_problem(argv) or f"{type(e).__name__}: {e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            auto=_DISTRIBUTED.value,
            heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
            init_timeout=_INIT_TIMEOUT.value,
        )
        train(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        print(f"moejax: stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except _EXPLAINED as e:
        print(f"moejax: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
