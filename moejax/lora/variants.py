"""Named LoRA methods: each is a set of `config.lora` values over one module family.

`VARIANTS[name]` holds the `lora` fields that define the method (on top of the section's
defaults); `configs/lora.py:<name>` and the multi-task experiment read them from here, so
every method has exactly one definition. `MODEL_OVERRIDES[name]` holds the `model` fields a
method needs (MoLA: unrolled layers). All follow y = W x + s * B (expand(g(x), r) * A x)
(`moejax.lora.config.LoRAConfig`); what differs is E, r, the gates g and the scale s.

- lora: Hu et al., 2021 (arXiv 2106.09685); peft `tuners/lora`. E = 1, g = 1, s = alpha / r.
- rslora: Kalajdzievski, 2023 (arXiv 2312.03732); peft `use_rslora`. s = alpha / sqrt(r).
- mola: "Higher Layers Need More LoRA Experts" (Gao et al., 2024, arXiv 2402.08562;
  GCYZSL/MoLA): E per quarter of the stack 2/4/6/8, softmax top-2 renormalised; the Switch
  balance loss is optional there (off here, `--config.lora.balance_coef=0.01` turns it on).
  Layers differ in shape, so MoLA runs with `model.scan_layers=False`.
- llava_mole: LLaVA-MoLE (Chen et al., 2024, arXiv 2401.16160): sparse top-1 LoRA experts on
  the MLP projections, dispatched by moejax's dropless MoE dispatcher, Switch balance loss.
- mixlora: MixLoRA (Li et al., 2024, arXiv 2404.15159; TUDB-Labs/MixLoRA): the MLP becomes
  top-2 of 8 experts, each the frozen FFN with its own LoRA on gate/up/down, base gate/up
  products shared, Switch balance loss 0.01; attention projections get plain LoRA
  (`moejax.lora.mixlora`).
- loramoe: LoRAMoE (Dou et al., 2024, arXiv 2312.09979; Ablustrund/LoRAMoE): every expert on
  every token with softmax weights (dense soft mixing) on the MLP, cv^2 balance of the
  experts' importance.
- hydralora: HydraLoRA (Tian et al., 2024, arXiv 2404.19245; Clin0212/HydraLoRA): one A
  shared by N heads B_e, dense softmax router over the heads.
- xlora: X-LoRA (Buehler & Buehler, 2024, arXiv 2402.07148; peft `tuners/xlora`): a
  no-adapter pass, then per-token softmax scalings from a classifier on its last hidden
  state (`moejax.lora.xlora`).
- smora: SMoRA (Zhao et al., 2025, arXiv 2501.15103; StyxXuan/smora `tuners/srmole`): rank-wise
  experts (r = 1; `rank` is the reference's `rank_partition`, ranks per block expert),
  sigmoid router with a non-trainable balancing bias moved by the sign rule (rate 1e-5 as
  the reference's default), top-k, gates normalised to sum k (`routed_scale` = k),
  s = alpha / k. The reference adds the bias to the gate values too and keeps one bias per
  rank even with rank_partition > 1; moejax's `sigmoid_bias` rule (DeepSeek-V3) uses the
  bias only for the choice and keeps one bias per block expert.
- flylora: FlyLoRA (Zou et al., 2025, NeurIPS; gfyddha/FlyLoRA `flylora.py`): R = 32
  rank-wise experts, frozen sparse random A (density k / R, N(0, 1/R^2)) as the implicit
  router, top-k (8) of |A x + d|, binary gates, trainable zero-initialised B,
  s = alpha / R with alpha = 2R (the reference's default), d moved by the sign rule (1e-3).
- dynmole: DynMoLE (Li et al., 2025, arXiv 2504.00661; mikecovlee/DynMoLE): softmax router,
  top-p 0.75 (the reference keeps the prefix whose running sum stays <= p) with at least
  2 experts, all experts when the normalised Tsallis entropy
  (q = 1.1) exceeds 0.9, weights not renormalised, loss 0.01 * mean entropy + 0.001 *
  Switch balance (`moejax.lora.routing.dynmole`).
- sora: SoRA (Ding et al., 2023, arXiv 2311.11696; TsinghuaC3I/SoRA): a rank gate with
  proximal soft-threshold steps, zero ranks pruned after training (`moejax.lora.sora`).
"""

from __future__ import annotations

VARIANTS: dict[str, dict] = {
    "lora": dict(method="lora", num_experts=1, top_k=1, rslora=False),
    "rslora": dict(method="lora", num_experts=1, top_k=1, rslora=True),
    "mola": dict(
        method="moe",
        router="softmax_topk",
        num_experts=8,
        top_k=2,
        renormalize=True,
        layer_experts="2,4,6,8",
        balance_coef=0.0,
    ),
    "llava_mole": dict(
        method="moe",
        router="softmax_topk",
        targets="mlp.*",
        num_experts=3,
        top_k=1,
        renormalize=True,
        dispatcher="auto",
        balance_coef=0.01,
    ),
    "mixlora": dict(
        method="mixlora",
        router="softmax_topk",
        targets="attn.*,mlp.*",
        num_experts=8,
        top_k=2,
        renormalize=True,
        dispatcher="auto",
        balance_coef=0.01,
    ),
    "loramoe": dict(
        method="moe",
        router="softmax_topk",
        targets="mlp.*",
        num_experts=6,
        top_k=6,
        renormalize=False,
        cv_coef=0.01,
    ),
    "hydralora": dict(
        method="moe",
        router="softmax_topk",
        num_experts=3,
        top_k=3,
        renormalize=False,
        shared_a=True,
    ),
    "xlora": dict(method="xlora", num_experts=4, xlora_temperature=1.0, xlora_top_k=0),
    "smora": dict(
        method="moe",
        router="sigmoid_bias",
        num_experts=16,
        rank=1,
        top_k=4,
        renormalize=True,
        routed_scale=4.0,
        scaling="active",
        bias_update_rate=1e-5,
    ),
    "flylora": dict(
        method="flylora",
        num_experts=32,
        rank=1,
        top_k=8,
        alpha=64.0,
        scaling="total",
        bias_update_rate=1e-3,
    ),
    "dynmole": dict(
        method="moe",
        router="dynmole",
        num_experts=8,
        top_k=8,
        renormalize=False,
        top_p=0.75,
        min_experts=2,
        entropy_threshold=0.9,
        tsallis_q=1.1,
        entropy_coef=0.01,
        balance_coef=0.001,
    ),
    "sora": dict(method="sora", num_experts=1, top_k=1, sora_lambda=1e-3),
}

MODEL_OVERRIDES: dict[str, dict] = {
    "mola": dict(scan_layers=False),
}


def variant_overrides(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {name!r}; choose one of {sorted(VARIANTS)}.")
    return dict(VARIANTS[name])
