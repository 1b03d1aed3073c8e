"""Checkpoints of the train state, the data iterator and run metadata, via orbax.

One step directory holds three items, written together by one
`orbax.checkpoint.CheckpointManager`:

    {workdir}/checkpoints/{step}/
        state/  the train state pytree (StandardSave: params, optimizer state, counters)
        data/   the data iterator state, a small JSON dict, so a resumed run sees the same
                batches it would have seen
        extra/  JSON metadata, e.g. the config as a dict, so a checkpoint says what wrote it

`data/` and `extra/` are only written when given. `{step}` is the number of updates
already applied, so a run resumed from step `s` continues with update `s + 1`.

Restoring takes a `target`: a pytree with the same structure as the saved state whose
leaves are `jax.ShapeDtypeStruct`s with `.sharding` set (or concrete arrays, whose
sharding is used). Orbax reads each shard straight into that layout, so a checkpoint
written on one mesh restores onto another mesh, or onto one device. A target dtype that
differs from the saved one is a cast, not an error (e.g. restoring f32 weights as bf16).

Saves are asynchronous by default: `save` returns once the arrays are copied off the
accelerator, and the files are written by a background thread. Call `wait()` before
reading the files from another process, and `close()` at the end of training.

Errors are `CheckpointError`s that name the directory and the fix. They are raised
before anything is written, and nothing here deletes or overwrites a checkpoint except
the `keep` policy removing the oldest steps after a successful save.

Integrity. Orbax writes a step into `{step}.orbax-checkpoint-tmp` and renames it to
`{step}` only once every file is written, so a process killed during a save (SIGKILL,
power loss of the host, OOM) leaves a temporary directory that is never listed as a
step. In a bucket (`gs://`), which has no rename, orbax writes `{step}/` in place and adds
`{step}/commit_success.txt` last; a step without it is never listed either.
`restore_or_init` resumes from the newest complete step and reports the interrupted
ones (`interrupted_steps`); the next save of such a step replaces its temporary directory.
A complete step that is damaged afterwards (truncated or deleted files) is not skipped
silently: restoring it raises a `CheckpointError` naming the step, the previous complete
step and how to resume from it, and nothing on disk is changed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy, save_decision_policy

from moejax.paths import as_path, is_remote, join, move_command
from moejax.train import state_layouts
from moejax.train.expert_relayout import onto_rows

PyTree = Any

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step directories end with this

_COMMIT_FILE = "commit_success.txt"  # orbax's mark of a complete step in a bucket

_STATE, _DATA, _EXTRA = "state", "data", "extra"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the restore target."""


class CorruptCheckpointError(CheckpointError):
    """A complete step directory whose files cannot be read back (truncated, deleted)."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tree or shapes differ from the restore target."""


