"""Opening data: other tfds text datasets, describe(), and unreadable data dirs."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from moejax.data import DataConfig, DataError, describe, make_batches

TEXTS = [f"document number {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]


class MoejaxTestPlainText(tfds.core.GeneratorBasedBuilder):
    """A text-only dataset (no domain feature), like most tfds text datasets."""

    VERSION = tfds.core.Version("0.1.0")
    code_path = epath.Path(__file__)  # see MoejaxCorpus.code_path

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(TEXTS):
            yield i, {"body": text}


def test_other_tfds_dataset_by_name(tmp_path):
    builder = MoejaxTestPlainText(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    cfg = DataConfig(
        dataset="moejax_test_plain_text",
        data_dir=str(tmp_path),
        text_key="body",
        seq_len=32,
        global_batch_size=2,
        eval_split="train",
    )
    batches = list(make_batches(cfg, "train", process_index=0, process_count=1, repeat=False))
    real = np.concatenate([b["inputs"][b["segment_ids"] != 0] for b in batches])
    assert len(real) + sum(int((b["targets"][:, -1] != 0).sum()) for b in batches) == sum(
        len(t) + 2 for t in TEXTS
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
