"""Bad input fails before training starts, naming the problem and the fix: an unwritable
workdir, a missing dataset, token ids that do not fit the model, a checkpoint written by a
different model (shape mismatch). A run directory written with an old field spelling
(`moe.router`) still resumes."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import cli_flags, run_module

from moejax.config.renames import ConfigDeprecationWarning
from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.data import DataError
from moejax.sharding.mesh import make_mesh
from moejax.train import config_history
from moejax.train.checkpoint import Checkpointer, CheckpointMismatchError
from moejax.train.experiment import build_experiment
from moejax.train.loop import train
from moejax.train.preflight import WorkdirError, check_vocabulary, check_workdir


def test_unwritable_workdir_is_named_before_anything_starts(tiny_config, tmp_path):
    (tmp_path / "a_file").write_text("")  # nothing can be created below a file
    with pytest.raises(
        WorkdirError,
        match=r"--workdir=.*a_file/run.* cannot be written.*"
        r"Pass a --workdir on a writable disk",
    ):
        train(tiny_config("dense"), str(tmp_path / "a_file" / "run"))
    assert check_workdir(str(tmp_path / "new")) == str(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []  # the probe file is removed


def test_missing_dataset_is_named(tiny_config, tmp_path):
    config = tiny_config("dense", **{"data.sources": f"jsonl:{tmp_path}/none-*.jsonl"})
    with pytest.raises(DataError, match=r"data.sources.*none-\*.jsonl"):
        train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_token_ids_must_fit_the_vocabulary(tiny_config, tmp_path):
    batch = {"inputs": np.array([[1, 258]]), "targets": np.array([[258, 2]])}
    check_vocabulary(batch, 259, "corpus")
    with pytest.raises(DataError, match=r"token id 258, but model.vocab_size=200 .*at least 259"):
        check_vocabulary(batch, 200, "array_record:x")
    # Through the trainer, the config check catches it first (the byte tokenizer's 259 ids).
    with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller than"):
        train(tiny_config("dense", **{"model.vocab_size": 200}), str(tmp_path))


def test_checkpoint_of_another_model_is_refused_naming_shapes(tiny_config, tmp_path):
    # A workdir whose checkpoint (but no config.json) comes from a model with d_model=32.
    s = validate(tiny_config("dense"), num_devices=1, num_processes=1)
    exp = build_experiment(s, make_mesh(s.mesh))
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), exp.abstract_state)
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(2, state, data_state={"format": 1})
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(CheckpointMismatchError) as info:
        train(tiny_config("dense", **{"model.d_model": 64}), str(tmp_path))
    message = str(info.value)
    assert "shape" in message and "32" in message and "64" in message
    assert "pass a new --workdir" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert not (tmp_path / "metrics.jsonl").exists()  # no step was trained


def test_run_written_with_the_old_router_field_resumes(tiny_config, tmp_path):
    """config.json of a run from before `moe.router` became `moe.scorer` + `moe.selection`:
    the resume check reads it in the new spelling, with a warning naming the new fields."""
    steps = {"train.steps": 2, "train.checkpoint_every": 2}
    train(tiny_config("rmoe", **steps), str(tmp_path))
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    assert (saved["moe"]["scorer"], saved["moe"]["selection"]) == ("gru", "softmax_topk")
    del saved["moe"]["scorer"]
    saved["moe"].update(router="gru", selection="")  # as the run was written then
    path.write_text(json.dumps(saved))
    # Still checked against this config: the old gru run is not a linear-scorer run.
    with (
        pytest.warns(ConfigDeprecationWarning),
        pytest.raises(
            ConfigError, match=r"run with moe.scorer='gru', but this config has 'linear'"
        ),
    ):
        train(tiny_config("rmoe", **steps, **{"moe.scorer": "linear"}), str(tmp_path))
    message = f"{path}: config.moe.router='gru' is an old spelling, read as moe.scorer='gru', "
    with pytest.warns(ConfigDeprecationWarning, match=re.escape(message)):
        train(tiny_config("rmoe", **{**steps, "train.steps": 4}), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    # The resume changed train.steps, so config.json now holds today's spelling, and the
    # config the run was started with stays in its history (config_history.py).
    assert json.loads(path.read_text())["moe"]["scorer"] == "gru"
    first, resumed = config_history.history(tmp_path)[0], config_history.history(tmp_path)[-1]
    assert first["step"] == 0 and first["config"]["moe"]["scorer"] == "gru"
    assert resumed["step"] == 2 and resumed["changed"]["train.steps"] == [2, 4]


def test_cli_prints_one_message_and_exits_1(tiny_config, tmp_path):
    config = tiny_config("dense", **{"data.sources": "jsonl:/no/such/dir/*.jsonl"})
    proc = run_module("moejax.train", *cli_flags(config, "dense"), f"--workdir={tmp_path}")
    assert proc.returncode == 1
    assert "moejax: error: DataError: data.sources" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--config=configs/deepseekmoe.py:size=huge", "size='huge': choose tiny, gpu or pod"),
        ("--config=configs/deepseekmoe.py:sise=pod", "unknown config arg 'sise'"),
    ],
)
def test_a_bad_config_argument_is_one_line(tmp_path, flag, expected):
    proc = run_module("moejax.train", flag, f"--workdir={tmp_path}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("moejax: error: flag --config=") and expected in lines[0]
    assert not os.listdir(tmp_path)  # nothing was written


@pytest.mark.parametrize(
    "flag, expected",
    [
        # ml_collections raised a KeyError traceback here; validate() names unknown leaves.
        ("--config.mo.top_k=3", "config has no section 'mo' (did you mean 'moe'?)"),
        ("--config.moe.topk=3", "unknown field(s) ['topk' (did you mean 'top_k'?)]"),
    ],
)
def test_a_misspelled_override_is_one_line_naming_the_field(tmp_path, flag, expected):
    proc = run_module(
        "moejax.train", "--config=configs/deepseekmoe.py", f"--workdir={tmp_path}", flag
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("moejax: error: ") and expected in lines[0], lines[0]
    assert "top_k" in lines[0] and not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config.moe.top_k=3", "--config.moe.router=gru"], None),  # a rename: validate's
        (["--config.traain.steps=3"], "config has no section 'traain' (did you mean 'train'?)"),
        (["--config.moe.top_k.x=3"], "config.moe.top_k is a field, not a section"),
        (["--config.moe.topk.x=1"], "config.moe has no field 'topk' (did you mean 'top_k'?)"),
        (["--config.optim.lr=1"], "config has no section 'optim'; valid sections are ['data'"),
    ],
)
def test_override_path_problem_names_the_valid_names(argv, expected):
    from moejax.train.__main__ import override_path_problem

    problem = override_path_problem(["moejax.train", "--workdir=w", *argv])
    assert problem == expected if expected is None else expected in problem
