"""Hugging Face safetensors <-> moejax variables, driven by the tables in `architectures`.

Import fills a NumPy copy of the model's (scanned) variable tree, tensor by tensor, and then
checks that every checkpoint tensor was used and every moejax leaf was filled, naming what
is left over. Routed experts are read from either layout: transformers 5.x fused tensors
(`experts.gate_up_proj [E, 2I, d]`, `experts.down_proj [E, d, I]`) or one module per expert
(`experts.{e}.gate_proj.weight [I, d]`, ...; Mixtral's legacy `w1/w3/w2`). Export writes the
per-expert layout, which transformers 4.x and 5.x both load.
"""

from __future__ import annotations

import json

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
    Architecture,
    shared_rows,
)
from moejax.hf.layout import layer_slot
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


def attention_rows(m: ModelConfig):
    if m.attention == "mla":
        return (MLA_Q_LORA if m.q_lora_rank else MLA_Q) + MLA_KV
    return GQA + (GQA_BIAS if m.attention_bias else ())


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


class Assembler:
    """Fills the flat moejax variable dict {"collection/path": array} layer by layer."""

    def __init__(
        self,
        flat_shapes: dict[str, tuple[int, ...]],
        m: ModelConfig,
        arch: Architecture,
        interleaved_rope: bool,
    ):
        self.arrays = {k: np.zeros(s, np.float32) for k, s in flat_shapes.items()}
        self.filled: dict[str, int] = {}
        self.m, self.arch, self.interleaved = m, arch, interleaved_rope

    def put(self, key: str, idx: tuple[int, ...], value: np.ndarray, source: str):
        if key not in self.arrays:
            raise ConfigError(f"{source} maps to {key}, which this model does not have.")
        target = self.arrays[key]
        sub = target.shape[len(idx) :]
        if value.size != int(np.prod(sub)):
            raise ConfigError(f"{source} has shape {value.shape}; {key} needs {sub}.")
        target[idx] = value.reshape(sub)
        self.filled[key] = self.filled.get(key, 0) + 1

    def put_linear(self, stack: str, path: str, idx, weight: np.ndarray, n_in: int, source: str):
        """An HF `[out, in]` weight (n_in > 0) or vector (n_in = 0) -> params/stack/path."""
        value = weight.T if n_in else weight
        key = f"params/{stack}/{path}"
        if key in self.arrays:
            sub = self.arrays[key].shape[len(idx) :]
            if value.size == int(np.prod(sub)):
                value = value.reshape(sub)
        if self.interleaved:
            value = _permute(self.m, path, value, inverse=False)
        self.put(key, idx, value, source)

    def missing(self) -> list[str]:
        return sorted(k for k in self.arrays if k not in self.filled)


def layer_tensors(m: ModelConfig, moe_layer: bool):
    """(hf_suffix, block path, n_in) rows of one layer, without the routed experts."""
    return NORMS + attention_rows(m) + (() if moe_layer else DENSE_MLP)


def load_layers(reader: TensorReader, asm: Assembler, m: ModelConfig, arch: Architecture):
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return reader.get(name)

    keys = reader.keys()
    for i in range(m.num_layers):
        stack, idx = layer_slot(m, i)
        pre = LAYER.format(i=i)
        is_moe = m.is_moe_layer(i)
        rows = layer_tensors(m, is_moe)
        for suffix, path, n_in in rows:
            if pre + suffix not in keys:
                raise ConfigError(f"checkpoint has no tensor {pre + suffix}.")
            asm.put_linear(stack, path, idx, take(pre + suffix), n_in, pre + suffix)
        if not is_moe:
            continue
        prefix = next((p for p in arch.moe_prefixes if f"{pre}{p}.gate.weight" in keys), None)
        if prefix is None:
            raise ConfigError(
                f"layer {i} should be MoE but the checkpoint has no "
                f"{pre}{arch.moe_prefixes[0]}.gate.weight."
            )
        p = f"{pre}{prefix}"
        asm.put_linear(
            stack, "moe/router/kernel", idx, take(f"{p}.gate.weight"), 1, f"{p}.gate.weight"
        )
        _load_experts(keys, take, asm, f"params/{stack}/moe/experts", idx, p, arch)
        if arch.shared_prefix:
            for suffix, path, n_in in _shared_rows(arch):
                asm.put_linear(stack, path, idx, take(pre + suffix), n_in, pre + suffix)
        for suffix, path, n_in in arch.extra_moe_rows:
            asm.put_linear(stack, path, idx, take(pre + suffix), n_in, pre + suffix)
        if arch.router_bias and pre + arch.router_bias in keys:
            asm.put(
                f"router_bias/{stack}/moe/router/bias",
                idx,
                take(pre + arch.router_bias),
                pre + arch.router_bias,
            )
    return used


