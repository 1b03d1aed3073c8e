"""Checks that run before anything is compiled, each failing with the problem and the fix.

`train()` calls these after `validate(config)` and before building the model:

  - `check_workdir`: the run directory (a local path or a gs:// URL, `moejax.paths`) can be
    created and written (a probe file is written and removed; nothing else is touched);
  - `check_resume_config`: a workdir holding checkpoints is resumed with the same model
    (its `config.json` read in today's field names, `moejax.config.renames`);
  - `open_train_data`: the tokenizer and every source open (a missing file, column or
    prepared dataset raises the source's `DataError`, which names the `data.*` field and the
    command that prepares it), their held-out parts too when evaluation is on, and the token
    ids of the first batch fit `model.vocab_size`;
  - `resume_data`: a restored data-iterator state matches this config's data settings.

A checkpoint whose arrays do not match the model (shape mismatch) is caught by the
Checkpointer's restore, which compares shapes from the checkpoint's metadata before reading
any array; `python -m moejax.train` prints these errors as one message.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from moejax.config.pod_data import prepare_command
from moejax.config.renames import apply_renames
from moejax.config.validation import vocabulary_error
from moejax.config_section import ConfigError
from moejax.data import (
    Batches,
    DataError,
    check_evaluation_sources,
    make_batches,
    open_tokenizer,
)
from moejax.paths import as_path, is_remote, resolve


class WorkdirError(RuntimeError):
    """The run directory cannot be created or written."""


def check_workdir(workdir: str) -> str:
    """Creates `workdir` if needed and proves it writable; returns its full name (a local
    path made absolute, a gs:// URL as given). Every process probes with its own file, since
    every process writes its shards of each checkpoint."""
    path = resolve(workdir)
    probe = as_path(path) / f".moejax-write-test-{jax.process_index()}-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # OSError locally; gcsfs and google-auth raise their own types
        if is_remote(path):
            fix = (
                f"Check that the bucket exists (`gcloud storage ls {path}`) and that this "
                f"machine's service account may create objects in it"
            )
        else:
            fix = (
                f"Pass a --workdir on a writable disk with free space, or fix the "
                f"permissions of {path}"
            )
        cause = getattr(e, "strerror", None) or e
        raise WorkdirError(
            f"--workdir={workdir!r} cannot be written ({type(e).__name__}: {cause}). "
            f"{fix}; nothing was started."
        ) from e
    return path


def check_resume_config(workdir: str, config_dict: dict) -> None:
    """A workdir with checkpoints must be resumed with the same model; anything else would
    fail deep inside the restore or, worse, silently train a different model."""
    path = as_path(workdir) / "config.json"
    if not path.exists() or not (as_path(workdir) / "checkpoints").is_dir():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} cannot be read ({e}), so this workdir's run cannot be checked against "
            f"the config. Restore that file from a copy, or pass a new --workdir."
        ) from e
    saved = apply_renames(saved, source=str(path))  # a run written with older field names
    for section in ("model", "moe"):
        for key, value in config_dict[section].items():
            old = saved.get(section, {}).get(key)
            if old is not None and json.dumps(old) != json.dumps(value):
                raise ConfigError(
                    f"{workdir} holds checkpoints of a run with {section}.{key}={old!r}, but "
                    f"this config has {value!r}. Resume with the same {section} settings, or "
                    f"pass a new --workdir to start a separate run (nothing was changed)."
                )


def check_vocabulary(batch: dict[str, np.ndarray], vocab_size: int, sources: str) -> None:
    """Every input and target id of `batch` must be < `vocab_size` (the embedding rows);
    pre-tokenized sources (array_record) can hold ids the tokenizer does not have."""
    largest = int(max(np.max(batch["inputs"]), np.max(batch["targets"])))
    if largest >= vocab_size:
        raise DataError(
            f"data.sources={sources!r} produces token id {largest}, but model.vocab_size="
            f"{vocab_size} has ids 0..{vocab_size - 1}. Set --config.model.vocab_size to at "
            f"least {largest + 1}, or read sources tokenized with data.tokenizer."
        )


def check_tokenizer(s) -> None:
    """`data.tokenizer` loads and its ids fit `model.vocab_size` (validation checks the byte
    tokenizer; one read from a file is checked here, on the machine that trains)."""
    try:
        size = open_tokenizer(s.data).vocab_size
    except DataError as e:
        command = prepare_command(s.data.tokenizer)
        if command is None:
            raise
        raise DataError(f"{e} For this config: {command}") from None
    if s.model.vocab_size < size:
        raise ConfigError(vocabulary_error(s.model.vocab_size, s.data.tokenizer, size))


def open_train_data(s) -> Batches:
    """This process's training iterator, after checking the tokenizer, the sources and the
    vocabulary."""
    check_tokenizer(s)
    batches = make_batches(s.data, s.data.train_split)  # opens every training source
    if s.train.eval_every:
        check_evaluation_sources(s.data)  # fail now, not at the first evaluation
    # Peek at the first batch without consuming it: the iterator state is a few ints.
    start = batches.get_state()
    check_vocabulary(next(batches), s.model.vocab_size, s.data.sources)
    batches.set_state(start)
    return batches


def resume_data(batches: Batches, data_state: dict | None, checkpoint_step: int) -> None:
    """Moves `batches` to a restored iterator state, naming the data settings that differ."""
    if data_state is None:
        raise ConfigError(
            f"checkpoint step {checkpoint_step} has no data-iterator state, so the run cannot "
            f"continue with the batches it would have seen. Resume from a checkpoint written "
            f"by moejax.train, or pass a new --workdir."
        )
    try:
        batches.set_state(data_state)
    except ValueError as e:
        raise ConfigError(f"checkpoint step {checkpoint_step}: {e}") from e
