"""peft LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) <-> moejax LoRA.

peft (huggingface/peft, `tuners/lora`) stores, for each adapted `nn.Linear` of the base,
`base_model.model.<module>.lora_A.weight [r, in]` and `.lora_B.weight [out, r]` and computes
`y = W x + s B A x` with `s = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`).
moejax's plain LoRA keeps `a[1, d_in, r] = A^T` and `b[1, r, d_out] = B^T` in the child
`lora_<param>` of the adapted module (`moejax.lora.adapter`), with the same scale, and the
flattened (head, dim) output order of q/k/v and input order of o, which is HF's.

Supported modules: attention `self_attn.{q,k,v,o}_proj` (grouped-query attention) and the
dense MLP `mlp.{gate,up,down}_proj` of each layer, every layer adapted the same way.

Routed experts: peft's `target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`
on transformers 5.x fused experts (`lora.ParamWrapper`; the second parameter of a module
wraps the first, so gate_up's tensors are `mlp.experts.base_layer.lora_*` when both are
adapted). For a parameter `[E, out, in]` peft stores `lora_A [E r, in]` (expert-major rows:
A_e = rows e r .. e r + r) and `lora_B [out, r E]` (rank-major columns: B_e[:, j] = column
j E + e), and adds `s B_e A_e` to expert e. moejax keeps `experts/lora_w_gate|w_up|w_down`
(`a[E, d_in, r]`, `b[E, r, d_out]`): gate_up's A becomes both w_gate's and w_up's `a`, its
B's first `moe_intermediate_size` rows w_gate's `b`, the rest w_up's. On export, gate and up
adapters with different A are written as one rank-2r adapter (A stacked, B block-diagonal),
every other adapter zero-padded to 2r and `lora_alpha` scaled to keep s: the same function.
Options
that change the function in ways moejax does not express (DoRA, trained biases, modules to
save, per-module ranks or alphas, a subset of layers, fan-in-fan-out Conv1D weights, ...)
raise a ConfigError naming the option.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config_section import ConfigError
from moejax.hf.layout import layer_slot
from moejax.hf.weights import abstract_variables
from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.lora.merge import check_mergeable
from moejax.lora.methods import method_of
from moejax.lora.targets import ADAPTER_PREFIX, routed_expert_patterns
from moejax.lora.weights import lora_scale
from moejax.models.transformer import Transformer
from moejax.nn.collections import ADAPTER_FROZEN
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
    "use_bdlora": (False, None),
}


def _is_off(value: Any) -> bool:
    return value in (None, False, "", "none") or value == {} or value == []


# peft `target_parameters` moejax reads: the fused routed experts of transformers 5.x.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
EXPERT_MODULE = "mlp.experts"


def check_peft_config(cfg: dict, where: str) -> None:
    """Raises ConfigError naming the first option moejax cannot reproduce."""
    params = cfg.get("target_parameters") or []
    odd = [p for p in params if not any(p.endswith(e) for e in EXPERT_PARAMETERS)]
    if odd:
        raise ConfigError(
            f"{where}: target_parameters={params!r}: {odd} are not routed-expert parameters "
            f"moejax adapts (supported: {list(EXPERT_PARAMETERS)})."
        )
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            f"{where}: peft_type={cfg.get('peft_type')!r}; moejax reads LoRA "
            f"adapters (peft_type 'LORA') only."
        )
    for key, value in cfg.items():
        if key in IGNORED or key == "target_parameters":
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


def _expert_factors(a_hf: np.ndarray, b_hf: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """peft's fused-expert `lora_A [E r, in]`, `lora_B [out, r E]` -> moejax `a[E, in, r]`,
    `b[E, r, out]` (module docstring)."""
    r = a_hf.shape[0] // e
    a = a_hf.reshape(e, r, -1).transpose(0, 2, 1)
    b = b_hf.reshape(b_hf.shape[0], r, e).transpose(2, 1, 0)
    return a, b


def _peft_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `_expert_factors`: `a[E, in, r]`, `b[E, r, out]` -> (lora_A, lora_B)."""
    e, d_in, r = a.shape
    lora_a = a.transpose(0, 2, 1).reshape(e * r, d_in)
    lora_b = b.transpose(2, 1, 0).reshape(b.shape[2], r * e)
    return lora_a, lora_b


