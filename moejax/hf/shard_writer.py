"""Writing a Hugging Face checkpoint one tensor at a time: safetensors shards of bounded size
and their `model.safetensors.index.json`, the layout transformers' `save_pretrained(...,
max_shard_size=...)` writes and `from_pretrained` reads (`model-00001-of-00003.safetensors`,
index `{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}`; a checkpoint that
fits one shard is a single `model.safetensors`).

    with ShardWriter("/out", max_shard_bytes=2 << 30) as writer:
        for name, array in tensors:             # any iterable: a generator keeps one in memory
            writer.add(name, array)

Host memory holds at most one shard's tensors (plus the one being added). `to_host` copies a
`jax.Array` to NumPy, gathering a multi-host array over processes first; only process 0
writes files, the others take part in the gathers. Paths go through `moejax.paths` (a local
directory or a `gs://` URL).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from moejax.paths import as_path, is_remote

DEFAULT_MAX_SHARD_BYTES = 2 << 30  # 2 GiB per safetensors file
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def to_host(x) -> np.ndarray:
    """`x` as a NumPy array; a `jax.Array` spread over several processes is gathered first
    (every process must call this for the same arrays, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


class ShardWriter:
    """Buffers tensors and writes a safetensors shard each time the next tensor would take
    the buffer past `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""

    def __init__(self, path: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive.")
        self.directory = as_path(path)
        self.max_shard_bytes = max_shard_bytes
        self.writes = jax.process_index() == 0
        self._buffer: dict[str, np.ndarray] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each written shard
        self._total_bytes = 0
        if self.writes:
            self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._buffer or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        array = np.ascontiguousarray(array)
        if self._buffer and self._buffer_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = array
        self._buffer_bytes += array.nbytes
        self._total_bytes += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save, save_file

        if self.writes:
            target = self.directory / _temporary_name(len(self._shards))
            if is_remote(str(self.directory)):  # through the bucket client: the bytes first
                target.write_bytes(save(self._buffer, metadata={"format": "pt"}))
            else:  # straight to the file, without a second copy of the shard in memory
                save_file(self._buffer, str(target), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes the last shard, names the shards `-of-N` (or `model.safetensors` for one)
        and the index; returns the file names."""
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        if not self.writes:
            return names
        for i, name in enumerate(names):
            (self.directory / _temporary_name(i)).rename(self.directory / name)
        stale = self.directory / (INDEX_FILE if count == 1 else SINGLE_FILE)
        if stale.exists():  # left by an earlier save of another shard count into `path`
            stale.unlink()
        if count > 1:
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": {t: name for name, shard in zip(names, self._shards) for t in shard},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()


def _temporary_name(i: int) -> str:
    return f".model-{i + 1:05d}.safetensors.partial"
