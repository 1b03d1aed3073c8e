"""One mapping table per Hugging Face architecture: config keys -> moejax config fields, and
tensor names -> moejax parameter paths.

Supported: `LlamaForCausalLM` (dense), `MixtralForCausalLM` (Jiang et al., 2024: softmax
top-k, renormalised), `Qwen2MoeForCausalLM` (q/k/v biases, softmax top-k, a shared expert of
its own width behind a sigmoid gate), `Qwen3MoeForCausalLM` (per-head q/k RMSNorm, no shared
expert), `OlmoeForCausalLM` (q/k RMSNorm over the whole projection), `DeepseekV2ForCausalLM`
(MLA with interleaved RoPE; softmax router, `topk_method` greedy or group_limited_greedy, a
routed scaling factor, shared experts; its first `first_k_dense_replace` layers dense) and
`DeepseekV3ForCausalLM` (MLA; sigmoid router with a selection-only bias and group-limited
top-k, the `sigmoid_bias` router; its first `first_k_dense_replace` layers dense). A config
key is either mapped (`keys`), accepted only with the values moejax computes (`required`),
or listed as not affecting the forward pass (`IGNORED`, `ignored`); any other key, or a
required key with another value, is refused with an error naming it. The layer-layout keys
(`mlp_only_layers`, `decoder_sparse_step`, `first_k_dense_replace`; `moe_layer_freq` only
as 1, the one value transformers and DeepSeek's code agree on) decide which layers are MoE
(`hf_moe_layers`), which `fit_layout` turns into moejax's layout fields.

Tensor rows are `(hf_suffix, moejax_path, n_in)` inside `model.layers.{i}.`: the moejax
parameter is `W.T` reshaped (HF linear weights are `[out, in]`), `n_in` being how many
leading moejax dims form the input (export: reshape to `[prod(shape[:n_in]), -1]`, then
transpose); `n_in = 0` is a plain reshape (norm scales, biases).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from moejax.config_section import ConfigError
from moejax.models.config import periodic_layout

# Keys that do not change the function the checkpoint computes (generation defaults, token
# ids, bookkeeping, training-only settings such as dropout and router jitter).
IGNORED = (
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "max_position_embeddings",
    "output_router_logits",
    "attention_dropout",
    "_name_or_path",
    "id2label",
    "label2id",
    "tokenizer_class",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "is_encoder_decoder",
    "tie_encoder_decoder",
    "chunk_size_feed_forward",
    "problem_type",
    "task_specific_params",
    "finetuning_task",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "pruned_heads",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "quantization_config_applied",
    "auto_map",
    "pretraining_tp",
)

NORMS = (
    ("input_layernorm.weight", "attn_norm/scale", 0),
    ("post_attention_layernorm.weight", "ffn_norm/scale", 0),
)
GQA = (
    ("self_attn.q_proj.weight", "attn/wq", 1),
    ("self_attn.k_proj.weight", "attn/wk", 1),
    ("self_attn.v_proj.weight", "attn/wv", 1),
    ("self_attn.o_proj.weight", "attn/wo", 2),
)
GQA_BIAS = (
    ("self_attn.q_proj.bias", "attn/bq", 0),
    ("self_attn.k_proj.bias", "attn/bk", 0),
    ("self_attn.v_proj.bias", "attn/bv", 0),
)
MLA_Q_LORA = (
    ("self_attn.q_a_proj.weight", "attn/wq_a", 1),
    ("self_attn.q_a_layernorm.weight", "attn/q_norm/scale", 0),
    ("self_attn.q_b_proj.weight", "attn/wq_b", 1),
)
MLA_Q = (("self_attn.q_proj.weight", "attn/wq", 1),)
MLA_KV = (
    ("self_attn.kv_a_proj_with_mqa.weight", "attn/wkv_a", 1),
    ("self_attn.kv_a_layernorm.weight", "attn/kv_norm/scale", 0),
    ("self_attn.kv_b_proj.weight", "attn/wkv_b", 1),
    ("self_attn.o_proj.weight", "attn/wo", 2),
)
QK_NORM = (
    ("self_attn.q_norm.weight", "attn/q_norm/scale", 0),
    ("self_attn.k_norm.weight", "attn/k_norm/scale", 0),
)
DENSE_MLP = (
    ("mlp.gate_proj.weight", "mlp/w_gate", 1),
    ("mlp.up_proj.weight", "mlp/w_up", 1),
    ("mlp.down_proj.weight", "mlp/w_down", 1),
)


def shared_rows(prefix: str):
    return (
        (f"{prefix}.gate_proj.weight", "moe/shared/w_gate", 1),
        (f"{prefix}.up_proj.weight", "moe/shared/w_up", 1),
        (f"{prefix}.down_proj.weight", "moe/shared/w_down", 1),
    )


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps onto moejax.

    keys: hf key -> (target "section.field", convert); required: hf key -> accepted values;
    ignored: extra keys without effect; constants: moejax fields fixed by the architecture;
    moe_prefix: module name of the MoE block in a layer (`mlp` or Mixtral's legacy
    `block_sparse_moe`); legacy_expert: per-expert module names (gate, up, down); router_bias:
    the HF buffer holding the selection bias (DeepSeek-V3); rope_interleave: whether MLA's
    rotary channels are stored interleaved (a bool, or the config key that says so, default
    True); finish: `(hf, sections, problems) -> None`, the conversions no single key decides
    (DeepSeek-V2's `topk_method`).
    """

    name: str
    model_type: str
    keys: dict[str, tuple[str, Callable[[Any], Any]]]
    required: dict[str, tuple]
    ignored: tuple[str, ...] = ()
    constants: dict[str, Any] = dataclasses.field(default_factory=dict)
    moe_prefixes: tuple[str, ...] = ("mlp",)
    legacy_expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: str = ""
    extra_moe_rows: tuple = ()
    router_bias: str = ""
    rope_interleave: bool | str = False
    finish: Callable[[dict, dict, list], None] | None = None