def _expert_adapters(where, m, moe, layers: dict[int, list[dict]]) -> dict:
    """{(param, i): (a, b)} of the routed experts from the `mlp.experts[.base_layer]` tensors
    of each MoE layer, told apart by shape: gate_up is `(in, out) = (d, 2I)`, down `(I, d)`."""
    e, d, inter = moe.num_experts, m.d_model, moe.d_expert
    out = {}
    for i, pairs in layers.items():
        if not m.is_moe_layer(i):
            raise ConfigError(f"{where}: layer {i} has expert adapters but no MoE block.")
        for ab in pairs:
            if set(ab) != {"A", "B"}:
                raise ConfigError(f"{where}: layer {i} mlp.experts has no lora_{'AB'[len(ab)]}.")
            shape = (ab["A"].shape[1], ab["B"].shape[0])
            if shape == (d, 2 * inter):
                a, b = _expert_factors(ab["A"], ab["B"], e)
                out["w_gate", i] = (a, b[:, :, :inter])
                out["w_up", i] = (a, b[:, :, inter:])
            elif shape == (inter, d):
                out["w_down", i] = _expert_factors(ab["A"], ab["B"], e)
            else:
                raise ConfigError(
                    f"{where}: layer {i} mlp.experts adapter maps {shape[0]} -> {shape[1]}, "
                    f"neither gate_up_proj ({d} -> {2 * inter}) nor down_proj ({inter} -> {d})."
                )
    return out


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
    expert_tensors: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        hf_module = match.group(2) if match else ""
        wrapped = hf_module.removesuffix(".base_layer")
        if not match or (hf_module not in MODULES and wrapped != EXPERT_MODULE):
            raise ConfigError(
                f"{adapter_dir}: adapter tensor {key!r} is not on a supported "
                f"module ({', '.join(MODULES)}, or the {EXPERT_MODULE} parameters "
                f"{list(EXPERT_PARAMETERS)} of model.layers.<i>)."
            )
        i, which = int(match.group(1)), match.group(3)
        if wrapped == EXPERT_MODULE:
            expert_tensors.setdefault(i, {}).setdefault(hf_module, {})[which] = value
        else:
            found.setdefault(MODULES[hf_module], {}).setdefault(i, {})[which] = value
    if not found and not expert_tensors:
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
    experts = _expert_adapters(
        adapter_dir, m, model.moe, {i: list(t.values()) for i, t in expert_tensors.items()}
    )
    moe_layers = {i for i in range(m.num_layers) if m.is_moe_layer(i)}
    for param in sorted({p for p, _ in experts}):
        missing = sorted(moe_layers - {i for p, i in experts if p == param})
        if missing:
            raise ConfigError(
                f"{adapter_dir}: experts.{param} is adapted in some MoE layers but not in "
                f"{missing}; moejax adapts every layer alike."
            )
        found[("experts", param)] = {}
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

    def put(path, idx, leaf, value, what):
        target = new[f"{path}/{leaf}"]
        if value.shape != target.shape[len(idx) :]:
            raise ConfigError(
                f"{adapter_dir}: {what} has shape {value.shape}; the base model with r={rank} "
                f"needs {target.shape[len(idx) :]} (moejax's a[E, in, r] / b[E, r, out])."
            )
        target[idx] = value

    for (module, param), layers in found.items():
        for i, ab in layers.items():
            path, idx = _lora_path(m, module, param, i)
            for which, leaf in (("A", "a"), ("B", "b")):
                if which not in ab:
                    raise ConfigError(
                        f"{adapter_dir}: layer {i} {module}.{param} has no lora_{which}."
                    )
                put(path, idx, leaf, ab[which].T[None], f"layer {i} lora_{which} of {param}")
    for (param, i), (a, b) in experts.items():
        path, idx = _lora_path(m, "moe/experts", param, i)
        put(path, idx, "a", a, f"layer {i} experts.{param} lora_A")
        put(path, idx, "b", b, f"layer {i} experts.{param} lora_B")
    pdt = jnp.dtype(m.param_dtype)
    merged = {
        **{k: jnp.asarray(v) for k, v in flat.items()},
        **{k: jnp.asarray(v, pdt) for k, v in new.items()},
    }
    return adapted, flax.traverse_util.unflatten_dict(merged, sep="/")


# Mixture methods whose experts can be loaded adapters, and their gating: X-LoRA's classifier
# on a no-adapter pass; `moe`, a softmax router per adapted projection (LoRA-Mixer's frozen
# experts behind a trainable router, Li et al. 2025, arXiv 2507.00029, without its
# specialisation-balance loss).
MIXTURE_METHODS = ("xlora", "moe")


