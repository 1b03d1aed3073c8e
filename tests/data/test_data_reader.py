"""Opening data: other tfds text datasets (conftest.MoejaxTestPlainText), describe(), and
unreadable data dirs."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from moejax.data import DataConfig, DataError, describe, make_batches


def test_other_tfds_dataset_by_name(plain_text_cfg, plain_texts):
    cfg = plain_text_cfg
    batches = list(make_batches(cfg, "train", process_index=0, process_count=1, repeat=False))
    real = np.concatenate([b["inputs"][b["segment_ids"] != 0] for b in batches])
    assert len(real) + sum(int((b["targets"][:, -1] != 0).sum()) for b in batches) == sum(
        len(t) + 2 for t in plain_texts
    )
    assert all((b["domains"][b["segment_ids"] != 0] == 0).all() for b in batches)  # no domain
    assert describe(cfg) == {"train": {"documents": 40, "bytes": None}}
    with pytest.raises(DataError, match="data.text_key='text'"):
        make_batches(
            dataclasses.replace(cfg, text_key="text"), "train", process_index=0, process_count=1
        )


def test_describe_counts_documents_and_bytes_per_domain(small_cfg, corpus):
    info = describe(small_cfg)
    assert set(info) == {"train", "validation"}
    for split, stats in info.items():
        assert stats["documents"] == corpus.info.splits[split].num_examples
        assert stats["bytes"] == sum(d["bytes"] for d in stats["domains"].values())
        assert all(d["documents"] > 0 for d in stats["domains"].values())


def test_corrupt_corpus_names_data_dir_and_the_fix(corpus, tmp_path):
    copy = tmp_path / "tfds"
    shutil.copytree(os.path.dirname(os.path.dirname(os.path.dirname(corpus.data_dir))), copy)
    cap = corpus.builder_config.max_bytes_per_domain
    cfg = DataConfig(data_dir=str(copy), max_bytes_per_domain=cap)
    variant = copy / "moejax_corpus" / corpus.builder_config.name / "1.0.0"
    (shard,) = variant.glob("*train.array_record*")
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match=r"data.data_dir=.*delete .* and rerun") as e:
        make_batches(cfg, "train", process_index=0, process_count=1)
    assert str(variant) in str(e.value)
    (variant / "dataset_info.json").write_text("{not json")
    with pytest.raises(DataError, match=r"data.data_dir=.*Delete .* and rerun"):
        make_batches(cfg, "train", process_index=0, process_count=1)
