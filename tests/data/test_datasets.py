"""The dataset registry: every kind of `data.dataset` satisfies the `Dataset` interface from
a tiny config, and a name that is no dataset is refused naming `data.dataset` and the
choices (by the pipeline and by `validate`)."""

import dataclasses
import json

import numpy as np
import pytest
from testing_utils import load_config_module

from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.data import (
    DATASETS,
    VOCAB_SIZE,
    DataConfig,
    DataError,
    Dataset,
    check_split,
    dataset_for,
    describe,
    make_batches,
    open_split,
)
from moejax.data.datasets import PREPARED_TFDS

# The documented batch: every array [B, seq_len], B = global_batch_size // processes.
KEYS = {
    "inputs": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "domains": np.int32,
    "loss_mask": np.float32,
}
# A fixture giving a tiny DataConfig for each kind: every registered name, and a tfds
# dataset prepared in data.data_dir (the kind every other name selects).
TINY = {
    "moejax_corpus": "small_cfg",
    "multitask": "multitask_cfg",
    "prepared tfds": "plain_text_cfg",
}
NOT_DATASETS = ["no such dataset", "a/b/c", "corpus!"]


@pytest.fixture()
def multitask_cfg() -> DataConfig:
    return DataConfig(dataset="multitask", seq_len=16, global_batch_size=4)


def assert_documented_batch(batch, rows, seq_len, max_id):
    assert set(batch) == set(KEYS)
    for key, dtype in KEYS.items():
        assert batch[key].shape == (rows, seq_len), key
        assert batch[key].dtype == dtype, key
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert set(np.unique(batch["loss_mask"])) <= {0.0, 1.0}
    assert 0 <= batch["inputs"].min() and batch["inputs"].max() < max_id
    assert 0 <= batch["targets"].min() and batch["targets"].max() < max_id


def test_every_registered_dataset_has_a_tiny_config():
    # Registering a dataset without adding its tiny config above fails here.
    assert set(DATASETS) <= set(TINY)
    assert all(isinstance(d, Dataset) for d in [*DATASETS.values(), PREPARED_TFDS])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_dataset_satisfies_the_interface(kind, request):
    cfg = request.getfixturevalue(TINY[kind])
    dataset = dataset_for(cfg.dataset)
    assert dataset is DATASETS.get(cfg.dataset, PREPARED_TFDS)
    assert 0 <= dataset.min_vocab_size <= VOCAB_SIZE
    max_id = dataset.min_vocab_size or VOCAB_SIZE

    # This process's share (process 1 of 2), resumable from a JSON state.
    rows = cfg.global_batch_size // 2
    batches = make_batches(cfg, cfg.train_split, process_index=1, process_count=2)
    first = next(batches)
    assert_documented_batch(first, rows, cfg.seq_len, max_id)
    assert first["loss_mask"].sum() > 0
    padding = batches.padding_batch()
    assert_documented_batch(padding, rows, cfg.seq_len, max_id)
    assert not padding["loss_mask"].any()
    state = json.loads(json.dumps(batches.get_state()))
    want = next(batches)
    again = make_batches(cfg, cfg.train_split, process_index=1, process_count=2)
    again.set_state(state)
    got = next(again)
    for key in KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # Evaluation: the split checks out before training, then a finite pass over it.
    check_split(cfg, cfg.eval_split)
    evals = list(make_batches(cfg, cfg.eval_split, process_index=0, process_count=1, repeat=False))
    assert evals
    for batch in evals:
        assert_documented_batch(batch, cfg.global_batch_size, cfg.seq_len, max_id)

    info = describe(cfg)
    assert {cfg.train_split, cfg.eval_split} <= set(info)
    assert all({"documents", "bytes"} <= set(stats) for stats in info.values())


@pytest.mark.parametrize("kind", ["moejax_corpus", "prepared tfds"])
def test_datasets_read_from_disk_open_their_splits(kind, request):
    cfg = request.getfixturevalue(TINY[kind])
    reader = open_split(cfg, cfg.train_split)
    tokens, domain = reader.tokens(0)
    assert len(reader) > 0 and tokens[0] == 1 and tokens[-1] == 2 and domain >= 0
    with pytest.raises(DataError, match="data.eval_split='nope'"):
        check_split(dataclasses.replace(cfg, eval_split="nope"), "nope")


def test_generated_dataset_has_no_split_to_open(multitask_cfg):
    with pytest.raises(DataError, match="data.dataset='multitask' is generated, not read"):
        open_split(multitask_cfg, "train")
    check_split(multitask_cfg, "any_name")  # nothing to check: every split is generated


@pytest.mark.parametrize("name", NOT_DATASETS)
def test_a_name_that_is_no_dataset_is_refused_naming_the_field_and_the_choices(name):
    with pytest.raises(DataError) as err:
        dataset_for(name)
    message = str(err.value)
    assert f"data.dataset={name!r}" in message and "--config.data.dataset" in message
    assert all(repr(choice) in message for choice in DATASETS)
    cfg = DataConfig(dataset=name)
    for call in (
        lambda: make_batches(cfg, "train", process_index=0, process_count=1),
        lambda: describe(cfg),
        lambda: check_split(cfg, "validation"),
    ):
        with pytest.raises(DataError) as err:
            call()
        assert str(err.value) == message

    config = load_config_module("deepseekmoe").get_config()
    config.data.dataset = name
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=1, num_processes=1)
    assert str(err.value) == message


def test_an_unprepared_tfds_name_is_refused_when_opened_naming_the_choices(tmp_path):
    cfg = DataConfig(dataset="no_such_corpus", data_dir=str(tmp_path))
    assert dataset_for(cfg.dataset) is PREPARED_TFDS  # a tfds name: only reading can tell
    with pytest.raises(DataError) as err:
        make_batches(cfg, "train", process_index=0, process_count=1)
    message = str(err.value)
    assert message.startswith("data.dataset='no_such_corpus' is not a registered")
    assert all(repr(choice) in message for choice in DATASETS)


def test_validation_takes_the_vocabulary_from_the_registry():
    config = load_config_module("deepseekmoe").get_config()
    for name, dataset in DATASETS.items():
        config.data.dataset = name
        config.model.vocab_size = dataset.min_vocab_size
        validate(config, num_devices=1, num_processes=1)
        if dataset.min_vocab_size > 1:
            config.model.vocab_size = dataset.min_vocab_size - 1
            with pytest.raises(ConfigError, match=f"data.dataset='{name}'"):
                validate(config, num_devices=1, num_processes=1)
    # Another tfds dataset's ids depend on its text: only its first batch is checked.
    config.data.dataset = "some_text_dataset"
    config.model.vocab_size = 128
    validate(config, num_devices=1, num_processes=1)