def _fresh_gating(mixed: Transformer, keys: list[str], seed: int) -> dict[str, np.ndarray]:
    """The mixture's gating leaves `keys` freshly initialised: one jitted init of the model
    that returns only them (XLA drops the base's initialisers as dead code)."""

    def init(rng):
        tree = mixed.init(rng, jnp.zeros((1, 1), jnp.int32))
        flat = flax.traverse_util.flatten_dict(nn.unbox(tree), sep="/")
        return {k: flat[k] for k in keys}

    return {k: np.asarray(v) for k, v in jax.jit(init)(jax.random.PRNGKey(seed)).items()}


def load_adapters(
    model: Transformer,
    variables: dict,
    adapters: dict[str, str],
    method: str = "xlora",
    mixture: dict | None = None,
    seed: int = 0,
) -> tuple[Transformer, dict[str, Any]]:
    """N peft LoRA adapters as the frozen experts of one mixture method (`MIXTURE_METHODS`:
    X-LoRA, Buehler & Buehler 2024; `moe`, a router per projection as LoRA-Mixer): expert i
    is the i-th adapter of `adapters` (name -> directory); their A and B live in
    `lora_frozen` (`lora.frozen_experts`), so only the gating (X-LoRA's classifier, the
    routers; initialised fresh from `seed`) is a trainable adapter parameter. Every adapter
    must adapt the same modules with the same rank; differing `lora_alpha` / `use_rslora`
    are folded into each expert's B (the model keeps the first adapter's scale). `mixture`:
    other `lora` fields of the mixture (e.g. `top_k`, `xlora_temperature`); `moe` routes
    every token to all N experts (`top_k=N`, dense softmax) unless it says otherwise."""
    if method not in MIXTURE_METHODS:
        raise ConfigError(
            f"adapters=... with method={method!r}: moejax loads several peft adapters as "
            f"the frozen experts of {sorted(MIXTURE_METHODS)} only."
        )
    if not adapters:
        raise ConfigError("adapters={} names no adapter directory.")
    loaded = {}
    for name, adapter_dir in adapters.items():
        adapted, adapted_vars = load_adapter(model, variables, adapter_dir)
        loaded[name] = (
            adapted.adapters.cfg,
            flax.traverse_util.flatten_dict(adapted_vars, sep="/"),
        )
    first, (cfg0, _) = next(iter(loaded.items()))
    for name, (cfg, _) in loaded.items():
        for field, what in (("targets", "adapts"), ("rank", "has rank r =")):
            if getattr(cfg, field) != getattr(cfg0, field):
                raise ConfigError(
                    f"adapter {name!r} ({adapters[name]}) {what} {getattr(cfg, field)!r} but "
                    f"adapter {first!r} ({adapters[first]}) {what} {getattr(cfg0, field)!r}; "
                    f"the experts of one {method} mixture need the same targets and rank."
                )
    if routed_expert_patterns(cfg0):
        raise ConfigError(
            f"adapter {first!r} ({adapters[first]}) adapts the routed experts "
            f"({routed_expert_patterns(cfg0)}); {method} mixes adapters on attention and "
            f"dense MLP projections only."
        )
    top_k = len(adapters) if method == "moe" else 1
    fields = dict(method=method, num_experts=len(adapters), top_k=top_k, frozen_experts=True)
    lora = dataclasses.replace(cfg0, **{**fields, **(mixture or {})})
    method_of(lora).check(lora)
    mixed = model.clone(adapters=adapters_for(lora))
    base = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    shapes = abstract_variables(mixed)
    fresh = [k for k in shapes if k not in base and not k.startswith(ADAPTER_FROZEN + "/")]
    gating = _fresh_gating(mixed, fresh, seed)
    pdt = jnp.dtype(model.model.param_dtype)
    out = {}
    for key, shape in shapes.items():
        if key in base or key in gating:  # the gating keeps its initialiser's dtype
            out[key] = base[key] if key in base else jnp.asarray(gating[key])
            continue
        if key.startswith(ADAPTER_FROZEN + "/"):
            src = "params/" + key.removeprefix(ADAPTER_FROZEN + "/")
            parts = []
            for cfg, flat in loaded.values():
                factor = lora_scale(cfg) / lora_scale(lora) if key.endswith("/b") else 1.0
                parts.append(np.asarray(flat[src], np.float32) * factor)
            value = np.concatenate(parts, axis=-3)  # the expert axis of a[.., E, in, r]
        else:
            raise ConfigError(f"load_adapters: no value for {key} of the {method} model.")
        if tuple(value.shape) != tuple(shape):
            raise ConfigError(f"load_adapters: {key} has shape {value.shape}, needs {shape}.")
        out[key] = jnp.asarray(value, pdt)
    return mixed, flax.traverse_util.unflatten_dict(out, sep="/")


