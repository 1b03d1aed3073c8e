"""Where layer i of a checkpoint lives in the scanned moejax parameter tree, and the HF
config dict <-> moejax config conversion.

Scanned stacks (`moejax.models.transformer`): the first `first_k_dense` layers are
`dense_layers[i]`; the rest are `moe_layers[p]` (`moe_every = 1`) or, per period p of
`moe_every` layers, `moe_periods/dense[p, r]` then `moe_periods/moe_block[p]`. Any other
layout (`model.layer_kinds`) is its runs of identical layers, layer i being `runs_<r>[j]`.

The layout keys (`mlp_only_layers`, `decoder_sparse_step`, `first_k_dense_replace`) give
each layer's FFN (`hf_moe_layers`, as transformers decides it); a layout that is a dense
prefix then periods imports as `first_k_dense` / `moe_every`, any other as `layer_kinds`
(`fit_layout`). Export writes the keys back from the per-layer layout (Qwen-MoE: the old
`decoder_sparse_step` / `mlp_only_layers` pair for periodic layouts, else step 1 with every
dense layer in `mlp_only_layers`), and checks the round trip layer by layer.
"""

from __future__ import annotations

import dataclasses

from moejax.config.validation import validate_model
from moejax.config_section import ConfigError
from moejax.hf.architectures import (
    ARCHITECTURES,
    DEEPSEEK_V2,
    DEEPSEEK_V3,
    IGNORED,
    LLAMA,
    MIXTRAL,
    MLA_ARCHITECTURES,
    OLMOE,
    QWEN2_MOE,
    QWEN3_MOE,
    Architecture,
    architecture_of,
    fit_layout,
    hf_moe_layers,
)
from moejax.models.config import ModelConfig
from moejax.moe.config import MoEConfig


def layer_slot(m: ModelConfig, i: int) -> tuple[str, tuple[int, ...]]:
    """(stack path, index into its leading layer axes) of layer i."""
    if m.periodic is None:
        for r, (_, start, length) in enumerate(m.layer_runs):
            if start <= i < start + length:
                return f"runs_{r}", (i - start,)
    first_k, every = m.periodic
    prefix = m.num_layers if every == 0 else first_k
    if i < prefix:
        return "dense_layers", (i,)
    p, r = divmod(i - first_k, every)
    if every == 1:
        return "moe_layers", (p,)
    if r == every - 1:
        return "moe_periods/moe_block", (p,)
    return "moe_periods/dense", (p, r)


def _rope(hf: dict, model: dict, problems: list[str]) -> None:
    rope = dict(hf.get("rope_parameters") or {})
    kind = rope.pop("rope_type", "default")
    if kind != "default":
        problems.append(f"rope_parameters.rope_type={kind!r} (only 'default' RoPE is supported)")
    if "rope_theta" in rope:
        model["rope_theta"] = float(rope.pop("rope_theta"))
    if rope:
        problems.append(f"rope_parameters keys {sorted(rope)}")