def _same(v):
    return v


def _zero_if_none(v):
    return 0 if v is None else v


COMMON_KEYS = {
    "vocab_size": ("model.vocab_size", _same),
    "hidden_size": ("model.d_model", _same),
    "num_hidden_layers": ("model.num_layers", _same),
    "num_attention_heads": ("model.num_heads", _same),
    "num_key_value_heads": ("model.num_kv_heads", _same),
    "intermediate_size": ("model.d_ff", _same),
    "rms_norm_eps": ("model.norm_eps", _same),
    "tie_word_embeddings": ("model.tie_embeddings", _same),
    "rope_theta": ("model.rope_theta", _same),  # transformers 4.x; 5.x: rope_parameters
}
COMMON_REQUIRED = {"hidden_act": ("silu",), "rope_scaling": (None,)}

# Multi-head latent attention (DeepSeek-V2 and V3): the same five fields in both.
MLA_KEYS = {
    "q_lora_rank": ("model.q_lora_rank", _zero_if_none),
    "kv_lora_rank": ("model.kv_lora_rank", _same),
    "qk_nope_head_dim": ("model.qk_nope_head_dim", _same),
    "qk_rope_head_dim": ("model.qk_rope_head_dim", _same),
    "v_head_dim": ("model.v_head_dim", _same),
}

LLAMA = Architecture(
    "LlamaForCausalLM",
    "llama",
    keys={**COMMON_KEYS, "head_dim": ("model.head_dim", _zero_if_none)},
    required={**COMMON_REQUIRED, "attention_bias": (False,), "mlp_bias": (False,)},
    constants={"model.moe_every": 0},
)

MIXTRAL = Architecture(
    "MixtralForCausalLM",
    "mixtral",
    keys={
        **COMMON_KEYS,
        "head_dim": ("model.head_dim", _zero_if_none),
        "intermediate_size": ("moe.d_expert", _same),
        "num_local_experts": ("moe.num_experts", _same),
        "num_experts_per_tok": ("moe.top_k", _same),
        "router_aux_loss_coef": ("moe.balance_coef", _same),
    },
    required={**COMMON_REQUIRED, "sliding_window": (None,)},
    ignored=("router_jitter_noise",),
    constants={
        "model.moe_every": 1,
        "moe.scorer": "linear",
        "moe.selection": "softmax_topk",
        "moe.renormalize": True,
        "moe.z_loss_coef": 0.0,
    },
    moe_prefixes=("mlp", "block_sparse_moe"),
    legacy_expert=("w1", "w3", "w2"),
)