def _shared_rows(arch: Architecture):
    return shared_rows(arch.shared_prefix)


def _load_experts(keys, take, asm: Assembler, base: str, idx, p: str, arch: Architecture):
    if f"{p}.experts.gate_up_proj" in keys:  # transformers 5.x fused layout
        gate_up = take(f"{p}.experts.gate_up_proj")  # [E, 2I, d]
        inter = gate_up.shape[1] // 2
        down = take(f"{p}.experts.down_proj")  # [E, d, I]
        src = f"{p}.experts.gate_up_proj"
        asm.put(f"{base}/w_gate", idx, gate_up[:, :inter].transpose(0, 2, 1), src)
        asm.put(f"{base}/w_up", idx, gate_up[:, inter:].transpose(0, 2, 1), src)
        asm.put(f"{base}/w_down", idx, down.transpose(0, 2, 1), f"{p}.experts.down_proj")
        return
    num = asm.arrays[f"{base}/w_gate"].shape[len(idx)]
    for name, hf_name in zip(("w_gate", "w_up", "w_down"), arch.legacy_expert):
        names = [f"{p}.experts.{e}.{hf_name}.weight" for e in range(num)]
        absent = [n for n in names if n not in keys]
        if absent:
            raise ConfigError(f"checkpoint has neither {p}.experts.gate_up_proj nor {absent[0]}.")
        asm.put(f"{base}/{name}", idx, np.stack([take(n).T for n in names]), names[0])


def export_layers(
    flat: dict[str, np.ndarray], m: ModelConfig, arch: Architecture, interleaved_rope: bool
) -> dict[str, np.ndarray]:
    """The inverse of `load_layers`: {hf tensor name: array}, experts one module each."""
    out: dict[str, np.ndarray] = {}

    def linear(key, idx, n_in, path):
        value = np.asarray(flat[key][idx], np.float32)
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
            out[pre + suffix] = linear(f"params/{stack}/{path}", idx, n_in, path)
        if not is_moe:
            continue
        p = f"{pre}{arch.moe_prefixes[-1]}"
        base = f"params/{stack}/moe"
        out[f"{p}.gate.weight"] = linear(f"{base}/router/kernel", idx, 1, "moe/router/kernel")
        experts = {
            n: np.asarray(flat[f"{base}/experts/{n}"][idx], np.float32)
            for n in ("w_gate", "w_up", "w_down")
        }
        for e in range(experts["w_gate"].shape[0]):
            for name, hf_name in zip(("w_gate", "w_up", "w_down"), arch.legacy_expert):
                out[f"{p}.experts.{e}.{hf_name}.weight"] = experts[name][e].T
        if arch.shared_prefix:
            for suffix, path, n_in in _shared_rows(arch):
                out[pre + suffix] = linear(f"params/{stack}/{path}", idx, n_in, path)
        for suffix, path, n_in in arch.extra_moe_rows:
            out[pre + suffix] = linear(f"params/{stack}/{path}", idx, n_in, path).reshape(1, -1)
        bias_key = f"router_bias/{stack}/moe/router/bias"
        if arch.router_bias and bias_key in flat:
            out[pre + arch.router_bias] = np.asarray(flat[bias_key][idx], np.float32)
    return out