def from_hf_config(hf: dict, **overrides) -> tuple[Architecture, ModelConfig, MoEConfig]:
    """HF `config.json` (a dict) -> (architecture, ModelConfig, MoEConfig); `overrides` set
    ModelConfig fields that do not change the function (dtype, param_dtype, remat, ...)."""
    arch = architecture_of(hf)
    sections: dict[str, dict] = {"model": {}, "moe": {}}
    unknown, problems = [], []
    for key, value in hf.items():
        if key in arch.keys:
            target, convert = arch.keys[key]
            section, field = target.split(".")
            sections[section][field] = convert(value)
        elif key in arch.required:
            if value not in arch.required[key]:
                problems.append(f"{key}={value!r} (supported: {list(arch.required[key])})")
        elif key == "rope_parameters":
            _rope(hf, sections["model"], problems)
        elif key not in IGNORED and key not in arch.ignored:
            unknown.append(key)
    if arch.finish is not None:
        arch.finish(hf, sections, problems)
    if unknown or problems:
        raise ConfigError(
            f"{arch.name} config.json: "
            + "; ".join(
                ([f"unsupported key(s) {sorted(unknown)}"] if unknown else [])
                + ([f"unsupported value(s): {', '.join(problems)}"] if problems else [])
            )
            + ". moejax.hf would compute a different function, so nothing was loaded."
        )
    moe_layers = hf_moe_layers(arch, hf)
    sections["model"].update(fit_layout(moe_layers))
    for target, value in arch.constants.items():
        section, field = target.split(".")
        if not (target == "model.moe_every" and "layer_kinds" in sections["model"]):
            sections[section].setdefault(field, value)
    if not any(moe_layers):  # no MoE layer: the MoE section does not matter
        sections["moe"] = {}
    if sections["moe"].get("selection") == "sigmoid_bias":
        missing = [f for f in sections["moe"] if f not in _fields(MoEConfig)]
        if missing:
            raise ConfigError(
                f"{arch.name} with MoE layers needs the DeepSeek-V3 `sigmoid_bias` router and "
                f"its MoEConfig fields {missing}, which this moejax does not have yet."
            )
    try:
        model = ModelConfig(**{**sections["model"], **overrides})
        moe = MoEConfig(**sections["moe"])
    except TypeError as e:
        raise ConfigError(f"{arch.name}: {e}") from None
    validate_model(model, moe)
    return arch, model, moe


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# Fields that change what a model computes; every other field (dtypes, remat, dispatch,
# initialisation, losses) is free when exporting. The layer layout (first_k_dense,
# moe_every, layer_kinds) is compared as the per-layer list, `ModelConfig.layer_layout`.
MODEL_FUNCTION_FIELDS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "d_ff",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "attention",
    "attention_bias",
    "qk_norm",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
MOE_FUNCTION_FIELDS = (
    "num_experts",
    "top_k",
    "d_expert",
    "n_shared",
    "d_shared",
    "shared_gate",
    "scorer",
    "selection",
    "renormalize",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "group_mask",
)
# MLA's fields: unused by every architecture with plain multi-head attention.
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
UNUSED_BY = {  # fields that do not matter for an architecture (so are not checked)
    "LlamaForCausalLM": {
        *MLA_FIELDS,
    },
    "MixtralForCausalLM": {
        "d_ff",
        *MLA_FIELDS,
    },
    "Qwen2MoeForCausalLM": {
        *MLA_FIELDS,
    },
    "Qwen3MoeForCausalLM": {
        *MLA_FIELDS,
    },
    "OlmoeForCausalLM": {
        "d_ff",
        *MLA_FIELDS,
    },
    "DeepseekV2ForCausalLM": {"num_kv_heads", "head_dim"},
    "DeepseekV3ForCausalLM": {"num_kv_heads", "head_dim"},
}


