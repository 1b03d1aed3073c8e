"""Throughput over a logging interval (moejax/train/mfu.py): tokens/s, TFLOP/s per device and
MFU from the tokens added and the wall time, against the arithmetic on a controlled clock."""

import pytest

from moejax.train import mfu
from moejax.train.writers import TRAINER_CONSOLE_FIELDS, ConsoleProgress


def test_an_interval_without_a_timed_step_reports_no_throughput(monkeypatch):
    """Step 1's interval holds only the compiling step, which is not timed: it logged
    `tok/s 0 | mfu 0` (issue 23 item 5); now it reports nothing, and the next interval the
    tokens over the time since."""
    clock = iter([100.0, 100.5, 102.5, 103.0])  # reset, read (empty: reset), read, reset
    monkeypatch.setattr(mfu.time, "perf_counter", lambda: next(clock))
    t = mfu.Throughput(flops_per_token=1e6, num_devices=2, peak_tflops=0.5)
    assert t.read() == {}
    t.add(4000)
    t.add(4000)
    got = t.read()
    assert got["perf/tokens_per_sec"] == pytest.approx(8000 / 2.0)
    assert got["perf/tflops_per_device"] == pytest.approx(4000 * 1e6 / 2 / 1e12)
    assert got["perf/mfu"] == pytest.approx(got["perf/tflops_per_device"] / 0.5)
    console = ConsoleProgress(10, fields=TRAINER_CONSOLE_FIELDS, interactive=False)
    assert console.summary({"train/loss": 5.6, "train/lr": 0.0}) == "loss 5.6 | lr 0"
