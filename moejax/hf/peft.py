"""peft LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) <-> moejax LoRA.

peft (huggingface/peft, `tuners/lora`) stores, for each adapted `nn.Linear` of the base,
`base_model.model.<module>.lora_A.weight [r, in]` and `.lora_B.weight [out, r]` and computes
`y = W x + s B A x` with `s = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`).
moejax's plain LoRA keeps `a[1, d_in, r] = A^T` and `b[1, r, d_out] = B^T` in the child
`lora_<param>` of the adapted module (`moejax.lora.adapter`), with the same scale, and the
flattened (head, dim) output order of q/k/v and input order of o, which is HF's.

Supported modules: attention `self_attn.{q,k,v,o}_proj` (grouped-query attention) and the
dense MLP `mlp.{gate,up,down}_proj` of each layer, every layer adapted the same way. Options
that change the function in ways moejax does not express (DoRA, trained biases, modules to
save, per-module ranks or alphas, a subset of layers, fan-in-fan-out Conv1D weights, ...)
raise a ConfigError naming the option.
"""

from __future__ import annotations

import json
import re
from typing import Any

import flax.traverse_util
import jax.numpy as jnp
import numpy as np

from moejax.config_section import ConfigError
from moejax.hf.layout import layer_slot
from moejax.hf.weights import abstract_variables
from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.lora.merge import check_mergeable
from moejax.lora.targets import ADAPTER_PREFIX
from moejax.models.transformer import Transformer
from moejax.paths import as_path, join, write_text

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# HF module inside `model.layers.{i}.` -> (moejax module, moejax param).
MODULES = {
    "self_attn.q_proj": ("attn", "wq"),
    "self_attn.k_proj": ("attn", "wk"),
    "self_attn.v_proj": ("attn", "wv"),
    "self_attn.o_proj": ("attn", "wo"),
    "mlp.gate_proj": ("mlp", "w_gate"),
    "mlp.up_proj": ("mlp", "w_up"),
    "mlp.down_proj": ("mlp", "w_down"),
}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")

# adapter_config.json keys that do not change the adapted function at inference.
IGNORED = (
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "init_lora_weights",
    "target_modules",
    "exclude_modules",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
    "ensure_weight_tying",
    "r",
    "lora_alpha",
    "use_rslora",
    "peft_type",
)
# Keys accepted only with these values (each value the option's off state).
REQUIRED = {
    "use_dora": (False, None),
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, {}, []),
    "target_parameters": (None, []),
    "use_bdlora": (False, None),
}


def _is_off(value: Any) -> bool:
    return value in (None, False, "", "none") or value == {} or value == []


