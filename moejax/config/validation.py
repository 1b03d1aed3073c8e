"""`validate(config)`: the one place a config is checked, before anything is compiled.

Reads old field spellings through `moejax.config.renames`, then returns the frozen section
dataclasses (`Sections`); raises `ConfigError` with one message that names the offending
field, its value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from moejax.config.base import SECTIONS
from moejax.config.renames import apply_renames
from moejax.config.train import RESUME_LR, TrainConfig
from moejax.config_section import ConfigError, unknown_names
from moejax.data.config import DataConfig
from moejax.data.datasets import check_spelling, open_tokenizer
from moejax.data.errors import DataError
from moejax.lora.config import (
    LORA_DISPATCHERS,
    LORA_ROUTERS,
    LORA_SCALINGS,
    LoRAConfig,
)
from moejax.lora.methods import METHODS
from moejax.lora.targets import ROUTED_EXPERT_METHODS, routed_expert_patterns
from moejax.models.config import (
    ATTENTION_IMPLS,
    ATTENTIONS,
    DTYPES,
    QK_NORMS,
    REMAT_POLICIES,
    ModelConfig,
    layer_moe_config,
    parse_layer_kind,
)
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import DISPATCHERS
from moejax.moe.expert_layout import uses_layout
from moejax.moe.expert_parallel import EP_EXCHANGES
from moejax.moe.grouped_matmul import IMPLS
from moejax.moe.routers import ROUTERS
from moejax.moe.selection import GROUP_MASK_FILL, SELECTIONS
from moejax.sharding.config import MESH_AXES, MeshConfig, batch_mesh_axes
from moejax.sharding.mesh import resolve_mesh_shape
from moejax.sharding.topology import parse_topology
from pallas_kernels.backend import BACKENDS as KERNEL_BACKENDS

OPTIONAL_SECTIONS = ("lora",)


@dataclasses.dataclass(frozen=True)
class Sections:
    model: ModelConfig
    moe: MoEConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig
    lora: LoRAConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


VOCAB_MULTIPLE = 128  # accelerators tile the embedding and the logits in 128s


def _resolve_vocabulary(s: Sections) -> Sections:
    """`model.vocab_size` against `data.tokenizer`: 0 (unset) becomes the tokenizer's size
    rounded up to a multiple of 128, and smaller than the byte tokenizer's 259 is an error
    naming both fields. A tokenizer read from a file is compared in preflight
    (`moejax.train.preflight.check_tokenizer`), so a config validates on a machine that does
    not hold the file (a pod config compiled here)."""
    _require(
        s.model.vocab_size >= 0,
        f"model.vocab_size={s.model.vocab_size} must be positive (or 0: data.tokenizer's size "
        f"rounded up to a multiple of {VOCAB_MULTIPLE}).",
    )
    try:
        check_spelling(s.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if s.model.vocab_size and s.data.tokenizer != "byte":
        return s  # a tokenizer file: compared in preflight, where the run reads it
    try:
        size = open_tokenizer(s.data).vocab_size
    except DataError as e:
        raise ConfigError(str(e)) from None
    if s.model.vocab_size == 0:
        padded = -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return dataclasses.replace(s, model=dataclasses.replace(s.model, vocab_size=padded))
    _require(
        s.model.vocab_size >= size, vocabulary_error(s.model.vocab_size, s.data.tokenizer, size)
    )
    return s


def vocabulary_error(vocab_size: int, tokenizer: str, size: int) -> str:
    """The message for a model.vocab_size smaller than its tokenizer's `size` ids."""
    return (
        f"model.vocab_size={vocab_size} is smaller than the {size} ids of "
        f"data.tokenizer={tokenizer!r}; set --config.model.vocab_size >= {size}, or 0 for "
        f"{size} rounded up to a multiple of {VOCAB_MULTIPLE}."
    )


