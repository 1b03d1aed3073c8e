"""Metric writers: JSONL round trip and append, TensorBoard events, console output."""

import io
import math
import os
import struct
import time

import ml_dtypes
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moejax.train.writers import (
    ConsoleProgress,
    JsonlWriter,
    MultiWriter,
    TensorBoardWriter,
    make_writers,
    read_jsonl,
)


def read_events(logdir) -> list[event_pb2.Event]:
    """Parses TFRecord event files: [len u64][crc u32][Event proto][crc u32] per record."""
    events = []
    for name in sorted(os.listdir(logdir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


def scalars(events) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for event in events:
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def histogram_tags(events) -> set[str]:
    return {
        value.tag
        for event in events
        for value in event.summary.value
        if value.WhichOneof("value") == "histo"
    }


# --- JSONL ---------------------------------------------------------------------------


def test_jsonl_lines_parse_back_to_the_written_numbers(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    before = time.time()
    writer = JsonlWriter(path)
    writer.write(
        3,
        {
            "loss": 2.5,
            "lr": np.float32(3e-4),
            "tokens": np.int64(4096),
            "bf16": np.asarray(1.5, ml_dtypes.bfloat16),
            "expert_load": np.array([0.25, 0.75]),
            "layer_load": np.array([[0.5, np.nan], [np.inf, 1.0]]),
            "diverged": float("nan"),
        },
    )
    writer.close()

    (record,) = read_jsonl(path)
    assert record["step"] == 3
    assert before <= record["time"] <= time.time()
    assert record["loss"] == 2.5
    assert math.isclose(record["lr"], 3e-4, rel_tol=1e-6)
    assert record["tokens"] == 4096 and isinstance(record["tokens"], int)
    assert record["bf16"] == 1.5
    assert record["expert_load"] == [0.25, 0.75]
    assert record["layer_load"] == [[0.5, None], [None, 1.0]]  # Non-finite -> null.
    assert record["diverged"] is None
    assert "NaN" not in path.read_text()  # Strict JSON only.


def test_jsonl_appends_across_writer_instances(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = JsonlWriter(path)
    first.write(1, {"loss": 3.0})
    first.write(2, {"loss": 2.0})
    first.close()
    second = JsonlWriter(path)  # A resumed run.
    second.write(3, {"loss": 1.0})
    second.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_jsonl_recovers_from_a_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0.0, "loss": 3.0}\n{"step": 2, "ti')
    writer = JsonlWriter(path)
    writer.write(2, {"loss": 2.0})
    writer.close()
    with pytest.warns(UserWarning, match="metrics.jsonl:2"):
        records = read_jsonl(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 3.0), (2, 2.0)]


def test_jsonl_rejects_reserved_and_non_numeric_metrics(tmp_path):
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="'step' is reserved"):
        writer.write(1, {"step": 1.0})
    with pytest.raises(TypeError, match="'name'"):
        writer.write(1, {"name": "abc"})
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


# --- TensorBoard ---------------------------------------------------------------------


def test_tensorboard_event_file_contains_the_scalars(tmp_path):
    logdir = tmp_path / "tensorboard"
    writer = TensorBoardWriter(logdir, max_scalar_array=4)
    for step in (1, 2, 3):
        writer.write(
            step,
            {
                "train/loss": 4.0 / step,
                "moe/load": np.array([0.25, 0.75]),
                "moe/load_many": np.linspace(0.0, 1.0, 32),
                "all_nan": np.full(8, np.nan),
            },
        )
    writer.close()
    events = read_events(logdir)
    values = scalars(events)
    assert values["train/loss"] == pytest.approx({1: 4.0, 2: 2.0, 3: 4.0 / 3})
    assert values["moe/load/0"] == pytest.approx({1: 0.25, 2: 0.25, 3: 0.25})
    assert values["moe/load/1"] == pytest.approx({1: 0.75, 2: 0.75, 3: 0.75})
    assert histogram_tags(events) == {"moe/load_many"}
    assert "all_nan" not in values


def test_tensorboard_flush_reaches_disk_while_the_writer_is_open(tmp_path):
    logdir = tmp_path / "tensorboard"
    writer = TensorBoardWriter(logdir, flush_secs=0.2)
    writer.write(7, {"loss": 1.5})
    deadline = time.monotonic() + 10
    while scalars(read_events(logdir)).get("loss") != {7: 1.5}:
        assert time.monotonic() < deadline, "the scalar never reached the event file"
        time.sleep(0.05)
        writer.flush()
    writer.close()


def test_tensorboard_resume_appends_a_new_event_file_with_a_purge_marker(tmp_path):
    logdir = tmp_path / "tensorboard"
    first = TensorBoardWriter(logdir)
    first.write(5, {"loss": 2.0})
    first.close()
    size = sum(os.path.getsize(logdir / name) for name in os.listdir(logdir))
    resumed = TensorBoardWriter(logdir, purge_step=3)  # Resumed from a checkpoint at 2.
    resumed.write(3, {"loss": 1.0})
    resumed.close()
    assert sum(os.path.getsize(logdir / name) for name in os.listdir(logdir)) > size
    events = read_events(logdir)
    assert any(e.step == 3 and e.session_log.status == e.session_log.START for e in events)
    assert scalars(events)["loss"] == {5: 2.0, 3: 1.0}


# --- Console -------------------------------------------------------------------------


def test_console_prints_plain_lines_when_not_a_terminal(capsys):
    console = ConsoleProgress(total_steps=100, start_step=0)
    assert not console.interactive  # pytest's captured stdout is not a TTY.
    console.write(10, {"train/loss": 2.34567, "tokens_per_sec": 12345.0, "lr": 3e-4})
    console.log_line("eval loss 2.1")
    console.write(20, {"train/loss": 2.0, "expert_load": np.ones(4)})
    console.close()

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("step 10/100 (10%) | loss 2.346 | tok/s 12.3k | lr 3.00e-04")
    assert lines[1] == "eval loss 2.1"
    assert lines[2].startswith("step 20/100 (20%) | loss 2")
    assert "\r" not in out


def test_console_bar_on_a_terminal_shows_the_metrics():
    stream = io.StringIO()
    console = ConsoleProgress(total_steps=50, start_step=10, stream=stream, interactive=True)
    console.write(20, {"loss": 1.2345, "lr": 1e-3})
    console.log_line("checkpoint saved at step 20")
    console.close()
    out = stream.getvalue()
    assert "20/50" in out
    assert "loss 1.234" in out and "lr 1.00e-03" in out
    assert "checkpoint saved at step 20\n" in out


def test_console_disabled_prints_nothing(capsys):
    console = ConsoleProgress(total_steps=10, enabled=False)
    console.write(1, {"loss": 1.0})
    console.log_line("hidden")
    console.close()
    assert capsys.readouterr().out == ""


# --- Fan-out -------------------------------------------------------------------------


def test_make_writers_writes_every_sink_on_the_main_process(tmp_path, capsys):
    writers = make_writers(tmp_path, total_steps=100, start_step=0, is_main_process=True)
    assert isinstance(writers, MultiWriter)
    writers.write(5, {"train/loss": 2.5})
    writers.write(6, {"eval/loss": 1.125})  # evaluation: files only, the trainer prints it
    writers.log_line("hello")
    writers.close()

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("train/loss"), r.get("eval/loss")) for r in rows] == [
        (5, 2.5, None),
        (6, None, 1.125),
    ]
    assert scalars(read_events(tmp_path / "tensorboard"))["train/loss"] == {5: 2.5}
    out = capsys.readouterr().out
    # The eval value is not printed (1.125: no steps/s or eta figure can contain it).
    assert "loss 2.5" in out and "hello" in out and "1.125" not in out


def test_make_writers_on_other_processes_writes_nothing(tmp_path, capsys):
    writers = make_writers(tmp_path / "run", total_steps=100, start_step=0, is_main_process=False)
    writers.write(5, {"loss": 2.5})
    writers.log_line("hello")
    writers.flush()
    writers.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""
