"""Data and tokenizers in a bucket (a local GCS emulator, `tests/storage_emulator.py`): the
parquet + jsonl.gz mixture and its SentencePiece model copied to `gs://test-bucket/data`
give the batches of the same files on disk, row for row (the train/eval split hashes paths
relative to the glob root, so it does not depend on where the files live); a Hugging Face
tokenizer.json is read from the bucket too; array_record sources and a tfds data_dir in a
bucket are refused with the fix."""

import pathlib

import numpy as np
import pytest
from etils import epath
from testing_utils import write_mixture

from moejax.data import DataConfig, DataError, load_tokenizer, make_batches, open_tokenizer
from moejax.data.document_sources import write_token_records
from moejax.data.tokenizer_training import train_tokenizer

KEYS = ("inputs", "targets", "segment_ids", "positions", "domains", "loss_mask")


def _upload(local_dir, url: str) -> None:
    for path in sorted(pathlib.Path(local_dir).rglob("*")):
        if path.is_file():
            target = epath.Path(url) / str(path.relative_to(local_dir))
            target.write_bytes(path.read_bytes())


def test_a_mixture_in_a_bucket_reads_like_the_same_files_on_disk(gcs, tmp_path):
    local = tmp_path / "data"
    local.mkdir()
    sources, tokenizer = write_mixture(local)
    url = "gs://test-bucket/data"
    _upload(local, url)
    on_disk = DataConfig(sources=sources, tokenizer=tokenizer, seq_len=32, global_batch_size=4)
    in_bucket = DataConfig(
        sources=sources.replace(str(local), url),
        tokenizer=tokenizer.replace(str(local), url),
        seq_len=32,
        global_batch_size=4,
    )
    assert open_tokenizer(in_bucket).vocab_size == open_tokenizer(on_disk).vocab_size == 320
    for split in ("train", "eval"):
        a = make_batches(on_disk, split, process_index=0, process_count=1)
        b = make_batches(in_bucket, split, process_index=0, process_count=1)
        for _ in range(6):
            x, y = next(a), next(b)
            for k in KEYS:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{split} {k}")


def test_hf_tokenizer_json_in_a_bucket(gcs, tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    spec = train_tokenizer(texts, kind="bpe", vocab_size=300, out_dir="gs://test-bucket/tok")
    assert spec == "hf:gs://test-bucket/tok"
    local = train_tokenizer(texts, kind="bpe", vocab_size=300, out_dir=str(tmp_path / "tok"))
    a, b = load_tokenizer(spec), load_tokenizer(local)
    assert (a.bos_id, a.eos_id, a.pad_id) == (b.bos_id, b.eos_id, b.pad_id)
    np.testing.assert_array_equal(a.encode(texts[7]), b.encode(texts[7]))


def test_array_record_in_a_bucket_is_refused_with_the_fix(gcs, tmp_path):
    write_token_records(tmp_path / "t.array_record", [[5, 6, 7]] * 4)
    _upload(tmp_path, "gs://test-bucket/tokens")
    cfg = DataConfig(
        sources="array_record:gs://test-bucket/tokens/*.array_record",
        seq_len=8,
        global_batch_size=2,
    )
    with pytest.raises(DataError, match=r"gs://test-bucket/tokens/t.array_record.*gcloud"):
        make_batches(cfg, "train", process_index=0, process_count=1)


def test_tfds_data_dir_in_a_bucket_is_refused_with_the_fix():
    cfg = DataConfig(sources="corpus", data_dir="gs://test-bucket/tfds", seq_len=8)
    with pytest.raises(DataError, match=r"data.data_dir='gs://test-bucket/tfds' is in a bucket"):
        make_batches(cfg, "train", process_index=0, process_count=1)