def _check_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
        _require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive.")
    _require(
        m.head_dim >= 0,
        f"model.head_dim={m.head_dim} must be >= 0 (0 = model.d_model // model.num_heads).",
    )
    for name in ("rope_theta", "norm_eps", "init_std"):
        _require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive.")
    _require(
        m.head_dim > 0 or m.d_model % m.num_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
        f"change one of them or set model.head_dim explicitly.",
    )
    _require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads="
        f"{m.num_kv_heads} (grouped-query attention shares each kv head by a whole group).",
    )
    _require(
        m.attention in ATTENTIONS,
        f"model.attention={m.attention!r} must be one of {ATTENTIONS} (grouped-query or "
        f"DeepSeek's multi-head latent attention).",
    )
    _require(
        m.qk_norm in QK_NORMS,
        f"model.qk_norm={m.qk_norm!r} must be one of {QK_NORMS} ('head': Qwen3-MoE's "
        f"per-head q/k RMSNorm; 'full': OLMoE's over the whole projection).",
    )
    _require(
        m.attention == "gqa" or m.qk_norm == "none",
        f"model.qk_norm={m.qk_norm!r} applies to model.attention='gqa' only (MLA normalises "
        f"its latents instead); set model.qk_norm='none'.",
    )
    _require(
        m.attention_impl in ATTENTION_IMPLS,
        f"model.attention_impl={m.attention_impl!r} must be one of {ATTENTION_IMPLS} ('xla' "
        f"materialises the attention scores, 'flash' runs blockwise kernels, 'auto' is "
        f"'flash' on TPU and GPU and 'xla' on CPU).",
    )
    for name in (
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ):  # MLA sizes: never negative, used only with attention='mla'
        _require(getattr(m, name) >= 0, f"model.{name}={getattr(m, name)} must be >= 0.")
    if m.attention == "mla":
        _check_mla(m)
    else:
        _require(
            m.resolved_head_dim % 2 == 0,
            f"head dim {m.resolved_head_dim} must be even for rotary embeddings; "
            f"set model.head_dim to an even number.",
        )
    _check_layer_kinds(m)
    _require(
        0 <= m.first_k_dense <= m.num_layers,
        f"model.first_k_dense={m.first_k_dense} must be in [0, model.num_layers={m.num_layers}].",
    )
    _require(m.moe_every >= 0, f"model.moe_every={m.moe_every} must be >= 0 (0 = no MoE).")
    if m.moe_every:
        rest = m.num_layers - m.first_k_dense
        _require(
            rest % m.moe_every == 0,
            f"model.num_layers - model.first_k_dense = {rest} layers must be a multiple of "
            f"model.moe_every={m.moe_every} (each period ends with one MoE layer); "
            f"change num_layers, first_k_dense or moe_every.",
        )
    _require(m.dtype in DTYPES, f"model.dtype={m.dtype!r} must be one of {DTYPES}.")
    _require(
        m.param_dtype in DTYPES, f"model.param_dtype={m.param_dtype!r} must be one of {DTYPES}."
    )
    _require(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r} must be one of {REMAT_POLICIES}.")


def _check_layer_kinds(m: ModelConfig) -> None:
    """`model.layer_kinds`: one well-formed entry per layer, first_k_dense / moe_every left
    at their defaults (the per-layer list replaces them)."""
    if not m.layer_kinds.strip():
        return
    entries = m.layer_kinds.split(",")
    for i, entry in enumerate(entries):
        try:
            parse_layer_kind(entry)
        except ValueError as e:
            raise ConfigError(
                f"model.layer_kinds={m.layer_kinds!r}: entry {i} {entry.strip()!r}: {e}; "
                f"write each layer as 'dense', 'moe' or 'moe:e=<experts>:k=<top-k>'."
            ) from None
    _require(
        len(entries) == m.num_layers,
        f"model.layer_kinds={m.layer_kinds!r} has {len(entries)} entries for "
        f"model.num_layers={m.num_layers}; give exactly one kind per layer.",
    )
    _require(
        m.first_k_dense == 0 and m.moe_every == 1,
        f"model.layer_kinds={m.layer_kinds!r} gives every layer its FFN, so "
        f"model.first_k_dense={m.first_k_dense} and model.moe_every={m.moe_every} would "
        f"contradict it; leave them at their defaults (0 and 1).",
    )


def _check_layer_moe(moe: MoEConfig, m: ModelConfig) -> None:
    """The MoE layers of `model.layer_kinds` with their own expert count or top-k: each
    config of them passes the moe section's checks."""
    kinds = {k for k in m.layer_layout if k.moe and (k.num_experts or k.top_k)}
    for kind in sorted(kinds, key=str):
        cfg = layer_moe_config(kind, moe)
        try:
            _require(
                cfg.top_k <= cfg.num_experts,
                f"top-k {cfg.top_k} is more than its {cfg.num_experts} experts; lower k or raise e",
            )
            _check_sigmoid_bias(cfg)
        except ConfigError as e:
            raise ConfigError(
                f"model.layer_kinds={m.layer_kinds!r}: layers {kind}: {e}".rstrip(".") + "."
            ) from None
    counts = {layer_moe_config(k, moe).num_experts for k in m.layer_layout if k.moe}
    _require(
        len(counts) <= 1 or moe.selection != "sigmoid_bias",
        f"model.layer_kinds={m.layer_kinds!r} gives MoE layers different expert counts "
        f"{sorted(counts)}, which moe.selection='sigmoid_bias' does not support yet (its "
        f"router_bias collection stacks the layers); use one expert count.",
    )


