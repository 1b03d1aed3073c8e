"""Command line: `python -m moejax.train --config=configs/X.py[:arg] --workdir=DIR`.

Any field can be overridden: `--config.train.steps=1000 --config.moe.top_k=4`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moejax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
