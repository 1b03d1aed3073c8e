"""A Hugging Face checkpoint directory in a bucket (a local GCS emulator,
`tests/storage_emulator.py`): `TensorReader` over two safetensors shards and their index gives
the keys, tensors, shapes and boxes it gives for the same directory on disk."""

import json
import pathlib

import numpy as np
from etils import epath

from moejax.hf import read_config
from moejax.hf.weights import TensorReader


def test_tensor_reader_in_a_bucket_matches_the_directory_on_disk(gcs, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": rng.normal(size=(6, 4))},
        "model-00002-of-00002.safetensors": {
            "b.weight": rng.normal(size=(3, 5, 2)),
            "c.bias": rng.normal(size=(7,)),
        },
    }
    index = {"weight_map": {k: name for name, ts in shards.items() for k in ts}}
    for name, tensors in shards.items():
        save_file({k: v.astype(np.float32) for k, v in tensors.items()}, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "test"}))
    url = "gs://test-bucket/hf"
    for path in pathlib.Path(tmp_path).iterdir():
        (epath.Path(url) / path.name).write_bytes(path.read_bytes())

    local, remote = TensorReader(str(tmp_path)), TensorReader(url)
    assert remote.remote and not local.remote
    assert remote.keys() == local.keys() == {"a.weight", "b.weight", "c.bias"}
    box = (slice(1, 3), slice(0, 5), slice(1, 2))
    for key in sorted(local.keys()):
        np.testing.assert_array_equal(remote.get(key), local.get(key))
        assert remote.shape(key) == local.shape(key)
    np.testing.assert_array_equal(remote.get_box("b.weight", box), local.get_box("b.weight", box))
    assert read_config(url) == read_config(str(tmp_path)) == {"model_type": "test"}