class Checkpointer:
    """Saves and restores train state under `{workdir}/checkpoints/{step}`.

    Args:
        workdir: the run directory; checkpoints go to its `checkpoints/` subdirectory,
            which is created on the first save (restoring never creates it).
        keep: how many of the most recent steps to keep; older ones are deleted after
            each successful save.
        save_every: `save(step, ...)` writes only when `step % save_every == 0` (or when
            JAX reports a preemption sync point on a multi-host job), unless `force=True`.
        async_save: write files in a background thread (see the module docstring).

    All processes of a multi-host job must make the same calls; orbax decides which
    process writes which file.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        keep: int = 3,
        save_every: int = 1000,
        async_save: bool = True,
    ):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer(keep={keep!r}): keep must be an int >= 1.")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(
                f"Checkpointer(save_every={save_every!r}): save_every must be an int >= 1."
            )
        # orbax requires absolute paths; a relative workdir is relative to the cwd. A gs://
        # workdir stays a URL: orbax writes it through tensorstore's GCS driver.
        self.directory = join(workdir, "checkpoints")
        self.keep = keep
        self.save_every = save_every
        self.async_save = async_save
        registry = ocp.handlers.create_default_handler_registry(
            **{
                _STATE: ocp.handlers.StandardCheckpointHandler(),
                _DATA: ocp.handlers.JsonCheckpointHandler(),
                _EXTRA: ocp.handlers.JsonCheckpointHandler(),
            }
        )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision_policy.AnySavePolicy(
                [
                    save_decision_policy.FixedIntervalPolicy(save_every),
                    save_decision_policy.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=preservation_policy.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=False,  # The first save creates it; a failed restore leaves no trace.
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._pending_step: int | None = None  # Async save not yet confirmed on disk.

    # --- Queries -----------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps with a checkpoint (including one still being written), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        """The directory of one step's checkpoint."""
        return join(self.directory, str(step))

    def interrupted_steps(self) -> list[int]:
        """Steps whose save started but never completed, ascending; never restored. On a
        disk that is a temporary directory left behind; in a bucket, where orbax writes the
        step in place and adds `commit_success.txt` last, a step directory without it."""
        directory = as_path(self.directory)
        if not directory.is_dir():
            return []
        complete = set(self.all_steps())
        steps = set()
        for name in (p.name for p in directory.iterdir()):
            head = name.split(_TMP_SUFFIX)[0] if _TMP_SUFFIX in name else name
            if head.isdigit() and int(head) not in complete:
                steps.add(int(head))
        return sorted(steps)

    # --- Save --------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_state: dict | None = None,
        extra: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (and the JSON dicts `data_state`, `extra`) as step `step`.

        Returns whether a checkpoint was written. Without `force`, steps that are not a
        multiple of `save_every`, and steps not newer than the latest checkpoint (e.g.
        after restoring an older step with `restore(step=...)`), are skipped.
        `force=True` saves any step newer than the latest one; it never overwrites.
        """
        step = int(step)
        payload = {_STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            payload[_DATA] = ocp.args.JsonSave(_as_json(data_state, "data_state"))
        if extra is not None:
            payload[_EXTRA] = ocp.args.JsonSave(_as_json(extra, "extra"))

        if not force and not self._manager.should_save(step):
            return False
        latest = self.latest_step()
        if latest is not None and step <= latest:
            what = "already exists" if step == latest else f"is older than step {latest}"
            raise CheckpointError(
                f"Refusing to save step {step} to {self.directory}: a checkpoint for it "
                f"{what}, and saving there would overwrite or interleave runs. Resume with "
                f"restore() and save newer steps, or use a fresh workdir."
            )
        self.wait()  # Surfaces a failed previous async save before starting this one.
        try:
            self._manager.save(step, args=ocp.args.Composite(**payload), force=True)
        except Exception as e:
            raise CheckpointError(self._save_failed_message(step, e)) from e
        if self.async_save:
            self._pending_step = step
        return True

    def wait(self) -> None:
        """Blocks until async saves are on disk; raises if the last one failed."""
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # Orbax re-raises the background thread's error here.
            raise CheckpointError(self._save_failed_message(step, e)) from e
        # A committed step has its final directory name (orbax writes to a temporary
        # one and renames it last); check it rather than trust that no error means done.
        if step is not None and not self._committed(step):
            raise CheckpointError(
                self._save_failed_message(step, f"{self.step_dir(step)} does not exist")
            )

    def _committed(self, step: int) -> bool:
        """Whether the save of `step` completed: its final directory exists (orbax renames
        the temporary one last) or, in a bucket, it holds orbax's commit file."""
        final = as_path(self.step_dir(step))
        if is_remote(final):
            return (final / _COMMIT_FILE).exists()
        return final.is_dir()

    def _save_failed_message(self, step: int | None, cause: Any) -> str:
        return (
            f"Saving step {step} to {self.directory} failed ({_describe(cause)}). Earlier "
            f"checkpoints are untouched; check that the directory is writable and has free "
            f"space, then save again."
        )

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- Restore -----------------------------------------------------------------------

    def restore(
        self, step: int | None = None, *, target: PyTree
    ) -> tuple[PyTree, dict | None, dict | None]:
        """Restores step `step` (default: the latest) onto the layout of `target`. Routed
        experts saved in another number of rows than the target's (re-sharded FSSDP's
        `moe.fssdp_spare_rows`) come back in the target's rows, in their initial layout
        (`moejax.train.state_layouts`).

        Returns `(state, data_state, extra)`; `data_state` and `extra` are None when that
        checkpoint was saved without them.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"No checkpoint found in {self.directory}. Check that workdir points at the "
                f"run you want to resume, or start fresh (restore_or_init does this for you)."
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"No checkpoint for step {step} in {self.directory}; available steps: "
                f"{steps}. Pass one of those as restore(step=...)."
            )
        step_dir = self.step_dir(step)

        try:
            metadata = self._manager.item_metadata(step)
        except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
            raise CorruptCheckpointError(_unreadable_message(step_dir, step, steps, e)) from e
        items = set(metadata.keys())
        if _STATE not in items:
            raise CorruptCheckpointError(
                _unreadable_message(step_dir, step, steps, "it has no 'state' item")
            )
        target_abstract = abstract = jax.tree.map(_abstract_leaf, target)
        # A state written in an older layout (moejax.train.state_layouts) is read onto the
        # old shape of the target, then regrouped; a missing expert layout is the identity;
        # experts saved in another number of rows are read onto theirs, then moved.
        saved_tree = metadata[_STATE].tree if metadata[_STATE] is not None else None
        resized = state_layouts.saved_rows_target(abstract, saved_tree)
        abstract = abstract if resized is None else resized
        abstract, missing_layout = state_layouts.without_missing_layout(abstract, saved_tree)
        if resized is not None:
            missing_layout = state_layouts.in_id_order(missing_layout)
        v0 = isinstance(saved_tree, dict) and state_layouts.is_v0(saved_tree)
        shaped = state_layouts.v0_target(abstract) if v0 else abstract
        if saved_tree is not None:  # None when the tree metadata file is missing.
            _check_matches(shaped, saved_tree, step_dir)

        # Fields added to the state later are None for models without them; checkpoints
        # written before the field existed lack its key, so they are restored without it
        # and the field keeps its None.
        absent = _absent_none_fields(shaped, saved_tree)
        restore_item = shaped
        if absent:
            restore_item = {
                k: v for k, v in state_layouts.fields_of(shaped).items() if k not in absent
            }
        args = {_STATE: ocp.args.StandardRestore(restore_item)}
        for name in (_DATA, _EXTRA):
            if name in items:
                args[name] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CorruptCheckpointError(_unreadable_message(step_dir, step, steps, e)) from e
        state = restored[_STATE]
        if v0:
            state = state_layouts.from_v0({**state_layouts.fields_of(shaped), **state}, abstract)
        elif absent:
            state = dataclasses.replace(abstract, **state)
        state = state_layouts.with_initial_layout(state, missing_layout)
        if resized is not None:
            state = onto_rows(state, target_abstract)
        return (
            state,
            restored[_DATA] if _DATA in args else None,
            restored[_EXTRA] if _EXTRA in args else None,
        )

    def read_extra(self, step: int | None = None) -> dict | None:
        """The `extra` JSON of step `step` (default: the latest), or None without one."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        if _EXTRA not in set(self._manager.item_metadata(step).keys()):
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()})
        )
        return restored[_EXTRA]

    def saved_collection(self, name: str, step: int, sharding: Any) -> PyTree | None:
        """The abstract tree (ShapeDtypeStructs placed by `sharding`) of the non-trainable
        collection `name` as saved at `step`, or None when that step has none."""
        metadata = self._manager.item_metadata(step)[_STATE]
        saved = (metadata.tree if metadata is not None else {}) or {}
        tree = (saved.get(state_layouts.COLLECTIONS) or {}).get(name)
        if tree is None:
            return None
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree
        )

    def restore_subtrees(
        self, targets: dict[str, PyTree], step: int | None = None
    ) -> dict[str, PyTree]:
        """Only the top-level entries `targets` names of a step's state (e.g. `params` of a
        TrainState), each onto its target's layout; nothing else is read. An entry that is
        None in `targets` is restored only if saved (None otherwise). Routed experts saved
        in another number of rows than the target's come back in their saved rows, with
        their saved layout when `targets` asks for it (the caller takes the logical view).
        Raises CheckpointError naming the step and the first key that differs."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        step_dir = self.step_dir(step)
        try:
            metadata = self._manager.item_metadata(step)[_STATE]
        except Exception as e:
            raise CorruptCheckpointError(
                _unreadable_message(step_dir, step, self.all_steps(), e)
            ) from e
        saved = metadata.tree if metadata is not None else {}
        targets, missing_layout = state_layouts.without_missing_layout(targets, saved)
        if missing_layout is not None:  # restored without it, then the identity
            out = self.restore_subtrees(targets, step)
            return state_layouts.with_initial_layout(out, missing_layout)
        if state_layouts.COLLECTIONS in targets and state_layouts.is_v0(saved):
            # An older layout (moejax.train.state_layouts): the two fields, joined.
            rest = {k: v for k, v in targets.items() if k != state_layouts.COLLECTIONS}
            old = state_layouts.split_collections(targets[state_layouts.COLLECTIONS])
            out = self.restore_subtrees({**rest, **old}, step)
            joined = state_layouts.join_collections(out["router_bias"], out["lora_state"])
            return {**{k: out[k] for k in rest}, state_layouts.COLLECTIONS: joined}
        targets = state_layouts.saved_rows_target(targets, saved) or targets
        item = {}
        for name, target in targets.items():
            if name not in saved:
                if target is None:
                    continue
                raise CheckpointMismatchError(
                    f"Checkpoint {step_dir} has no '{name}' in its state (it has {sorted(saved)})."
                )
            if target is None:
                continue
            abstract = jax.tree.map(_abstract_leaf, target)
            _check_matches({name: abstract}, {name: saved[name]}, step_dir)
            item[name] = abstract
        if not item:
            return {name: None for name in targets}
        try:  # a partial read of the state item alone (the manager restores whole items)
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
            with ocp.PyTreeCheckpointer() as reader:
                out = dict(
                    reader.restore(
                        as_path(step_dir) / _STATE,
                        args=ocp.args.PyTreeRestore(
                            item, restore_args=restore_args, partial_restore=True
                        ),
                    )
                )
        except Exception as e:
            raise CorruptCheckpointError(
                _unreadable_message(step_dir, step, self.all_steps(), e)
            ) from e
        return {name: out.get(name) for name in targets}

    def restore_or_init(
        self,
        init_fn: Callable[[], PyTree],
        target: PyTree,
        log: Callable[[str], None] | None = None,
    ) -> tuple[PyTree, dict | None, int]:
        """Resumes from the latest complete checkpoint, or calls `init_fn()` when there is
        none.

        Returns `(state, data_state, start_step)`: `start_step` is the restored step (the
        number of updates already applied), or 0 with `data_state=None` for a fresh run.
        Saves that were interrupted are reported through `log` and skipped. A damaged latest
        checkpoint raises a CheckpointError naming it and the previous complete step rather
        than silently starting over or falling back.
        """
        step = self.latest_step()
        interrupted = [s for s in self.interrupted_steps() if step is None or s > step]
        if interrupted and log is not None:
            resume = f"resuming from step {step}" if step is not None else "starting fresh"
            log(
                f"checkpoint step(s) {interrupted} were not completely written (the run "
                f"stopped during the save): ignoring their temporary files in "
                f"{self.directory}, {resume}."
            )
        if step is None:
            return init_fn(), None, 0
        try:
            state, data_state, _ = self.restore(step, target=target)
        except CorruptCheckpointError as e:
            earlier = [s for s in self.all_steps() if s < step]
            aside = join(as_path(self.directory).parent, f"corrupt-checkpoint-{step}")
            move = f"`{move_command(self.step_dir(step), aside)}`"
            if earlier:
                fix = (
                    f"To resume from the previous complete checkpoint, step {earlier[-1]}, "
                    f"move the damaged one out of the way ({move}) and rerun"
                )
            else:
                fix = (
                    f"There is no earlier checkpoint: move the damaged one out of the way "
                    f"({move}) and rerun to start fresh"
                )
            raise CorruptCheckpointError(
                f"Checkpoint step {step} ({self.step_dir(step)}) is unreadable or corrupt; "
                f"nothing was changed on disk. {fix}. Cause: "
                f"{_describe(e.__cause__) if e.__cause__ else e}"
            ) from e
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(
                f"{e} The checkpoints in {self.directory} were written by a different model "
                f"or optimizer config: resume with that config, or pass a new --workdir to "
                f"start a separate run (nothing was changed on disk)."
            ) from e
        return state, data_state, step


# --- Helpers -------------------------------------------------------------------------


def _absent_none_fields(abstract: PyTree, saved: Any) -> list[str]:
    """Top-level entries of the target that are None and missing from the saved tree."""
    if not isinstance(saved, dict) or not (
        dataclasses.is_dataclass(abstract) or isinstance(abstract, dict)
    ):
        return []
    return [k for k, v in state_layouts.fields_of(abstract).items() if v is None and k not in saved]


def _abstract_leaf(x: Any) -> Any:
    """Concrete jax arrays become ShapeDtypeStructs that keep their sharding."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _check_matches(abstract: PyTree, saved_tree: PyTree, step_dir: str) -> None:
    """Raises CheckpointError naming the first key whose presence or shape differs."""
    wanted = ocp.tree.to_flat_dict(abstract)
    saved = ocp.tree.to_flat_dict(saved_tree)
    problem = None
    for key, leaf in wanted.items():
        if key not in saved:
            problem = f"the target has '{_name(key)}' but the checkpoint does not"
        elif tuple(np.shape(leaf)) != tuple(saved[key].shape):
            problem = (
                f"at '{_name(key)}' the checkpoint has shape {tuple(saved[key].shape)} "
                f"but the target has shape {tuple(np.shape(leaf))}"
            )
        if problem:
            break
    else:
        extra_keys = [k for k in saved if k not in wanted]
        if extra_keys:
            problem = f"the checkpoint has '{_name(extra_keys[0])}' but the target does not"
    if problem:
        raise CheckpointMismatchError(
            f"Checkpoint {step_dir} does not match the restore target: {problem}. Build "
            f"the target from the model/optimizer config that wrote the checkpoint (pass "
            f"the config as save(..., extra=) to keep it with the weights), or start a "
            f"fresh workdir."
        )


