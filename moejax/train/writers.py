"""Metric writers: a JSONL file, TensorBoard, and a console progress bar.

The trainer calls `write(step, metrics)` once per logging step with a flat
`dict[str, float | np.ndarray]` (jax arrays are fine; they are fetched with `np.asarray`).
Every writer has `write`, `flush` and `close`; `MultiWriter` fans out to several and
`make_writers` builds the standard set for a run:

    {workdir}/metrics.jsonl     one JSON object per logging step, appended across resumes
    {workdir}/tensorboard/      TensorBoard event files
    stdout                      a tqdm bar on a terminal, one plain line per log step otherwise

`workdir` may be a gs:// URL (`moejax.paths`). Only the main process (process 0) writes
files or prints, so a multi-host job logs once.
`read_jsonl` reads the JSONL file back for tests and notebooks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TextIO

import numpy as np
import tqdm

from moejax.paths import as_path, is_remote, join, resolve, write_text

Metrics = Mapping[str, Any]  # name -> float | int | np.ndarray | jax.Array


class MetricWriter(Protocol):
    """What the trainer needs from a writer."""

    def write(self, step: int, metrics: Metrics) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _as_array(name: str, value: Any) -> np.ndarray:
    """A numeric numpy array for one metric, or TypeError naming it."""
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
        return array
    if array.dtype.kind == "V":  # ml_dtypes floats such as bfloat16 from a jax metric.
        try:
            return array.astype(np.float32)
        except (TypeError, ValueError):
            pass
    raise TypeError(
        f"Metric {name!r} has non-numeric value {value!r} (dtype {array.dtype}); "
        f"writers take real numbers and real numeric arrays only."
    )


# --- JSONL ---------------------------------------------------------------------------


class JsonlWriter:
    """Appends `{"step": int, "time": float, **metrics}` as one JSON line per call.

    `time` is Unix time in seconds. Arrays are written as (nested) lists. Non-finite
    values (NaN, +-inf) are written as `null`: JSON has no NaN, and strict readers (jq,
    JavaScript, most JSON libraries outside Python) reject the `NaN` token Python would
    otherwise emit; `null` also keeps a pandas column numeric (it reads as NaN).

    The file is never truncated, so a resumed run adds to the same file (the steps between
    the last checkpoint and a crash then appear twice; the later line is the one that
    matches the resumed run). On a local disk it is opened in append mode and each line is
    flushed as it is written, so `tail -f` and notebooks see it at once.

    In a bucket (`gs://...`), where an object cannot be appended to, the file is one object
    holding every line: its old content is read when the writer starts, and it is rewritten
    whole at most every `upload_every_secs` and at every `flush()` (the trainer flushes at
    each checkpoint, so the object always covers every step up to the latest checkpoint; a
    host lost after that loses only lines of steps the resumed run logs again).
    """

    def __init__(self, path: str | os.PathLike[str], *, upload_every_secs: float = 30.0):
        self.path = resolve(path)
        self.remote = is_remote(self.path)
        self.upload_every_secs = upload_every_secs
        file = as_path(self.path)
        if self.remote:
            old = file.read_text(encoding="utf-8") if file.exists() else ""
            # A last line without its newline (cut short) gets one, as on a local disk.
            self._lines = [old + "\n"] if old and not old.endswith("\n") else [old]
            self._dirty = False
            self._uploaded_at = time.monotonic()
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        # A crash mid-write can leave a last line without its newline; start a fresh
        # line so the first new record is not glued onto it.
        cut_short = False
        if file.exists() and file.stat().length > 0:
            with file.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                cut_short = f.read(1) != b"\n"
        self._file = file.open("a", encoding="utf-8")
        if cut_short:
            self._file.write("\n")

    def write(self, step: int, metrics: Metrics) -> None:
        for reserved in ("step", "time"):
            if reserved in metrics:
                raise ValueError(
                    f"Metric name {reserved!r} is reserved by JsonlWriter for the record's "
                    f"own {reserved}; rename the metric (e.g. 'train/{reserved}')."
                )
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            record[name] = _jsonable(_as_array(name, value).tolist())
        line = json.dumps(record, allow_nan=False) + "\n"
        if not self.remote:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self.upload_every_secs:
            self.flush()

    def flush(self) -> None:
        if not self.remote:
            self._file.flush()
        elif self._dirty:
            self._lines = ["".join(self._lines)]
            write_text(self.path, self._lines[0])
            self._dirty = False
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self._file.close()


def _jsonable(value: Any) -> Any:
    """Replaces non-finite floats with None, recursing into lists."""
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """All records of a JSONL metrics file, in file order.

    Blank lines are skipped. A line that does not parse (a write cut short by a crash)
    is skipped with a warning naming the line, so one damaged line does not hide the
    rest of a run. Non-finite values come back as None.
    """
    records = []
    with as_path(path).open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{number}: skipping unparsable line ({e}).", stacklevel=2)
    return records


# --- TensorBoard ---------------------------------------------------------------------


class TensorBoardWriter:
    """Writes metrics to TensorBoard event files with `tensorboardX`.

    Scalars go to `add_scalar(name, value, step)`. Arrays with at most `max_scalar_array`
    elements (e.g. per-expert load fractions of a small MoE) become one scalar per index
    under `name/i` (`i` indexes the flattened array), so each expert gets its own curve.
    Larger arrays (e.g. 256 experts) become one histogram of their values: hundreds of
    curves per layer make TensorBoard unusable, while the histogram still shows how
    balanced the load is. Non-finite entries are left out of histograms (an array with
    no finite entry is skipped).

    `purge_step`: TensorBoard hides the events with step >= `purge_step` written before
    this writer started. A run resumed from a checkpoint at step `s` passes `s + 1`, so the
    steps the interrupted run logged after that checkpoint do not show twice.

    tensorboardX writes events from a background thread, and its `flush()` only flushes
    what that thread has already written: an event added a moment earlier can still be
    in its queue. Such events reach the file within `flush_secs` (the thread flushes on
    that period) and `close()` writes everything.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        max_scalar_array: int = 16,
        purge_step: int | None = None,
        flush_secs: float = 10.0,
    ):
        from tensorboardX import SummaryWriter  # Imported here: heavy, and files only.

        self.logdir = resolve(logdir)  # tensorboardX writes gs:// through google-cloud-storage
        self.max_scalar_array = max_scalar_array
        # tensorboardX names event files by the second and opens them for writing, so a
        # second writer started within the same second (a quick restart) would overwrite
        # the first file; a nanosecond suffix keeps the names apart and in creation order.
        self._writer = SummaryWriter(
            self.logdir,
            purge_step=purge_step,
            flush_secs=flush_secs,
            filename_suffix=f".{time.time_ns()}",
        )

    def write(self, step: int, metrics: Metrics) -> None:
        step = int(step)
        arrays = {name: _as_array(name, value) for name, value in metrics.items()}
        for name, array in arrays.items():
            if array.ndim == 0:
                self._writer.add_scalar(name, float(array), step)
            elif array.size <= self.max_scalar_array:
                for i, v in enumerate(array.reshape(-1)):
                    self._writer.add_scalar(f"{name}/{i}", float(v), step)
            else:
                finite = array[np.isfinite(array)].astype(np.float64)
                if finite.size:
                    self._writer.add_histogram(name, finite, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --- Console -------------------------------------------------------------------------

DEFAULT_CONSOLE_FIELDS = {"loss": "loss", "tokens_per_sec": "tok/s", "lr": "lr"}
# What the trainer shows: exact names, so evaluation results (logged on their own line by
# the trainer) do not print a second, ambiguous "loss" line.
TRAINER_CONSOLE_FIELDS = {
    "train/loss": "loss",
    "perf/tokens_per_sec": "tok/s",
    "perf/mfu": "mfu",
    "train/lr": "lr",
}


class ConsoleProgress:
    """A progress bar whose postfix shows a few metrics, or plain lines off a terminal.

    On a terminal (`stream.isatty()`), a tqdm bar counts steps and its postfix shows the
    metrics in `fields` (metric name -> short label; a name also matches metrics ending in
    `/name`, so `train/loss` shows as `loss`; the first match wins). Elsewhere (CI logs,
    `make train | tee`) carriage-return redraws would fill the log with partial bars, so
    each `write` prints one plain line instead:

        step 200/1000 (20%) | loss 2.346 | tok/s 12.3k | lr 3.00e-04 | 4.1 steps/s | eta 3m15s

    `log_line` prints a message without breaking the bar. `enabled=False` prints nothing
    (for processes other than 0). `interactive` overrides the terminal detection.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        *,
        fields: Mapping[str, str] = DEFAULT_CONSOLE_FIELDS,
        stream: TextIO | None = None,
        interactive: bool | None = None,
    ):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.enabled = enabled
        self.fields = dict(fields)
        self._stream = stream if stream is not None else sys.stdout
        if interactive is None:
            interactive = bool(getattr(self._stream, "isatty", lambda: False)())
        self.interactive = interactive
        self._start_time = time.monotonic()
        self._bar = None
        if enabled and interactive:
            self._bar = tqdm.tqdm(
                total=self.total_steps,
                initial=self.start_step,
                file=self._stream,
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def summary(self, metrics: Metrics) -> str:
        """The chosen metrics as `label value` pairs, e.g. `loss 2.346 | lr 3.00e-04`."""
        parts = []
        for key, label in self.fields.items():
            for name, value in metrics.items():
                if name == key or name.endswith("/" + key):
                    array = np.asarray(value)
                    if array.ndim == 0:
                        parts.append(f"{label} {_compact(float(array))}")
                    break
        return " | ".join(parts)

    def write(self, step: int, metrics: Metrics) -> None:
        if not self.enabled:
            return
        step = int(step)
        summary = self.summary(metrics)
        if not summary:  # nothing this bar shows (e.g. evaluation results)
            return
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix_str(summary)
            return
        done = step - self.start_step
        elapsed = time.monotonic() - self._start_time
        line = f"step {step}/{self.total_steps}"
        if self.total_steps > 0:
            line += f" ({100 * step / self.total_steps:.0f}%)"
        if summary:
            line += f" | {summary}"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            line += f" | {rate:.3g} steps/s"
            if self.total_steps > step:
                line += f" | eta {_duration((self.total_steps - step) / rate)}"
        self._print(line)

    def log_line(self, message: str) -> None:
        """Prints `message` on its own line, above the bar when there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.tqdm.write(message, file=self._stream)
        else:
            self._print(message)

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

    def flush(self) -> None:
        if self._bar is not None:
            self._bar.refresh()
        elif self.enabled:
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _compact(value: float) -> str:
    """Short human form: 2.346, 3.00e-04, 12.3k, 1.25M."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1e4:
        for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if magnitude >= scale:
                return f"{value / scale:.3g}{suffix}"
    if magnitude < 1e-2:
        return f"{value:.2e}"
    return f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


# --- Fan-out -------------------------------------------------------------------------


class MultiWriter:
    """Sends every call to each writer in order."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers: Sequence[MetricWriter] = list(writers)

    def write(self, step: int, metrics: Metrics) -> None:
        for writer in self.writers:
            writer.write(step, metrics)

    def log_line(self, message: str) -> None:
        """Forwards to the writers that print lines (the console)."""
        for writer in self.writers:
            if hasattr(writer, "log_line"):
                writer.log_line(message)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> MultiWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def make_writers(
    workdir: str | os.PathLike[str],
    total_steps: int,
    start_step: int = 0,
    is_main_process: bool = True,
) -> MultiWriter:
    """The standard writers of a run: `metrics.jsonl`, `tensorboard/` and the console.

    Pass `is_main_process=(jax.process_index() == 0)`; other processes get a writer that
    does nothing, so the trainer can call it unconditionally. A run resumed from the
    checkpoint at `start_step > 0` appends to the JSONL file and hides the TensorBoard
    events the interrupted run wrote after that checkpoint.
    """
    if not is_main_process:
        return MultiWriter([])
    return MultiWriter(
        [
            JsonlWriter(join(workdir, "metrics.jsonl")),
            TensorBoardWriter(
                join(workdir, "tensorboard"),
                purge_step=start_step + 1 if start_step > 0 else None,
            ),
            ConsoleProgress(total_steps, start_step, fields=TRAINER_CONSOLE_FIELDS),
        ]
    )