def to_hf_config(arch: Architecture, model: ModelConfig, moe: MoEConfig) -> dict:
    """The HF config.json dict of `arch` for this model; raises ConfigError if the model
    computes something `arch` cannot express (the round trip is then checked field by field:
    reading the dict back must give the same function fields)."""
    values = {"model": dataclasses.asdict(model), "moe": dataclasses.asdict(moe)}
    hf: dict = {
        "architectures": [arch.name],
        "model_type": arch.model_type,
        "hidden_act": "silu",
        "dtype": "float32",
        "rope_parameters": {"rope_theta": model.rope_theta, "rope_type": "default"},
    }
    for key, (target, _) in arch.keys.items():
        if key == "rope_theta":
            continue
        section, field = target.split(".")
        if section == "moe" and not model.num_moe_layers:
            continue
        if field in values[section]:
            value = values[section][field]
            if key in ("head_dim", "q_lora_rank") and value == 0:
                value = None
            hf[key] = value
    for key, accepted in arch.required.items():
        if accepted[0] is not None and key != "hidden_act":
            hf[key] = accepted[0]
    n = model.num_layers
    if arch is QWEN2_MOE or arch is QWEN3_MOE:
        if model.periodic is not None:
            first_k, every = model.periodic
            hf.update(decoder_sparse_step=max(every, 1), mlp_only_layers=list(range(first_k)))
        else:  # a per-layer layout: every dense layer named
            dense = [i for i, kind in enumerate(model.layer_layout) if not kind.moe]
            hf.update(decoder_sparse_step=1, mlp_only_layers=dense)
        if not model.num_moe_layers:
            hf.update(num_experts=0, mlp_only_layers=list(range(n)))
    if arch is QWEN3_MOE:
        hf.setdefault("head_dim", model.resolved_head_dim)
    if arch is DEEPSEEK_V2:
        hf.update(
            topk_method="group_limited_greedy" if moe.n_group > 1 else "greedy",
            n_group=moe.n_group,
            topk_group=moe.topk_group,
        )
    if arch.name in MLA_ARCHITECTURES:
        hf.pop("moe_layer_freq", None)  # transformers does not read it (only the value 1)
        hf.update(
            first_k_dense_replace=n - model.num_moe_layers,
            num_key_value_heads=model.num_heads,
        )
        if arch is DEEPSEEK_V3:
            hf.update(rope_interleave=True, num_nextn_predict_layers=0)
        if not model.num_moe_layers:
            hf.update(
                n_routed_experts=1,
                num_experts_per_tok=1,
                n_group=1,
                topk_group=1,
                moe_intermediate_size=1,
                n_shared_experts=0,
            )
    _check_round_trip(arch, hf, model, moe)
    return hf


def _check_round_trip(arch: Architecture, hf: dict, model: ModelConfig, moe: MoEConfig):
    try:
        _, back_m, back_moe = from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"cannot export as {arch.name}: {e}") from None
    skip = UNUSED_BY[arch.name]
    diffs = [
        f"model.{f}={getattr(model, f)!r}"
        for f in MODEL_FUNCTION_FIELDS
        if f not in skip and getattr(model, f) != getattr(back_m, f)
    ]
    if model.layer_layout != back_m.layer_layout:
        diffs.append(
            f"the layer layout {','.join(map(str, model.layer_layout))} (first_k_dense="
            f"{model.first_k_dense}, moe_every={model.moe_every}, layer_kinds="
            f"{model.layer_kinds!r})"
        )
    if model.num_moe_layers:
        diffs += [
            f"moe.{f}={getattr(moe, f)!r}"
            for f in MOE_FUNCTION_FIELDS
            if hasattr(moe, f) and getattr(moe, f) != getattr(back_moe, f, None)
        ]
    if diffs:
        raise ConfigError(f"{arch.name} cannot express {', '.join(diffs)}.")


def choose_architecture(model: ModelConfig, moe: MoEConfig) -> tuple[Architecture, dict]:
    """The first HF architecture that expresses this model exactly, and its config dict."""
    shapes = {
        (kind.num_experts or moe.num_experts, kind.top_k or moe.top_k)
        for kind in model.layer_layout
        if kind.moe
    }
    if len(shapes) > 1:  # e.g. a model pruned to different expert counts (moejax.compress)
        raise ConfigError(
            f"the MoE layers have different (experts, top-k) {sorted(shapes)} "
            f"(model.layer_kinds={model.layer_kinds!r}); no Hugging Face architecture moejax "
            f"exports ({', '.join(sorted(ARCHITECTURES))}) has a per-layer expert count or "
            f"top-k, so this model cannot be exported. Prune or merge to the same count in "
            f"every MoE layer to export."
        )
    if model.attention == "mla":
        order = (DEEPSEEK_V3, DEEPSEEK_V2)
    elif not model.num_moe_layers:
        order = (LLAMA, QWEN2_MOE, QWEN3_MOE)
    else:
        order = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)
    reasons = []
    for arch in order:
        try:
            return arch, to_hf_config(arch, model, moe)
        except ConfigError as e:
            reasons.append(str(e))
    raise ConfigError(
        "no Hugging Face architecture expresses this model: "
        + " | ".join(reasons)
        + f" (supported: {sorted(ARCHITECTURES)})."
    )


__all__ = ["layer_slot", "from_hf_config", "to_hf_config", "choose_architecture", "MIXTRAL"]