def _name(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _describe(cause: Any) -> str:
    """One short line for an exception; the full error stays attached as __cause__."""
    if not isinstance(cause, BaseException):
        return str(cause)
    # Tensorstore appends a long JSON spec to its messages; the first part says enough.
    first_line = (str(cause).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    if len(first_line) > 300:
        first_line = first_line[:300] + "..."
    return f"{type(cause).__name__}: {first_line}"


def _unreadable_message(step_dir: str, step: int, steps: list[int], cause: Any) -> str:
    earlier = [s for s in steps if s < step]
    hint = (
        f"restore an earlier step with restore(step={earlier[-1]}) (available: {steps})"
        if earlier
        else "start fresh (there is no earlier step)"
    )
    return (
        f"Checkpoint {step_dir} is unreadable or corrupt. If its files were damaged "
        f"(interrupted copy, full disk), delete that step directory or {hint}. "
        f"Cause: {_describe(cause)}"
    )


def _as_json(value: Any, what: str, path: str = "") -> Any:
    """A JSON-ready copy of `value`: numpy scalars become Python numbers, tuples lists.

    Raises TypeError naming the offending entry, before anything is saved.
    """
    here = f"{what}{path}"
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{here} has a non-string key {k!r}; JSON keys must be str.")
            out[k] = _as_json(v, what, f"{path}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_as_json(v, what, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.ndarray, np.generic)) or isinstance(value, jax.Array):
        return _as_json(np.asarray(value).tolist(), what, path)
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"{here} is {value}, which JSON cannot store; save a finite number.")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"{here} has type {type(value).__name__}, which JSON cannot store; convert it "
        f"to str/int/float/bool/list/dict first (e.g. config.to_dict())."
    )
