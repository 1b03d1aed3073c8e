"""Hugging Face safetensors <-> moejax variables, driven by the tables in `architectures`.

Import fills a NumPy copy of the model's (scanned) variable tree, tensor by tensor, and then
checks that every checkpoint tensor was used and every moejax leaf was filled, naming what
is left over. Routed experts are read from either layout: transformers 5.x fused tensors
(`experts.gate_up_proj [E, 2I, d]`, `experts.down_proj [E, d, I]`) or one module per expert
(`experts.{e}.gate_proj.weight [I, d]`, ...; Mixtral's legacy `w1/w3/w2`). Export writes the
per-expert layout, which transformers 4.x and 5.x both load.

Every moejax leaf (per layer of its stack) is described by a source: a checkpoint tensor and
how moejax's index maps into it (transpose, reshape, rotary permutation, the gate or up half
of a fused expert tensor, one tensor per expert). The unsharded `Assembler` reads each source
whole; `ShardPlan` keeps the sources so `moejax.hf.sharded` can read, for each device, only
the box of each tensor that device holds (safetensors `get_slice`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config_section import ConfigError
from moejax.hf.architectures import (
    DENSE_MLP,
    GQA,
    GQA_BIAS,
    MLA_KV,
    MLA_Q,
    MLA_Q_LORA,
    NORMS,
    QK_NORM,
    Architecture,
    shared_rows,
)
from moejax.hf.layout import layer_slot
from moejax.hf.shard_writer import to_host
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.paths import as_path, glob_files, is_remote, join, resolve

LAYER = "model.layers.{i}."


def abstract_variables(model: Transformer) -> dict[str, tuple[int, ...]]:
    """{"collection/path": shape} of the model's variables, without allocating them."""
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    flat = flax.traverse_util.flatten_dict(nn.unbox(tree), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open

        return safe_open
    except ImportError as e:
        raise ImportError("moejax.hf needs safetensors: pip install -e '.[hf]'") from e


class TensorReader:
    """Lazy access to the tensors of a HF directory (one file or shards with an index), on
    disk (memory-mapped, `safe_open`) or in a bucket (each shard read whole through epath
    when one of its tensors is first asked for; the last shard read is kept)."""

    def __init__(self, path: str):
        safe_open = _safetensors()
        directory = as_path(path)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [str(directory / name) for name in names]
        else:
            files = glob_files(join(path, "*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{resolve(path)} holds no *.safetensors file (moejax.hf does not "
                f"read pytorch_model.bin; re-save with safetensors)."
            )
        self.remote = is_remote(files[0])
        self._open = safe_open
        self._shard: tuple[str, dict] | None = None  # remote: the last shard read
        self.file_of: dict[str, str] = {}
        for name in files:
            for key in self._keys(name):
                self.file_of[key] = name

    def _keys(self, name: str) -> list[str]:
        if self.remote:
            return list(self._read_shard(name))
        with self._open(name, framework="flax") as f:
            return list(f.keys())

    def _read_shard(self, name: str) -> dict:
        from safetensors.flax import load  # as `safe_open(framework="flax")`: bf16 too

        if self._shard is None or self._shard[0] != name:
            self._shard = (name, load(as_path(name).read_bytes()))
        return self._shard[1]

    def keys(self) -> set[str]:
        return set(self.file_of)

    def get(self, key: str) -> np.ndarray:
        if self.remote:
            return np.asarray(self._read_shard(self.file_of[key])[key], np.float32)
        with self._open(self.file_of[key], framework="flax") as f:
            return np.asarray(f.get_tensor(key), np.float32)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.remote:
            return tuple(self._read_shard(self.file_of[key])[key].shape)
        with self._open(self.file_of[key], framework="flax") as f:
            return tuple(f.get_slice(key).get_shape())

    def get_box(self, key: str, box: tuple[slice, ...]) -> np.ndarray:
        """The sub-tensor `key[box]`, read without the rest of the tensor (in a bucket: cut
        from its shard, read whole)."""
        if self.remote:
            return np.asarray(self._read_shard(self.file_of[key])[key][box], np.float32)
        with self._open(self.file_of[key], framework="flax") as f:
            return np.asarray(f.get_slice(key)[box], np.float32)


def gather(reader: TensorReader, name: str, index: tuple[np.ndarray, ...]) -> np.ndarray:
    """`tensor[index]` (broadcast integer index arrays) reading only their bounding box."""
    lo = [int(ix.min()) for ix in index]
    box = tuple(slice(low, int(ix.max()) + 1) for low, ix in zip(lo, index))
    return reader.get_box(name, box)[tuple(ix - low for ix, low in zip(index, lo))]


class LinearSource:
    """A moejax leaf of shape `sub` (one layer) from HF tensor `name`: `W.T` (n_in > 0 and W
    2-D: `[out, in]` weights) or `W`, reshaped to `sub`, last axis permuted by `cols`."""

    def __init__(self, reader, name, sub, n_in, cols=None):
        self.reader, self.name, self.sub, self.n_in, self.cols = reader, name, sub, n_in, cols

    def full(self) -> np.ndarray:
        w = self.reader.get(self.name)
        value = (w.T if self.n_in else w).reshape(self.sub)
        return value if self.cols is None else value[..., self.cols]

    def box(self, axes: tuple[np.ndarray, ...]) -> np.ndarray:
        grids = list(np.ix_(*axes))
        if self.cols is not None:
            grids[-1] = self.cols[grids[-1]]
        flat = np.ravel_multi_index(tuple(grids), self.sub)
        shape = self.reader.shape(self.name)
        if self.n_in and len(shape) == 2:  # element p of W.T [in, out] is W[p % out, p // out]
            index = (flat % shape[0], flat // shape[0])
        else:
            index = np.unravel_index(flat, shape)
        return gather(self.reader, self.name, index)


class FusedExpertSource:
    """`w_gate|w_up [E, d, I]` from transformers 5.x `gate_up_proj [E, 2I, d]` (rows from
    `offset`), or `w_down [E, I, d]` from `down_proj [E, d, I]`: a transpose of the last two
    axes."""

    def __init__(self, reader, name, sub, offset=0):
        self.reader, self.name, self.sub, self.offset = reader, name, sub, offset

    def full(self) -> np.ndarray:
        w = self.reader.get(self.name)[:, self.offset : self.offset + self.sub[2]]
        return w.transpose(0, 2, 1)

    def box(self, axes) -> np.ndarray:
        e, a, b = np.ix_(*axes)
        return gather(self.reader, self.name, (e, b + self.offset, a))


class ExpertListSource:
    """A routed-expert leaf `[E, a, b]` from one `[b, a]` tensor per expert (`names[e]`)."""

    def __init__(self, reader, names, sub):
        self.reader, self.names, self.sub = reader, names, sub

    def full(self) -> np.ndarray:
        return np.stack([self.reader.get(n).T for n in self.names])

    def box(self, axes) -> np.ndarray:
        a, b = np.ix_(axes[1], axes[2])
        return np.stack([gather(self.reader, self.names[e], (b, a)) for e in axes[0]])


def attention_rows(m: ModelConfig):
    if m.attention == "mla":
        return (MLA_Q_LORA if m.q_lora_rank else MLA_Q) + MLA_KV
    return GQA + (GQA_BIAS if m.attention_bias else ()) + (QK_NORM if m.qk_norm != "none" else ())


def rope_permutation(m: ModelConfig, path: str) -> tuple[int, np.ndarray] | None:
    """DeepSeek's interleaved rotary channels -> the rotate-half order: (axis offset of the
    rotary block in the last axis, permutation) for the MLA tensors that carry RoPE."""
    if m.attention != "mla" or path not in ("attn/wq", "attn/wq_b", "attn/wkv_a"):
        return None
    r = m.qk_rope_head_dim
    perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])
    offset = m.kv_lora_rank if path == "attn/wkv_a" else m.qk_nope_head_dim
    return offset, perm


def _permute(m: ModelConfig, path: str, value: np.ndarray, inverse: bool) -> np.ndarray:
    spec = rope_permutation(m, path)
    if spec is None:
        return value
    offset, perm = spec
    perm = np.argsort(perm) if inverse else perm
    cols = np.concatenate([np.arange(offset), offset + perm])
    return value[..., cols]


class ShardPlan:
    """Collects, for every moejax leaf `"collection/path"` and index into its layer axes, the
    source that fills it (checking shapes), without reading any tensor."""

    def __init__(
        self,
        flat_shapes: dict[str, tuple[int, ...]],
        m: ModelConfig,
        arch: Architecture,
        interleaved_rope: bool,
        reader: TensorReader,
    ):
        self.shapes = dict(flat_shapes)
        self.sources: dict[str, dict[tuple[int, ...], object]] = {}
        self.m, self.arch, self.interleaved, self.reader = m, arch, interleaved_rope, reader

    def _sub(self, key: str, idx, source: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise ConfigError(f"{source} maps to {key}, which this model does not have.")
        return self.shapes[key][len(idx) :]

    def add(self, key: str, idx: tuple[int, ...], src) -> None:
        self.sources.setdefault(key, {})[tuple(idx)] = src

    def put_tensor(self, key: str, idx, name: str, n_in: int, path: str = "") -> None:
        """HF tensor `name` (`[out, in]` weight when n_in > 0, else a reshaped vector) ->
        `key` at `idx`; `path` names the block parameter for the rotary permutation."""
        sub = self._sub(key, idx, name)
        shape = self.reader.shape(name)
        if int(np.prod(shape)) != int(np.prod(sub)):
            shown = shape[::-1] if n_in and len(shape) == 2 else shape  # as moejax reads it
            raise ConfigError(f"{name} has shape {shown}; {key} needs {sub}.")
        cols = None
        spec = rope_permutation(self.m, path) if self.interleaved else None
        if spec is not None:
            offset, perm = spec
            cols = np.concatenate([np.arange(offset), offset + perm])
        self.add(key, idx, LinearSource(self.reader, name, sub, n_in, cols))

    def put_linear(self, stack: str, path: str, idx, name: str, n_in: int):
        """An HF `[out, in]` weight (n_in > 0) or vector (n_in = 0) -> params/stack/path."""
        self.put_tensor(f"params/{stack}/{path}", idx, name, n_in, path)

    def put_fused_experts(self, base: str, idx, gate_up: str, down: str) -> None:
        sub = self._sub(f"{base}/w_gate", idx, gate_up)
        e, d, inter = sub
        for name, want in ((gate_up, (e, 2 * inter, d)), (down, (e, d, inter))):
            if self.reader.shape(name) != want:
                raise ConfigError(f"{name} has shape {self.reader.shape(name)}; needs {want}.")
        self.add(f"{base}/w_gate", idx, FusedExpertSource(self.reader, gate_up, sub, 0))
        self.add(f"{base}/w_up", idx, FusedExpertSource(self.reader, gate_up, sub, inter))
        self.add(f"{base}/w_down", idx, FusedExpertSource(self.reader, down, (e, inter, d)))

    def put_expert_list(self, key: str, idx, names: list[str]) -> None:
        sub = self._sub(key, idx, names[0])
        if self.reader.shape(names[0]) != (sub[2], sub[1]):
            raise ConfigError(
                f"{names[0]} has shape {self.reader.shape(names[0])}; {key} needs "
                f"{(sub[2], sub[1])} per expert."
            )
        self.add(key, idx, ExpertListSource(self.reader, names, sub))

    def missing(self) -> list[str]:
        return sorted(k for k in self.shapes if k not in self.sources)


class Assembler(ShardPlan):
    """Fills the flat moejax variable dict {"collection/path": array} from a plan, reading
    each source whole (one host holds the whole model)."""

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for key, shape in self.shapes.items():
            target = np.zeros(shape, np.float32)
            for idx, src in self.sources.get(key, {}).items():
                target[idx] = src.full()
            out[key] = target
        return out


def layer_tensors(m: ModelConfig, moe_layer: bool):
    """(hf_suffix, block path, n_in) rows of one layer, without the routed experts."""
    return NORMS + attention_rows(m) + (() if moe_layer else DENSE_MLP)


def load_layers(reader: TensorReader, asm: ShardPlan, m: ModelConfig, arch: Architecture):
    used: set[str] = set()

    def take(name: str) -> str:
        used.add(name)
        return name

    keys = reader.keys()
    for i in range(m.num_layers):
        stack, idx = layer_slot(m, i)
        pre = LAYER.format(i=i)
        is_moe = m.is_moe_layer(i)
        rows = layer_tensors(m, is_moe)
        for suffix, path, n_in in rows:
            if pre + suffix not in keys:
                raise ConfigError(f"checkpoint has no tensor {pre + suffix}.")
            asm.put_linear(stack, path, idx, take(pre + suffix), n_in)
        if not is_moe:
            continue
        prefix = next((p for p in arch.moe_prefixes if f"{pre}{p}.gate.weight" in keys), None)
        if prefix is None:
            raise ConfigError(
                f"layer {i} should be MoE but the checkpoint has no "
                f"{pre}{arch.moe_prefixes[0]}.gate.weight."
            )
        p = f"{pre}{prefix}"
        asm.put_linear(stack, "moe/router/kernel", idx, take(f"{p}.gate.weight"), 1)
        _load_experts(keys, take, asm, f"params/{stack}/moe/experts", idx, p, arch)
        if arch.shared_prefix:
            for suffix, path, n_in in _shared_rows(arch):
                asm.put_linear(stack, path, idx, take(pre + suffix), n_in)
        for suffix, path, n_in in arch.extra_moe_rows:
            asm.put_linear(stack, path, idx, take(pre + suffix), n_in)
        if arch.router_bias and pre + arch.router_bias in keys:
            key = f"router_bias/{stack}/moe/router/bias"
            asm.put_tensor(key, idx, take(pre + arch.router_bias), 0)
    return used


def _shared_rows(arch: Architecture):
    return shared_rows(arch.shared_prefix)


def _load_experts(keys, take, asm: ShardPlan, base: str, idx, p: str, arch: Architecture):
    if f"{p}.experts.gate_up_proj" in keys:  # transformers 5.x fused layout
        # gate_up_proj [E, 2I, d], down_proj [E, d, I]
        asm.put_fused_experts(
            base, idx, take(f"{p}.experts.gate_up_proj"), take(f"{p}.experts.down_proj")
        )
        return
    num = asm.shapes[f"{base}/w_gate"][len(idx)]
    for name, hf_name in zip(("w_gate", "w_up", "w_down"), arch.legacy_expert):
        names = [f"{p}.experts.{e}.{hf_name}.weight" for e in range(num)]
        absent = [n for n in names if n not in keys]
        if absent:
            raise ConfigError(f"checkpoint has neither {p}.experts.gate_up_proj nor {absent[0]}.")
        asm.put_expert_list(f"{base}/{name}", idx, [take(n) for n in names])


def export_tensors(
    flat: dict, m: ModelConfig, arch: Architecture, interleaved_rope: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `load_layers`, one HF tensor at a time: (name, float32 array), experts
    one module each. `flat` holds NumPy or (sharded, even multi-host) `jax.Array` leaves; one
    layer's slice of a leaf is copied to the host at a time (`to_host`)."""

    def layer_slice(key, idx):
        return to_host(flat[key][idx]).astype(np.float32)

    def linear(key, idx, n_in, path):
        value = layer_slice(key, idx)
        if interleaved_rope:
            value = _permute(m, path, value, inverse=True)
        if not n_in:
            return value.reshape(-1)
        return value.reshape(int(np.prod(value.shape[:n_in])), -1).T

    for i in range(m.num_layers):
        stack, idx = layer_slot(m, i)
        pre = LAYER.format(i=i)
        is_moe = m.is_moe_layer(i)
        for suffix, path, n_in in layer_tensors(m, is_moe):
            yield pre + suffix, linear(f"params/{stack}/{path}", idx, n_in, path)
        if not is_moe:
            continue
        p = f"{pre}{arch.moe_prefixes[-1]}"
        base = f"params/{stack}/moe"
        yield f"{p}.gate.weight", linear(f"{base}/router/kernel", idx, 1, "moe/router/kernel")
        for name, hf_name in zip(("w_gate", "w_up", "w_down"), arch.legacy_expert):
            experts = layer_slice(f"{base}/experts/{name}", idx)
            for e in range(experts.shape[0]):
                yield f"{p}.experts.{e}.{hf_name}.weight", experts[e].T
        if arch.shared_prefix:
            for suffix, path, n_in in _shared_rows(arch):
                yield pre + suffix, linear(f"params/{stack}/{path}", idx, n_in, path)
        for suffix, path, n_in in arch.extra_moe_rows:
            yield pre + suffix, linear(f"params/{stack}/{path}", idx, n_in, path).reshape(1, -1)
        bias_key = f"router_bias/{stack}/moe/router/bias"
        if arch.router_bias and bias_key in flat:
            yield pre + arch.router_bias, layer_slice(bias_key, idx)