def _pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`a[..., in, r]`, `b[..., r, out]` zero-padded to rank `rank` (the same product)."""
    extra = rank - a.shape[-1]
    a = np.concatenate([a, np.zeros(a.shape[:-1] + (extra,), a.dtype)], -1)
    b = np.concatenate([b, np.zeros(b.shape[:-2] + (extra,) + b.shape[-1:], b.dtype)], -2)
    return a, b


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

    def factors(key, idx):
        if f"{key}/a" not in flat:
            return None
        return (
            np.asarray(flat[f"{key}/a"][idx], np.float32),
            np.asarray(flat[f"{key}/b"][idx], np.float32),
        )

    plain, fused, exported = {}, {}, set()
    for i in range(m.num_layers):
        for (module, param), hf_module in inverse.items():
            key, idx = _lora_path(m, module, param, i)
            ab = factors(key, idx)
            if ab is not None:
                plain[i, hf_module] = (ab[0][0], ab[1][0])  # [in, r], [r, out]
                exported.add(key)
        if not m.is_moe_layer(i):
            continue
        ex = {}
        for param in ("w_gate", "w_up", "w_down"):
            key, idx = _lora_path(m, "moe/experts", param, i)
            ab = factors(key, idx)
            if ab is not None:
                ex[param] = ab
                exported.add(key)
        fused[i] = ex
    rank = lora.rank
    gu = [ex for ex in fused.values() if "w_gate" in ex and "w_up" in ex]
    if any(not np.array_equal(ex["w_gate"][0], ex["w_up"][0]) for ex in gu):
        rank = 2 * lora.rank  # gate and up with their own A: one adapter of rank 2r
    tensors = {}

    def write(name, a, b):  # a [in, r], b [r, out] of a plain module
        a, b = _pad_rank(a, b, rank)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)

    modules, params = set(), set()
    for (i, hf_module), (a, b) in plain.items():
        write(f"{PREFIX}model.layers.{i}.{hf_module}", a, b)
        modules.add(f"model.layers.{i}.{hf_module}")
    inter = model.moe.d_expert
    for i, ex in fused.items():
        name = f"{PREFIX}model.layers.{i}.{EXPERT_MODULE}"
        slots = []
        if "w_gate" in ex or "w_up" in ex:
            a_g, b_g = ex.get("w_gate", (None, None))
            a_u, b_u = ex.get("w_up", (None, None))
            e = (a_g if a_g is not None else a_u).shape[0]
            zeros_b = np.zeros((e, lora.rank, inter), np.float32)
            if a_g is None or a_u is None or np.array_equal(a_g, a_u):
                a = a_g if a_g is not None else a_u
                b = np.concatenate(
                    [zeros_b if b_g is None else b_g, zeros_b if b_u is None else b_u], -1
                )
            else:  # A stacked, B block-diagonal: rank 2r
                a = np.concatenate([a_g, a_u], -1)
                b = np.concatenate(
                    [
                        np.concatenate([b_g, np.zeros_like(b_g)], -1),
                        np.concatenate([np.zeros_like(b_u), b_u], -1),
                    ],
                    -2,
                )
            slots.append(("mlp.experts.gate_up_proj", _pad_rank(a, b, rank)))
        if "w_down" in ex:
            slots.append(("mlp.experts.down_proj", _pad_rank(*ex["w_down"], rank)))
        for n, (param, (a, b)) in enumerate(slots):
            # peft nests a module's second adapted parameter around the first.
            prefix = name + (".base_layer" if n < len(slots) - 1 else "")
            lora_a, lora_b = _peft_factors(a, b)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(lora_a)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(lora_b)
            params.add(param)
    adapters = {k.rsplit("/", 1)[0] for k in flat if f"/{ADAPTER_PREFIX}" in k}
    if adapters - exported:
        raise ConfigError(
            f"save_adapter: adapters {sorted(adapters - exported)[:4]} have no "
            f"peft module (supported: {', '.join(MODULES)}, experts.w_gate|w_up|w_down)."
        )
    if not tensors:
        raise ConfigError("save_adapter: the variables hold no adapters.")
    # Zero-padded ranks keep s = alpha / r (alpha / sqrt(r) with rsLoRA) when alpha scales too.
    grow = rank / lora.rank
    alpha = lora.alpha * (grow**0.5 if lora.rslora else grow)
    # A regex target_modules matches exactly the adapted modules, layer by layer.
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": lora.rslora,
        "lora_dropout": 0.0,
        "target_modules": (
            "^(" + "|".join(re.escape(n) for n in sorted(modules)) + ")$" if modules else []
        ),
        "target_parameters": sorted(params) or None,
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