def check_peft_config(cfg: dict, where: str) -> None:
    """Raises ConfigError naming the first option moejax cannot reproduce."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            f"{where}: peft_type={cfg.get('peft_type')!r}; moejax reads LoRA "
            f"adapters (peft_type 'LORA') only."
        )
    for key, value in cfg.items():
        if key in IGNORED:
            continue
        if key in REQUIRED:
            if value not in REQUIRED[key]:
                raise ConfigError(
                    f"{where}: {key}={value!r} is not supported by moejax's LoRA "
                    f"(it needs {REQUIRED[key][0]!r}); re-train or convert the "
                    f"adapter without it."
                )
        elif not _is_off(value):
            raise ConfigError(
                f"{where}: unsupported peft option {key}={value!r} (moejax reads "
                f"plain LoRA / rsLoRA on attention and dense MLP projections)."
            )


def _read(adapter_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load

    path = as_path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"{adapter_dir} has no {CONFIG_NAME}; point adapter= at a peft adapter directory."
        )
    cfg = json.loads(path.read_text())
    weights = as_path(adapter_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(
            f"{adapter_dir} has no {WEIGHTS_NAME} (moejax does not read "
            f"adapter_model.bin; re-save the adapter with safetensors)."
        )
    return cfg, {k: np.asarray(v, np.float32) for k, v in load(weights.read_bytes()).items()}


def _lora_path(m, module: str, param: str, i: int) -> tuple[str, tuple[int, ...]]:
    stack, idx = layer_slot(m, i)
    return f"params/{stack}/{module}/{ADAPTER_PREFIX}{param}", idx


def load_adapter(
    model: Transformer, variables: dict, adapter_dir: str
) -> tuple[Transformer, dict[str, Any]]:
    """(model with `lora`, variables with the adapters) from a peft adapter directory."""
    cfg, tensors = _read(adapter_dir)
    check_peft_config(cfg, adapter_dir)
    m = model.model
    if m.attention != "gqa":
        raise ConfigError(
            f"{adapter_dir}: adapters on model.attention={m.attention!r} are not "
            f"supported (grouped-query attention only)."
        )
    found: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match or match.group(2) not in MODULES:
            raise ConfigError(
                f"{adapter_dir}: adapter tensor {key!r} is not on a supported "
                f"module ({', '.join(MODULES)} of model.layers.<i>)."
            )
        i, hf_module, which = int(match.group(1)), match.group(2), match.group(3)
        found.setdefault(MODULES[hf_module], {}).setdefault(i, {})[which] = value
    if not found:
        raise ConfigError(f"{adapter_dir}: {WEIGHTS_NAME} holds no LoRA tensors.")
    rank = int(cfg.get("r", 8))
    for (module, param), layers in found.items():
        if module == "mlp" and any(m.is_moe_layer(i) for i in range(m.num_layers)):
            raise ConfigError(
                f"{adapter_dir}: adapters on mlp.{param} of a model with MoE "
                f"layers are not supported (dense MLPs only)."
            )
        missing = sorted(set(range(m.num_layers)) - set(layers))
        if missing:
            raise ConfigError(
                f"{adapter_dir}: {module}.{param} is adapted in some layers but "
                f"not in {missing}; moejax adapts every layer alike "
                f"(layers_to_transform is not supported)."
            )
    lora = LoRAConfig(
        method="lora",
        rank=rank,
        alpha=float(cfg.get("lora_alpha", 8)),
        rslora=bool(cfg.get("use_rslora", False)),
        targets=",".join(f"{mod}.{p}" for mod, p in sorted(found)),
    )
    adapted = model.clone(adapters=adapters_for(lora))
    shapes = abstract_variables(adapted)
    flat = {
        k: np.asarray(v)
        for k, v in flax.traverse_util.flatten_dict(dict(variables), sep="/").items()
    }
    new = {k: np.zeros(s, np.float32) for k, s in shapes.items() if k not in flat}
    for (module, param), layers in found.items():
        for i, ab in layers.items():
            path, idx = _lora_path(m, module, param, i)
            for which, leaf in (("A", "a"), ("B", "b")):
                if which not in ab:
                    raise ConfigError(
                        f"{adapter_dir}: layer {i} {module}.{param} has no lora_{which}."
                    )
                target = new[f"{path}/{leaf}"]
                value = ab[which].T[None]
                if value.shape != target.shape[len(idx) :]:
                    raise ConfigError(
                        f"{adapter_dir}: layer {i} lora_{which} of {module}.{param} has shape "
                        f"{ab[which].shape}; the base model with r={rank} needs "
                        f"{target.shape[len(idx) + 1 :][::-1]}."
                    )
                target[idx] = value
    pdt = jnp.dtype(m.param_dtype)
    merged = {
        **{k: jnp.asarray(v) for k, v in flat.items()},
        **{k: jnp.asarray(v, pdt) for k, v in new.items()},
    }
    return adapted, flax.traverse_util.unflatten_dict(merged, sep="/")


def save_adapter(
    model: Transformer, variables: dict, path: str, base_model_name_or_path: str | None = None
) -> dict:
    """Writes the plain-LoRA adapters of `variables` as a peft adapter directory that
    `peft.PeftModel.from_pretrained(hf_base, path)` loads; returns the adapter config."""
    from safetensors.numpy import save

    lora = None if model.adapters is None else model.adapters.cfg
    if lora is None or lora.method == "none":
        raise ConfigError(
            "save_adapter needs a model with adapters "
            "(Transformer(..., adapters=adapters_for(lora_config)))."
        )
    check_mergeable(lora)
    m = model.model
    if m.attention != "gqa":
        raise ConfigError(f"save_adapter: model.attention={m.attention!r} has no peft layout.")
    flat = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    inverse = {v: k for k, v in MODULES.items()}
    tensors, modules = {}, set()
    for i in range(m.num_layers):
        for (module, param), hf_module in inverse.items():
            key, idx = _lora_path(m, module, param, i)
            if f"{key}/a" not in flat:
                continue
            a = np.asarray(flat[f"{key}/a"][idx], np.float32)[0]
            b = np.asarray(flat[f"{key}/b"][idx], np.float32)[0]
            name = f"{PREFIX}model.layers.{i}.{hf_module}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
            modules.add((i, hf_module))
    adapters = {k for k in flat if f"/{ADAPTER_PREFIX}" in k}
    exported = {f"{_lora_path(m, *MODULES[h], i)[0]}/{x}" for i, h in modules for x in "ab"}
    if adapters - exported:
        raise ConfigError(
            f"save_adapter: adapters {sorted(adapters - exported)[:4]} have no "
            f"peft module (supported: {', '.join(MODULES)})."
        )
    if not tensors:
        raise ConfigError("save_adapter: the variables hold no adapters.")
    # A regex target_modules matches exactly the adapted modules, layer by layer.
    names = sorted(f"model.layers.{i}.{h}" for i, h in modules)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "lora_dropout": 0.0,
        "target_modules": "^(" + "|".join(re.escape(n) for n in names) + ")$",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    as_path(path).mkdir(parents=True, exist_ok=True)
    (as_path(path) / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
    write_text(join(path, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True))
    return config