def _check_mla(m: ModelConfig) -> None:
    for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        _require(
            getattr(m, name) > 0,
            f"model.{name}={getattr(m, name)} must be positive with model.attention='mla' "
            f"(DeepSeek-V3 uses kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128).",
        )
    _require(
        m.qk_rope_head_dim % 2 == 0,
        f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even for rotary embeddings.",
    )
    _require(
        not m.attention_bias,
        "model.attention_bias=True applies to model.attention='gqa' only (Qwen2's q/k/v "
        "biases); MLA has no biases here.",
    )


def _check_moe(moe: MoEConfig, m: ModelConfig) -> None:
    if m.num_moe_layers == 0:
        return
    _require(moe.num_experts >= 1, f"moe.num_experts={moe.num_experts} must be >= 1.")
    _require(
        1 <= moe.top_k <= moe.num_experts,
        f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}; "
        f"lower top_k or add experts.",
    )
    _require(moe.d_expert > 0, f"moe.d_expert={moe.d_expert} must be positive.")
    _require(moe.n_shared >= 0, f"moe.n_shared={moe.n_shared} must be >= 0.")
    _require(
        moe.d_shared >= 0, f"moe.d_shared={moe.d_shared} must be >= 0 (0 = n_shared * d_expert)."
    )
    _require(
        moe.n_shared > 0 or not (moe.d_shared or moe.shared_gate),
        f"moe.d_shared={moe.d_shared} / moe.shared_gate={moe.shared_gate} configure the "
        f"shared expert, but moe.n_shared=0 turns it off; set moe.n_shared=1.",
    )
    _require(
        moe.scorer in ROUTERS,
        f"moe.scorer={moe.scorer!r} is not a registered scorer; choose one of {sorted(ROUTERS)}.",
    )
    _require(
        moe.selection in SELECTIONS,
        f"moe.selection={moe.selection!r} is not a selection rule; choose one of "
        f"{sorted(SELECTIONS)}.",
    )
    _require(
        moe.dispatcher in DISPATCHERS,
        f"moe.dispatcher={moe.dispatcher!r} is unknown; choose one of {sorted(DISPATCHERS)}.",
    )
    _require(
        moe.gmm_impl in IMPLS + ("auto",),
        f"moe.gmm_impl={moe.gmm_impl!r} must be one of {('auto',) + IMPLS}.",
    )
    _require(
        moe.kernel_backend in ("auto",) + KERNEL_BACKENDS,
        f"moe.kernel_backend={moe.kernel_backend!r} must be one of {('auto',) + KERNEL_BACKENDS}.",
    )
    _require(moe.gmm_tile > 0, f"moe.gmm_tile={moe.gmm_tile} must be positive.")
    _require(
        moe.capacity_factor > 0,
        f"moe.capacity_factor={moe.capacity_factor} must be > 0 (1.0 = exactly the "
        f"balanced load; GShard uses 1.25-2.0).",
    )
    for name in (
        "balance_coef",
        "device_balance_coef",
        "seq_balance_coef",
        "z_loss_coef",
        "entropy_coef",
    ):
        value = getattr(moe, name)
        _require(value >= 0, f"moe.{name}={value} must be >= 0 (0 turns that loss off).")
    _require(
        moe.balance_devices >= 0,
        f"moe.balance_devices={moe.balance_devices} must be >= 0 (0 = the size of the "
        f"expert mesh axis).",
    )
    _require(
        moe.hybrid_capacity_factor >= 0,
        f"moe.hybrid_capacity_factor={moe.hybrid_capacity_factor} must be >= 0 (the hybrid "
        f"dispatcher's buffer rows per expert as a multiple of the balanced load T k / E; "
        f"0 = every assignment through its tile loop).",
    )
    _require(moe.hybrid_tile > 0, f"moe.hybrid_tile={moe.hybrid_tile} must be positive.")
    _require(
        moe.ep_capacity_factor >= 0,
        f"moe.ep_capacity_factor={moe.ep_capacity_factor} must be >= 0 (0 = dropless "
        f"exchange buffers for expert_parallel/fssdp; c > 0 keeps ceil(c T k / mesh.expert) "
        f"rows per destination and drops the rest).",
    )
    _require(
        moe.ep_exchange in EP_EXCHANGES,
        f"moe.ep_exchange={moe.ep_exchange!r} must be one of {EP_EXCHANGES} ('ragged' "
        f"needs a backend that lowers jax.lax.ragged_all_to_all: GPU or TPU, not CPU).",
    )
    _require(
        moe.fssdp_slots >= 0,
        f"moe.fssdp_slots={moe.fssdp_slots} must be >= 0 (replica slots per device for "
        f"the fssdp dispatcher; 0 = plain expert parallelism).",
    )
    _require(
        moe.fssdp_max_sends >= 0,
        f"moe.fssdp_max_sends={moe.fssdp_max_sends} must be >= 0 (the most replicas one "
        f"expert owner sends per step under fssdp; 0 = 2 * moe.fssdp_slots).",
    )
    _require(
        moe.fssdp_reshard_every >= 0,
        f"moe.fssdp_reshard_every={moe.fssdp_reshard_every} must be >= 0 (steps between "
        f"re-layouts of the experts' owners under fssdp; 0 = never).",
    )
    _require(
        moe.fssdp_spare_rows >= 0,
        f"moe.fssdp_spare_rows={moe.fssdp_spare_rows} must be >= 0 (extra stored expert "
        f"rows per MoE layer; 0 = every device owns num_experts / mesh.expert experts).",
    )
    _require(
        not moe.fssdp_spare_rows or uses_layout(moe),
        f"moe.fssdp_spare_rows={moe.fssdp_spare_rows} lets a re-layout give devices unequal "
        f"expert counts, but nothing re-lays out: moe.dispatcher={moe.dispatcher!r}, "
        f"moe.fssdp_reshard_every={moe.fssdp_reshard_every}. Set moe.dispatcher='fssdp' "
        f"and moe.fssdp_reshard_every > 0, or moe.fssdp_spare_rows=0.",
    )
    _check_router(moe)
    _check_sigmoid_bias(moe)
    _check_layer_moe(moe, m)