QWEN2_MOE = Architecture(
    "Qwen2MoeForCausalLM",
    "qwen2_moe",
    keys={
        **COMMON_KEYS,
        "num_experts": ("moe.num_experts", _same),
        "num_experts_per_tok": ("moe.top_k", _same),
        "moe_intermediate_size": ("moe.d_expert", _same),
        "shared_expert_intermediate_size": ("moe.d_shared", _same),
        "norm_topk_prob": ("moe.renormalize", _same),
        "qkv_bias": ("model.attention_bias", _same),
        "router_aux_loss_coef": ("moe.balance_coef", _same),
    },
    required={**COMMON_REQUIRED, "use_sliding_window": (False,)},
    ignored=(
        "sliding_window",
        "max_window_layers",
        "layer_types",
        "decoder_sparse_step",
        "mlp_only_layers",
    ),
    constants={
        "moe.scorer": "linear",
        "moe.selection": "softmax_topk",
        "moe.n_shared": 1,
        "moe.shared_gate": True,
        "moe.z_loss_coef": 0.0,
    },
    shared_prefix="mlp.shared_expert",
    extra_moe_rows=(("mlp.shared_expert_gate.weight", "moe/shared_gate", 1),),
)

DEEPSEEK_V3 = Architecture(
    "DeepseekV3ForCausalLM",
    "deepseek_v3",
    keys={
        **COMMON_KEYS,
        "n_routed_experts": ("moe.num_experts", _same),
        "num_experts_per_tok": ("moe.top_k", _same),
        "moe_intermediate_size": ("moe.d_expert", _same),
        "n_shared_experts": ("moe.n_shared", _zero_if_none),
        "norm_topk_prob": ("moe.renormalize", _same),
        "routed_scaling_factor": ("moe.routed_scaling_factor", _same),
        "n_group": ("moe.n_group", _same),
        "topk_group": ("moe.topk_group", _same),
        **MLA_KEYS,
    },
    # moe_layer_freq: as for DeepSeek-V2 (transformers ignores it, DeepSeek's code does not)
    required={**COMMON_REQUIRED, "attention_bias": (False,), "moe_layer_freq": (1,)},
    # head_dim / qk_head_dim are derived from the MLA dims; the multi-token-prediction module
    # (num_nextn_predict_layers) is not part of the causal LM's forward pass.
    ignored=(
        "head_dim",
        "qk_head_dim",
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "first_k_dense_replace",
        "rope_interleave",
        "ep_size",
        "topk_method",
        "scoring_func",
        "aux_loss_alpha",
        "seq_aux",
    ),
    # transformers 5.x masks the dropped groups with -inf (as DeepSeek's inference code).
    constants={
        "model.attention": "mla",
        "moe.scorer": "linear",
        "moe.selection": "sigmoid_bias",
        "moe.group_mask": "neg_inf",
        "moe.balance_coef": 0.0,
        "moe.z_loss_coef": 0.0,
    },
    shared_prefix="mlp.shared_experts",
    router_bias="mlp.gate.e_score_correction_bias",
    rope_interleave="rope_interleave",
)

QWEN3_MOE = Architecture(
    "Qwen3MoeForCausalLM",
    "qwen3_moe",
    keys={
        **COMMON_KEYS,
        "head_dim": ("model.head_dim", _zero_if_none),
        "num_experts": ("moe.num_experts", _same),
        "num_local_experts": ("moe.num_experts", _same),  # to_dict() spelling of num_experts
        "num_experts_per_tok": ("moe.top_k", _same),
        "moe_intermediate_size": ("moe.d_expert", _same),
        "norm_topk_prob": ("moe.renormalize", _same),
        "router_aux_loss_coef": ("moe.balance_coef", _same),
    },
    # Qwen3's attention_bias also biases o_proj, which moejax's attention_bias does not.
    required={**COMMON_REQUIRED, "use_sliding_window": (False,), "attention_bias": (False,)},
    ignored=(
        "sliding_window",
        "max_window_layers",
        "layer_types",
        "decoder_sparse_step",
        "mlp_only_layers",
    ),
    constants={
        "model.qk_norm": "head",
        "moe.scorer": "linear",
        "moe.selection": "softmax_topk",
        "moe.z_loss_coef": 0.0,
    },
)

OLMOE = Architecture(
    "OlmoeForCausalLM",
    "olmoe",
    keys={
        **COMMON_KEYS,
        "intermediate_size": ("moe.d_expert", _same),
        "num_experts": ("moe.num_experts", _same),
        "num_experts_per_tok": ("moe.top_k", _same),
        "norm_topk_prob": ("moe.renormalize", _same),
        "router_aux_loss_coef": ("moe.balance_coef", _same),
    },
    required={**COMMON_REQUIRED, "attention_bias": (False,), "clip_qkv": (None,)},
    constants={
        "model.moe_every": 1,
        "model.qk_norm": "full",
        "moe.scorer": "linear",
        "moe.selection": "softmax_topk",
        "moe.z_loss_coef": 0.0,
    },
)


