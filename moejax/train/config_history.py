"""The configs a run was started with: what changed at each resume, kept in the workdir, and
the step from which a changed learning-rate schedule applies.

A run directory holds

    config.json                    the config of the latest start (rewritten when a resume
                                   changes it, so it always describes what trains now)
    config_history/step_{S}.json   one per start that changed the config: {"step": S,
                                   "schedule_start", "changed": {field: [old, new]},
                                   "config": the full config}; S = 0 for the first start

`plan_resume(workdir, config_dict, train, ckpt)` runs before the experiment is built: it compares
the config with the checkpointed run's (the `extra` config of the checkpoint the run
resumes from, else `config.json`) and finds `schedule_start`, the step from which
`train.resume_lr` applies (`moejax/train/optimizer.py`): the resume step when a schedule
field (`SCHEDULE_FIELDS`) changed, else the start of the segment the checkpointed run was
in (from the history), so a second resume with the same flags does not warm up again.
`ResumePlan.record` runs once the state is restored: it reports each difference and the
learning rate the next step runs at, and writes the history entry (and `config.json` at a
resume that changed the config; the trainer writes it at step 0).
Model and moe changes never get here: `preflight.check_resume_config` refuses them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from etils import epath

from moejax.config.renames import apply_renames
from moejax.config.train import TrainConfig
from moejax.train.optimizer import describe_schedule

HISTORY_DIR = "config_history"
CONFIG_JSON = "config.json"
# The fields the learning rate of a step depends on: a change starts a new segment.
SCHEDULE_FIELDS = (
    "train.learning_rate",
    "train.warmup_steps",
    "train.steps",
    "train.min_lr_ratio",
    "train.resume_lr",
)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"steps": 3}}` -> `{"train.steps": 3}` (lists and tuples are leaves)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _same(a: Any, b: Any) -> bool:
    # JSON forms: a tuple in memory and the list a checkpoint's JSON holds compare equal.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """`{dotted field: [old, new]}` for every field whose value differs (None: absent)."""
    before, after = flatten(old), flatten(new)
    return {
        name: [before.get(name), after.get(name)]
        for name in sorted(set(before) | set(after))
        if not _same(before.get(name), after.get(name))
    }


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def history(workdir: str | epath.Path) -> list[dict]:
    """The history entries of a run directory, by step (empty without any)."""
    directory = epath.Path(workdir) / HISTORY_DIR
    if not directory.exists():
        return []
    entries = [_read_json(p) for p in directory.glob("step_*.json")]
    return sorted((e for e in entries if isinstance(e, dict)), key=lambda e: e["step"])


def _checkpointed_config(workdir: epath.Path, ckpt, step: int) -> tuple[dict | None, str]:
    """The config that wrote checkpoint `step` (its `extra`), else `config.json`; with where
    it came from. A damaged checkpoint is reported by the restore that follows, not here."""
    try:
        extra = ckpt.read_extra(step) or {}
    except Exception:  # noqa: BLE001 - the restore names the damaged step
        extra = {}
    if isinstance(extra.get("config"), dict):
        return extra["config"], f"checkpoint step {step}"
    saved = _read_json(workdir / CONFIG_JSON)
    return (saved if isinstance(saved, dict) else None), str(workdir / CONFIG_JSON)


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """How this start relates to the run in its workdir (see the module docstring)."""

    workdir: epath.Path
    config: dict  # this start's config (renames applied, vocab_size filled in)
    train: TrainConfig  # its validated train section
    step: int  # the checkpoint step it resumes from; 0 for a fresh or converted run
    changes: dict[str, list]  # vs the checkpointed run's config; {} when step is 0
    previous_source: str  # where the checkpointed run's config was read
    schedule_start: int  # the step train.resume_lr applies from (0: the plain schedule)

    def record(
        self, start_step: int, log: Callable[[str], None], write: bool = True
    ) -> epath.Path | None:
        """After the restore (`start_step`: the step it restored): reports the changes and
        the learning rate, and writes the history entry (and, at a resume that changed the
        config, `config.json`; the trainer writes it at step 0) where `write` (process 0).
        Returns the entry written, if any."""
        if start_step != self.step:
            raise RuntimeError(
                f"{self.workdir}: planned to resume from step {self.step} but restored step "
                f"{start_step}; were checkpoints added or removed meanwhile? Rerun."
            )
        if start_step == 0:
            log(describe_schedule(self.train))
            entry = {"step": 0, "schedule_start": 0, "changed": {}, "config": self.config}
            return self._write_entry(entry) if write else None
        schedule = describe_schedule(self.train, self.schedule_start, start_step + 1)
        if not self.changes:
            log(schedule)
            return None
        shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in self.changes.items())
        log(
            f"config changed since the checkpointed run ({self.previous_source}): {shown}; "
            f"config.json now holds this config, every start's is kept in "
            f"{self.workdir / HISTORY_DIR}"
        )
        if self.train.resume_lr == "schedule" and any(k in self.changes for k in SCHEDULE_FIELDS):
            schedule += (
                " (the new schedule at the global step: --config.train.resume_lr=constant "
                "holds train.learning_rate from here, =rewarm warms up again)"
            )
        log(schedule)
        if not write:
            return None
        if not history(self.workdir):  # a run started before histories were kept
            first = _read_json(self.workdir / CONFIG_JSON)
            if isinstance(first, dict):
                self._write_entry({"step": 0, "schedule_start": 0, "changed": {}, "config": first})
        entry = {
            "step": start_step,
            "schedule_start": self.schedule_start,
            "changed": self.changes,
            "config": self.config,
        }
        path = self._write_entry(entry)
        (self.workdir / CONFIG_JSON).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        return path

    def _write_entry(self, entry: dict) -> epath.Path:
        directory = self.workdir / HISTORY_DIR
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{entry['step']:08d}.json"
        path.write_text(json.dumps({**entry, "time": time.time()}, indent=2, sort_keys=True))
        return path


def plan_resume(
    workdir: str | epath.Path, config_dict: dict, train: TrainConfig, ckpt
) -> ResumePlan:
    """Compares `config_dict` (validated train section: `train`) with the config of the
    checkpoint `ckpt` would resume from, and finds the schedule start (module docstring).
    Reads only; `record` writes."""
    workdir = epath.Path(workdir)
    step = ckpt.latest_step() or 0
    if step == 0:  # a fresh run, or a converted checkpoint (step 0): the plain schedule
        return ResumePlan(workdir, config_dict, train, 0, {}, "", 0)
    previous, source = _checkpointed_config(workdir, ckpt, step)
    changes = {}
    if previous is not None:
        changes = config_changes(apply_renames(previous, source=source), config_dict)
    if any(k in changes for k in SCHEDULE_FIELDS):
        start = step
    else:  # the segment the checkpointed run was in
        start = _segment_start(history(workdir), step)
    return ResumePlan(workdir, config_dict, train, step, changes, source, start)


def _segment_start(entries: list[dict], step: int) -> int:
    """The schedule start of the latest entry at or before `step`, among those written since
    the run's first start (entries of an earlier run in the same directory do not count)."""
    firsts = [e for e in entries if e["step"] == 0]
    since = firsts[-1].get("time", 0) if firsts else 0
    earlier = [e for e in entries if 0 < e["step"] <= step and e.get("time", 0) >= since]
    return int(earlier[-1].get("schedule_start", 0)) if earlier else 0
