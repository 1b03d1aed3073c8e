"""DataConfig: defaults, from_mapping, and errors that name the field."""

import dataclasses

import ml_collections
import pytest

from moejax.data import DataConfig


def test_defaults():
    cfg = DataConfig()
    assert (cfg.sources, cfg.tokenizer, cfg.pad_id, cfg.eval_fraction) == (
        "corpus",
        "byte",
        -1,
        0.05,
    )
    assert (cfg.seq_len, cfg.global_batch_size, cfg.max_bytes_per_domain) == (
        256,
        16,
        4_000_000,
    )
    assert (cfg.train_split, cfg.eval_split, cfg.shuffle, cfg.data_dir) == (
        "train",
        "validation",
        True,
        "",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 8  # type: ignore[misc]


def test_from_mapping_accepts_dict_and_config_dict():
    assert DataConfig.from_mapping({"seq_len": 32, "seed": 4}) == DataConfig(seq_len=32, seed=4)
    section = ml_collections.ConfigDict({"seq_len": 64, "global_batch_size": 8})
    assert DataConfig.from_mapping(section) == DataConfig(seq_len=64, global_batch_size=8)
    frozen = ml_collections.FrozenConfigDict(section)
    assert DataConfig.from_mapping(frozen) == DataConfig(seq_len=64, global_batch_size=8)


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        DataConfig.from_mapping({"seq_length": 32})
    assert "data.seq_length" in str(e.value)
    assert "seq_len" in str(e.value) and "global_batch_size" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"seq_len": 0}, "data.seq_len"),
        ({"global_batch_size": -1}, "data.global_batch_size"),
        ({"seq_len": "256"}, "data.seq_len"),
        ({"shuffle": 1}, "data.shuffle"),
        ({"seq_len": True}, "data.seq_len"),
        ({"sources": ""}, "data.sources"),
        ({"tokenizer": ""}, "data.tokenizer"),
        ({"seed": -1}, "data.seed"),
        ({"eval_fraction": 0.0}, "data.eval_fraction"),
        ({"eval_fraction": "0.1"}, "data.eval_fraction"),
        ({"eval_fraction": True}, "data.eval_fraction"),
        ({"pad_id": -2}, "data.pad_id"),
        ({"worker_count": -1}, "data.worker_count"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        DataConfig(**kwargs)