def _one_if_none(v):
    return 1 if v is None else v


def _deepseek_v2_topk(hf: dict, sections: dict, problems: list) -> None:
    """`topk_method`: greedy ignores n_group / topk_group; group_limited_greedy uses them."""
    if hf.get("topk_method", "greedy") == "greedy":
        sections["moe"].update(n_group=1, topk_group=1)


DEEPSEEK_V2 = Architecture(
    "DeepseekV2ForCausalLM",
    "deepseek_v2",
    keys={
        **COMMON_KEYS,
        "n_routed_experts": ("moe.num_experts", _same),
        "num_experts_per_tok": ("moe.top_k", _same),
        "moe_intermediate_size": ("moe.d_expert", _same),
        "n_shared_experts": ("moe.n_shared", _zero_if_none),
        "routed_scaling_factor": ("moe.routed_scaling_factor", _same),
        "n_group": ("moe.n_group", _one_if_none),
        "topk_group": ("moe.topk_group", _one_if_none),
        **MLA_KEYS,
    },
    # transformers' DeepseekV2TopkRouter never renormalises the top-k weights (DeepSeek's own
    # code does with norm_topk_prob) and reads first_k_dense_replace but not moe_layer_freq:
    # only the settings both agree on are accepted.
    required={
        **COMMON_REQUIRED,
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "norm_topk_prob": (False,),
        "moe_layer_freq": (1,),
        "scoring_func": ("softmax",),
        "topk_method": ("greedy", "group_limited_greedy"),
    },
    ignored=(
        "head_dim",
        "qk_head_dim",
        "first_k_dense_replace",
        "ep_size",
        "aux_loss_alpha",
        "seq_aux",
        "num_nextn_predict_layers",
    ),
    constants={
        "model.attention": "mla",
        "moe.scorer": "linear",
        "moe.selection": "softmax_topk",
        "moe.renormalize": False,
        "moe.group_mask": "zero",
        "moe.balance_coef": 0.0,
        "moe.z_loss_coef": 0.0,
    },
    shared_prefix="mlp.shared_experts",
    rope_interleave=True,
    finish=_deepseek_v2_topk,
)

ARCHITECTURES = {
    a.name: a for a in (LLAMA, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3)
}
MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def interleaved_rope(arch: Architecture, hf: dict) -> bool:
    """Whether the checkpoint stores MLA's rotary channels as interleaved pairs."""
    if isinstance(arch.rope_interleave, str):
        return bool(hf.get(arch.rope_interleave, True))
    return arch.rope_interleave


def architecture_of(hf: dict) -> Architecture:
    names = hf.get("architectures") or []
    if not names:  # a bare config (PretrainedConfig.save_pretrained): go by model_type
        names = [a.name for a in ARCHITECTURES.values() if a.model_type == hf.get("model_type")]
    known = [n for n in names if n in ARCHITECTURES]
    if len(names) != 1 or not known:
        raise ConfigError(
            f"config.json architectures={names} (model_type={hf.get('model_type')!r}): "
            f"unsupported architecture; moejax.hf reads exactly one of {sorted(ARCHITECTURES)}."
        )
    return ARCHITECTURES[known[0]]


def hf_moe_layers(arch: Architecture, hf: dict) -> list[bool]:
    """Which HF layers have an MoE block, as transformers decides it."""
    n = hf["num_hidden_layers"]
    if arch is LLAMA:
        return [False] * n
    if arch is MIXTRAL or arch is OLMOE:
        return [True] * n
    if arch.name in MLA_ARCHITECTURES:
        k = hf.get("first_k_dense_replace", 0) or 0
        return [i >= k for i in range(n)]
    step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    experts = hf.get("num_experts", hf.get("num_local_experts", 0)) or 0
    return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n)]


def fit_layout(moe_layers: list[bool]) -> dict:
    """The `model` fields whose layout has MoE exactly at `moe_layers`: `first_k_dense` and
    `moe_every` when the layout is a dense prefix then periods ending in MoE (the stacks
    existing checkpoints use), else `layer_kinds` naming every layer."""
    periodic = periodic_layout(moe_layers)
    if periodic is not None:
        return {"first_k_dense": periodic[0], "moe_every": periodic[1]}
    return {"layer_kinds": ",".join("moe" if moe else "dense" for moe in moe_layers)}