# Selection rules with group-limited routing and a routed scaling factor.
GROUPED_RULES = ("softmax_topk", "sigmoid_bias")


def _check_sigmoid_bias(moe: MoEConfig) -> None:
    """DeepSeek-V2 / V3's group-limited routing settings (softmax_topk, sigmoid_bias)."""
    _require(
        moe.group_mask in GROUP_MASK_FILL,
        f"moe.group_mask={moe.group_mask!r} must be one of {sorted(GROUP_MASK_FILL)} "
        f"('zero': transformers 4.x DeepseekV3MoE; 'neg_inf': DeepSeek's inference code "
        f"and transformers 5.x).",
    )
    _require(
        moe.bias_update_rate >= 0,
        f"moe.bias_update_rate={moe.bias_update_rate} must be >= 0 (DeepSeek-V3's gamma, "
        f"0.001; 0 freezes the bias).",
    )
    if moe.selection not in GROUPED_RULES:
        for name, default in (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0)):
            value = getattr(moe, name)
            _require(
                value == default,
                f"moe.{name}={value} only applies to the selection rules {GROUPED_RULES} "
                f"(DeepSeek-V2 / V3); set moe.selection to one of them, or leave "
                f"moe.{name}={default}.",
            )
        return
    e, g = moe.num_experts, moe.n_group
    _require(
        g >= 1 and e % g == 0,
        f"moe.num_experts={e} is not divisible by moe.n_group={g}; the experts form "
        f"n_group equal groups, so choose n_group among the divisors of num_experts "
        f"(1 = no group limit).",
    )
    _require(
        1 <= moe.topk_group <= g,
        f"moe.topk_group={moe.topk_group} must be between 1 and moe.n_group={g} (the "
        f"number of expert groups each token may select from).",
    )
    _require(
        moe.top_k <= moe.topk_group * (e // g),
        f"moe.top_k={moe.top_k} is more than the {moe.topk_group * (e // g)} experts in "
        f"moe.topk_group={moe.topk_group} groups of {e // g} (moe.num_experts / "
        f"moe.n_group); raise topk_group or lower top_k.",
    )
    _require(
        moe.routed_scaling_factor > 0,
        f"moe.routed_scaling_factor={moe.routed_scaling_factor} must be > 0 (DeepSeek-V3 "
        f"uses 2.5; 1.0 leaves the weights as they are).",
    )


def _check_router(moe: MoEConfig) -> None:
    _require(moe.gru_dim > 0, f"moe.gru_dim={moe.gru_dim} must be positive (RMoE uses 128).")
    _require(
        0.0 < moe.top_p <= 1.0,
        f"moe.top_p={moe.top_p} must be in (0, 1]: each token takes the fewest experts "
        f"whose probabilities sum to at least top_p (the paper uses 0.4).",
    )


def _check_lora(lo: LoRAConfig) -> None:
    for name, options in (
        ("method", ("none", *METHODS)),
        ("router", LORA_ROUTERS),
        ("dispatcher", LORA_DISPATCHERS),
        ("scaling", LORA_SCALINGS),
    ):
        _require(
            getattr(lo, name) in options,
            f"lora.{name}={getattr(lo, name)!r} must be one of {options}.",
        )
    for name in ("rank", "num_experts", "top_k"):
        _require(getattr(lo, name) > 0, f"lora.{name}={getattr(lo, name)} must be positive.")
    _require(lo.alpha > 0, f"lora.alpha={lo.alpha} must be positive (scale alpha / rank).")
    method = METHODS.get(lo.method)  # None for "none"
    slots, spelled = (
        method.gate_slots(lo) if method else (lo.num_experts, f"lora.num_experts={lo.num_experts}")
    )
    _require(lo.top_k <= slots, f"lora.top_k={lo.top_k} must be <= {spelled}.")
    patterns = [p.strip() for p in lo.targets.split(",") if p.strip()]
    _require(
        bool(patterns) and all("." in p for p in patterns),
        f"lora.targets={lo.targets!r} must be comma-separated '<module>.<param>' "
        f"patterns such as 'attn.wq,attn.wv' or 'attn.*,mlp.*'.",
    )
    routed = routed_expert_patterns(lo)
    _require(
        not routed or lo.method in ROUTED_EXPERT_METHODS,
        f"lora.targets={lo.targets!r} adapts the routed experts ({', '.join(routed)}), which "
        f"lora.method={lo.method!r} does not support; use lora.method='lora' for them, or "
        f"target attention / dense / shared-expert projections only.",
    )
    _require(
        not (lo.base_checkpoint and lo.base_hf),
        f"lora.base_checkpoint={lo.base_checkpoint!r} and lora.base_hf={lo.base_hf!r} "
        f"both name a base model; set only one of them.",
    )
    for name in ("base_checkpoint", "base_hf"):
        _require(
            lo.method != "none" or not getattr(lo, name),
            f"lora.{name}={getattr(lo, name)!r} is set but lora.method='none' trains the "
            f"whole model; set lora.method (e.g. 'lora') or clear lora.{name}.",
        )
    for name in (
        "balance_coef",
        "z_loss_coef",
        "entropy_coef",
        "cv_coef",
        "bias_update_rate",
        "sora_lambda",
    ):
        _require(
            getattr(lo, name) >= 0,
            f"lora.{name}={getattr(lo, name)} must be >= 0 (0 turns it off).",
        )
    _require(
        lo.routed_scale > 0,
        f"lora.routed_scale={lo.routed_scale} must be positive "
        f"(SMoRA: top_k, so the gates sum to k).",
    )
    _require(0.0 < lo.top_p <= 1.0, f"lora.top_p={lo.top_p} must be in (0, 1] (DynMoLE: 0.75).")
    _require(
        1 <= lo.min_experts <= lo.num_experts,
        f"lora.min_experts={lo.min_experts} must be in [1, lora.num_experts="
        f"{lo.num_experts}] (DynMoLE: 2).",
    )
    _require(
        0.0 <= lo.entropy_threshold <= 1.0,
        f"lora.entropy_threshold={lo.entropy_threshold} must be in [0, 1]: it is compared "
        f"with the normalised Tsallis entropy (DynMoLE: 0.9).",
    )
    _require(
        lo.tsallis_q > 0 and lo.tsallis_q != 1.0,
        f"lora.tsallis_q={lo.tsallis_q} must be positive and != 1 (DynMoLE: 1.1; q = 1 "
        f"is the Shannon limit, not a Tsallis index).",
    )
    _require(
        0.0 <= lo.flylora_density <= 1.0,
        f"lora.flylora_density={lo.flylora_density} must be in [0, 1] (0 = top_k / "
        f"(num_experts * rank), FlyLoRA's default).",
    )
    _require(
        lo.xlora_temperature > 0, f"lora.xlora_temperature={lo.xlora_temperature} must be positive."
    )
    _require(
        not lo.frozen_experts or lo.method in ("lora", "moe", "xlora"),
        f"lora.frozen_experts=True freezes the experts of lora.method 'lora', 'moe' or "
        f"'xlora' (their gating trains); method={lo.method!r} makes its own A.",
    )
    _require(
        not lo.frozen_experts or not routed_expert_patterns(lo),
        f"lora.frozen_experts=True does not freeze LoRA on the routed experts "
        f"({routed_expert_patterns(lo)} in lora.targets={lo.targets!r}); drop those targets.",
    )
    _require(
        0 <= lo.xlora_top_k <= lo.num_experts,
        f"lora.xlora_top_k={lo.xlora_top_k} must be in [0, lora.num_experts="
        f"{lo.num_experts}] (0 keeps every scaling).",
    )
    try:
        counts = lo.expert_counts
    except ValueError:
        counts = (0,)
    _require(
        all(c >= lo.top_k for c in counts),
        f"lora.layer_experts={lo.layer_experts!r} must be comma-separated expert counts, "
        f"each >= lora.top_k={lo.top_k} (MoLA: '2,4,6,8'), or empty.",
    )
    _require(
        not lo.shared_a or lo.dispatcher == "none",
        f"lora.shared_a=True (HydraLoRA) needs lora.dispatcher='none': the MoE "
        f"dispatchers compute experts with their own A; got {lo.dispatcher!r}.",
    )
    if method is not None:
        method.check(lo)  # what this method needs of the section (moejax.lora.methods)


def _check_lora_model(lo: LoRAConfig, m: ModelConfig) -> None:
    if lo.method == "none":
        return
    _require(
        m.attention != "mla" or not any(p.startswith("attn.") for p in lo.targets.split(",")),
        f"lora.targets={lo.targets!r} adapts attention projections, which "
        f"model.attention='mla' does not support; target 'mlp.*' / 'shared.*' only.",
    )
    _require(
        not lo.expert_counts
        or (not m.scan_layers and (m.periodic is None or m.periodic[1] in (0, 1))),
        f"lora.layer_experts={lo.layer_experts!r} (MoLA) gives layers different expert "
        f"counts, hence shapes: set model.scan_layers=False (and model.moe_every 0 or 1; "
        f"got scan_layers={m.scan_layers}, moe_every={m.moe_every}).",
    )


class ConfigAdjustedWarning(UserWarning):
    """`validate` adjusted a value that cannot apply as given, and says how."""


def _clamp_warmup(s: Sections) -> Sections:
    """A run shorter than its warmup (`--config.train.steps=20` on a config that warms up
    over 30) warms up over all of its steps, with a warning, as the configs' typed
    `:steps=N` argument does."""
    t = s.train
    if t.steps <= 0 or t.warmup_steps <= t.steps:
        return s
    warnings.warn(
        f"train.warmup_steps={t.warmup_steps} > train.steps={t.steps}: warming up over all "
        f"{t.steps} steps (set --config.train.warmup_steps to choose).",
        ConfigAdjustedWarning,
        stacklevel=3,
    )
    return dataclasses.replace(s, train=dataclasses.replace(t, warmup_steps=t.steps))


def _check_train(t: TrainConfig) -> None:
    _require(t.steps > 0, f"train.steps={t.steps} must be positive.")
    _require(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be positive.")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0.")
    _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1].")
    _require(
        t.resume_lr in RESUME_LR,
        f"train.resume_lr={t.resume_lr!r} is unknown; choose one of {list(RESUME_LR)} (the "
        f"learning rate after a resume that changed the schedule).",
    )
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0.")
    for name in ("b1", "b2"):
        _require(
            0 <= getattr(t, name) < 1,
            f"train.{name}={getattr(t, name)} must be in [0, 1) (Adam's moment decay; "
            f"0.9 and 0.95 are usual).",
        )
    _require(t.eps > 0, f"train.eps={t.eps} must be positive (Adam's denominator floor).")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 = no clipping).")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1.")
    _require(
        t.loss_chunk >= 0,
        f"train.loss_chunk={t.loss_chunk} must be >= 0 (tokens per chunk of the "
        f"cross-entropy; 0 computes the whole logits at once).",
    )
    _require(t.seed >= 0, f"train.seed={t.seed} must be >= 0.")
    _require(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1.")
    _require(
        t.eval_every >= 0,
        f"train.eval_every={t.eval_every} must be >= 0 (0 turns periodic evaluation off).",
    )
    _require(
        t.eval_batches >= 0,
        f"train.eval_batches={t.eval_batches} must be >= 0 (0 = the whole split).",
    )
    _require(t.checkpoint_every >= 1, f"train.checkpoint_every={t.checkpoint_every} must be >= 1.")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1.")
    _require(
        t.peak_tflops >= 0,
        f"train.peak_tflops={t.peak_tflops} must be >= 0 (0 = look the device up).",
    )
    _require(
        t.max_bad_steps >= 1,
        f"train.max_bad_steps={t.max_bad_steps} must be >= 1 (consecutive non-finite "
        f"steps before the run stops; set train.abort_on_nan=False never to stop).",
    )
    _require(
        t.dead_expert_logs >= 0,
        f"train.dead_expert_logs={t.dead_expert_logs} must be >= 0 (0 turns the dead "
        f"expert warning off).",
    )
    _require(
        0 <= t.max_dropped_fraction <= 1,
        f"train.max_dropped_fraction={t.max_dropped_fraction} must be in [0, 1] (1 turns "
        f"the warning off).",
    )
    _require(t.max_load_cv > 0, f"train.max_load_cv={t.max_load_cv} must be positive.")


def _check_mesh_topology(mesh: MeshConfig) -> None:
    _require(
        mesh.num_slices >= 1, f"mesh.num_slices={mesh.num_slices} must be >= 1 (1 = one slice)."
    )
    if mesh.topology:
        try:
            parse_topology(mesh.topology, mesh.num_slices)
        except ValueError as e:
            raise ConfigError(f"mesh.topology={mesh.topology!r}: {e}") from None


def _check_mesh_rules(mesh: MeshConfig) -> None:
    for rule in mesh.rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        _require(
            ok,
            f"mesh.rules entry {rule!r} must be a (logical_axis, mesh_axes) pair, "
            f"e.g. ('embed', 'fsdp').",
        )
        axes = rule[1]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        unknown = [a for a in axes if a not in MESH_AXES]
        _require(
            not unknown,
            f"mesh.rules maps {rule[0]!r} to unknown mesh axis {unknown[:1]}; mesh axes "
            f"are {MESH_AXES} (or None to replicate).",
        )


def _check_batching(
    d: DataConfig, t: TrainConfig, mesh: MeshConfig, sizes: dict[str, int], num_processes: int
) -> None:
    per_step = d.global_batch_size
    _require(
        per_step % t.grad_accum == 0,
        f"data.global_batch_size={per_step} is not divisible by train.grad_accum="
        f"{t.grad_accum}; make the batch a multiple of the number of micro-batches.",
    )
    micro = per_step // t.grad_accum
    axes = batch_mesh_axes(mesh.rules)
    dp = math.prod(sizes[a] for a in axes)
    _require(
        micro % dp == 0,
        f"the micro-batch of {micro} rows (data.global_batch_size / train.grad_accum) must "
        f"divide over the {dp} data-parallel devices (mesh axes {'*'.join(axes)} of the "
        f"'batch' rule); change data.global_batch_size or the mesh.",
    )
    _require(
        per_step % num_processes == 0,
        f"data.global_batch_size={per_step} must divide over {num_processes} processes.",
    )


def _check_expert_parallel(s: Sections, sizes: dict[str, int]) -> None:
    """The expert_parallel / fssdp dispatchers: slots that fit, tokens that split evenly."""
    moe = s.moe
    if moe.dispatcher not in ("expert_parallel", "fssdp"):
        return
    others = moe.num_experts - moe.num_experts // sizes["expert"]
    # One device runs the plan locally without replicas (a run read back by load_run).
    _require(
        moe.dispatcher != "fssdp" or sizes["expert"] == 1 or moe.fssdp_slots <= others,
        f"moe.fssdp_slots={moe.fssdp_slots} is more than the {others} experts a device "
        f"does not own (moe.num_experts - moe.num_experts / mesh.expert); extra slots "
        f"could never be filled. Lower moe.fssdp_slots.",
    )
    _require(
        not uses_layout(moe) or s.lora.method == "none",
        f"moe.fssdp_reshard_every={moe.fssdp_reshard_every} moves the experts between "
        f"devices, but lora.method={s.lora.method!r} trains adapters on a frozen base that "
        f"must stay as saved; set --config.moe.fssdp_reshard_every=0 for adapter runs.",
    )
    shards = math.prod(sizes[a] for a in ("data", "fsdp", "expert"))
    tokens = s.data.global_batch_size // s.train.grad_accum * s.data.seq_len
    _require(
        tokens % shards == 0,
        f"moe.dispatcher={moe.dispatcher!r} splits the {tokens} tokens of a micro-batch "
        f"(data.global_batch_size / train.grad_accum * data.seq_len) over mesh.data * "
        f"mesh.fsdp * mesh.expert = {shards} devices, which does not divide them; change "
        f"the batch, the sequence length or the mesh.",
    )


def validate_model(model: ModelConfig, moe: MoEConfig) -> None:
    """Checks the `model` and `moe` sections alone (e.g. a config built from a checkpoint)."""
    _check_model(model)
    _check_moe(moe, model)


def validate(
    config, *, num_devices: int | None = None, num_processes: int | None = None
) -> Sections:
    """Checks the whole tree (old field spellings read through `moejax.config.renames`);
    `num_devices` defaults to `jax.device_count()`."""
    config = apply_renames(config)
    # Sections added after a run was written (e.g. `lora`) default when absent.
    missing = [s for s in SECTIONS if s not in config and s not in OPTIONAL_SECTIONS]
    _require(
        not missing,
        f"config is missing section(s) {missing}; start from "
        f"moejax.config.base.default_config() or one of configs/*.py.",
    )
    unknown = [s for s in config.keys() if s not in SECTIONS]
    _require(
        not unknown,
        f"config has unknown section(s) {unknown_names(unknown, list(SECTIONS))}; valid "
        f"sections are {list(SECTIONS)}.",
    )
    try:
        built = {
            name: cls.from_mapping(config[name] if name in config else {})
            for name, cls in SECTIONS.items()
        }
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    s = _clamp_warmup(_resolve_vocabulary(Sections(**built)))
    _check_model(s.model)
    _check_moe(s.moe, s.model)
    _check_train(s.train)
    _check_lora(s.lora)
    _check_lora_model(s.lora, s.model)
    if num_devices is None or num_processes is None:
        import jax

        num_devices = jax.device_count() if num_devices is None else num_devices
        num_processes = jax.process_count() if num_processes is None else num_processes
    _check_mesh_rules(s.mesh)
    _check_mesh_topology(s.mesh)
    sizes = resolve_mesh_shape(s.mesh, num_devices)
    if s.model.num_moe_layers:
        _require(
            s.moe.num_experts % sizes["expert"] == 0,
            f"moe.num_experts={s.moe.num_experts} is not divisible by mesh.expert="
            f"{sizes['expert']}; each expert-parallel device must own a whole number of "
            f"experts: choose mesh.expert among the divisors of moe.num_experts (or "
            f"change moe.num_experts).",
        )
        for kind in {k for k in s.model.layer_layout if k.num_experts}:
            _require(
                kind.num_experts % sizes["expert"] == 0,
                f"model.layer_kinds={s.model.layer_kinds!r}: layers {kind} have "
                f"{kind.num_experts} experts, not divisible by mesh.expert={sizes['expert']}; "
                f"give them a multiple of mesh.expert experts.",
            )
        _require(
            s.moe.fssdp_spare_rows % sizes["expert"] == 0,
            f"moe.fssdp_spare_rows={s.moe.fssdp_spare_rows} is not divisible by mesh.expert="
            f"{sizes['expert']}; each device stores (num_experts + spare rows) / mesh.expert "
            f"expert rows: choose a multiple of mesh.expert.",
        )
        _check_expert_parallel(s, sizes)
        if not s.moe.balance_devices:  # the device-level loss's D: the expert axis' devices
            s = dataclasses.replace(
                s, moe=dataclasses.replace(s.moe, balance_devices=sizes["expert"])
            )
        _require(
            s.moe.num_experts % s.moe.balance_devices == 0,
            f"moe.num_experts={s.moe.num_experts} is not divisible by "
            f"moe.balance_devices={s.moe.balance_devices}; the device-level balance loss "
            f"needs equal groups of experts (0 = mesh.expert).",
        )
    _check_batching(s.data, s.train, s.mesh, sizes, num_processes)
    return s
