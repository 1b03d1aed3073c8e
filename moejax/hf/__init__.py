"""Hugging Face checkpoints in moejax: `from_pretrained` reads a local transformers directory
(`config.json` + `*.safetensors`, sharded with `model.safetensors.index.json` or not) and
`save_pretrained` writes one transformers loads back.

    model, variables = moejax.hf.from_pretrained("/path/to/Qwen1.5-MoE-A2.7B")
    logits, extras = model.apply(variables, input_ids)      # float32 [B, S, V]
    moejax.hf.save_pretrained(model, variables, "/path/out")

    model, variables = moejax.hf.from_pretrained(path, mesh=mesh, rules=rules)  # sharded
    model, variables = moejax.hf.from_pretrained(base_dir, adapter="/path/peft_adapter")
    model, variables = moejax.hf.from_pretrained(          # X-LoRA over frozen peft adapters
        base_dir, adapters={"code": "/path/a", "math": "/path/b"}, method="xlora")
    moejax.hf.save_adapter(model, variables, "/path/adapter_out")   # peft loads it

peft LoRA adapters: `moejax.hf.peft` (plain LoRA and rsLoRA on attention, dense MLPs and the
routed experts). With `mesh=` every leaf is built as a sharded `jax.Array` straight from the
safetensors shards, each process reading only the slices its devices hold
(`moejax.hf.sharded`).

Architectures and config keys: `moejax.hf.architectures` (one table per architecture). The
variables are `{"params": ...}` plus, for DeepSeek-V3's `sigmoid_bias` router, the
non-trainable `{"router_bias": ...}` (`e_score_correction_bias`), in the scanned layout
(`moejax.models.transformer.unscan_params` gives the per-layer one). Needs only JAX and
`safetensors`; torch and transformers are needed by the parity tests, not here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config_section import ConfigError
from moejax.hf import peft, sharded
from moejax.hf.architectures import MLA_ARCHITECTURES, Architecture, interleaved_rope
from moejax.hf.layout import choose_architecture, from_hf_config
from moejax.hf.shard_writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter, to_host
from moejax.hf.weights import (
    Assembler,
    TensorReader,
    abstract_variables,
    export_tensors,
    load_layers,
)
from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.paths import as_path, join, write_text
from moejax.sharding.config import DEFAULT_RULES

TOP_LEVEL = (
    ("model.embed_tokens.weight", "params/embedding"),
    ("model.norm.weight", "params/final_norm/scale"),
)
LM_HEAD = "lm_head.weight"


def read_config(path: str) -> dict:
    return json.loads((as_path(path) / "config.json").read_text())


def _extra_keys(keys: set[str], used: set[str], num_layers: int) -> list[str]:
    """Checkpoint tensors left unused, except layers past num_hidden_layers (DeepSeek-V3's
    multi-token-prediction module) and rotary caches."""
    out = []
    for key in keys - used:
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) >= num_layers:
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        out.append(key)
    return sorted(out)


def from_pretrained(
    path: str,
    *,
    adapter: str | None = None,
    adapters: dict[str, str] | None = None,
    method: str = "xlora",
    mixture: dict | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules=DEFAULT_RULES,
    **model_overrides,
) -> tuple[Transformer, dict[str, Any]]:
    """(Transformer, variables) equal to the HF checkpoint in `path` (see the module doc).

    `mesh`: build every leaf as a `jax.Array` sharded by the logical `rules` (default
    `moejax.sharding.config.DEFAULT_RULES`, as `config.mesh.rules`), each process reading only
    the tensor slices its devices hold; None: plain single-device arrays.

    `adapter`: a peft LoRA adapter directory applied on top (the model then carries the
    adapters' `lora` config, `moejax.hf.peft.load_adapter`). `adapters`: {name: peft adapter
    directory}, loaded as the frozen experts of the mixture `method` ("xlora": X-LoRA; "moe":
    a router per projection, as LoRA-Mixer; expert i the i-th name) with its gating
    initialised fresh and the only trainable adapter parameter, `mixture` other `lora`
    fields of it (`moejax.hf.peft.load_adapters`). `dtype` / `param_dtype` are the
    compute and storage dtypes; `model_overrides` set other ModelConfig fields that do not
    change the function (e.g. `remat="full"`).
    """
    if adapter is not None or adapters is not None:
        if adapter is not None and adapters is not None:
            raise ConfigError(
                "from_pretrained: give adapter= (one plain LoRA) or adapters= (the experts "
                "of a mixture), not both."
            )
        if mesh is not None:
            raise ConfigError(
                "from_pretrained(adapter=..., mesh=...): peft adapters load unsharded "
                "only; load without mesh=, or place the adapted variables afterwards."
            )
        model, variables = from_pretrained(
            path, dtype=dtype, param_dtype=param_dtype, **model_overrides
        )
        if adapters is not None:
            return peft.load_adapters(model, variables, dict(adapters), method, mixture)
        return peft.load_adapter(model, variables, adapter)
    hf = read_config(path)
    arch, m, moe = from_hf_config(hf, dtype=dtype, param_dtype=param_dtype, **model_overrides)
    if not m.scan_layers:
        raise ConfigError(
            "from_pretrained builds the scanned layout; convert with "
            "moejax.models.transformer.unscan_params afterwards."
        )
    model = Transformer(m, moe)
    reader = TensorReader(path)
    asm = Assembler(abstract_variables(model), m, arch, interleaved_rope(arch, hf), reader)
    used = load_layers(reader, asm, m, arch)
    keys = reader.keys()
    top = TOP_LEVEL + (() if m.tie_embeddings else ((LM_HEAD, "params/lm_head"),))
    for name, key in top:
        if name not in keys:
            raise ConfigError(f"{path}: checkpoint has no tensor {name}.")
        asm.put_tensor(key, (), name, n_in=1 if key == "params/lm_head" else 0)
        used.add(name)
    if m.tie_embeddings:
        used.add(LM_HEAD)  # some checkpoints store the tied copy too
    extra = _extra_keys(keys, used, m.num_layers)
    missing = asm.missing()
    if extra or missing:
        raise ConfigError(
            f"{path} ({arch.name}) does not match the model its config describes: "
            + (
                f"unused checkpoint tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}; "
                if extra
                else ""
            )
            + (f"moejax variables not in the checkpoint {missing[:8]}" if missing else "")
        )
    if mesh is not None:
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
        return model, sharded.place(asm, boxed, mesh, rules, param_dtype)
    pdt = jnp.dtype(param_dtype)
    variables = flax.traverse_util.unflatten_dict(
        {
            k: jnp.asarray(v, pdt if k.startswith("params/") else jnp.float32)
            for k, v in asm.arrays().items()
        },
        sep="/",
    )
    return model, variables


def save_pretrained(
    model: Transformer,
    variables: dict[str, Any],
    path: str,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Architecture:
    """Writes `config.json` + safetensors (float32, experts one module each) that
    transformers' `AutoModelForCausalLM.from_pretrained(path)` loads as the same function.
    Returns the architecture chosen; raises ConfigError naming the settings no supported
    architecture expresses.

    The variables may be sharded `jax.Array`s (from `from_pretrained(mesh=)` or a trainer's
    state), on one host or several: one layer's slice of a leaf is gathered at a time and
    the tensors go to shards of at most `max_shard_bytes` (`moejax.hf.shard_writer`), so
    host memory holds about one shard, not the model. Every process must call this; only
    process 0 writes.
    """
    m: ModelConfig = model.model
    moe: MoEConfig = model.moe
    if not m.scan_layers:
        raise ConfigError("save_pretrained reads the scanned layout (model.scan_layers=True).")
    arch, hf = choose_architecture(m, moe)
    flat = flax.traverse_util.flatten_dict(nn.unbox(dict(variables)), sep="/")
    with ShardWriter(path, max_shard_bytes) as writer:  # a local directory or a gs:// URL
        for name, key in TOP_LEVEL:
            writer.add(name, to_host(flat[key]).astype(np.float32))
        if not m.tie_embeddings:
            writer.add(LM_HEAD, to_host(flat["params/lm_head"]).astype(np.float32).T)
        interleaved = arch.name in MLA_ARCHITECTURES
        for name, tensor in export_tensors(flat, m, arch, interleaved_rope=interleaved):
            writer.add(name, tensor)
    if writer.writes:
        write_text(join(path, "config.json"), json.dumps(hf, indent=2, sort_keys=True))
    return arch


def configs_as_dict(model: Transformer) -> dict[str, dict]:
    """The `model` and `moe` sections as plain dicts (for a moejax config file)."""
    return {"model": dataclasses.asdict(model.model), "moe": dataclasses.asdict(model.moe)}


def save_adapter(
    model: Transformer,
    variables: dict[str, Any],
    path: str,
    base_model_name_or_path: str | None = None,
) -> dict:
    """Writes moejax plain-LoRA adapters in peft's format (`moejax.hf.peft.save_adapter`)."""
    return peft.save_adapter(model, variables, path, base_model_name_or_path)


__all__ = ["from_pretrained", "save_pretrained", "save_adapter", "read_config", "configs_as_dict"]
