"""Hugging Face peer for `moe_layer.py`: DeepSeek-V3's MoE block, in PyTorch, at the same shape.

Times forward+backward of `transformers`' `DeepseekV3MoE` (sigmoid router with group-limited
top-k, here `n_group = topk_group = 1`; routed experts; `n_shared` shared experts as one SwiGLU of
width `n_shared * d_expert`) and of a torch SwiGLU MLP of the same active width
(`DeepseekV3MLP` of width `(top_k + n_shared) * d_expert`), with the loss `sum(y**2)`.

The routed experts run through transformers' `experts_implementation`: `grouped_mm` (the default
a `DeepseekV3Model` resolves to: sort by expert, `torch.nn.functional.grouped_mm`), `eager`
(a Python loop over the experts hit) or `batched_mm` (gathers one weight matrix per assignment:
T*k*d*2f floats, 48 GiB at the default shape).

Needs `pip install -e '.[hf]'` (torch pinned to the 2.13.0 CPU wheel); `moe_layer.py` imports
this module only when torch and transformers import.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INIT_STD = 0.02


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _config(shape, experts_impl: str) -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=shape.d_model,
        intermediate_size=shape.dense_width,
        moe_intermediate_size=shape.d_expert,
        n_routed_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        n_shared_experts=shape.shared,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        num_hidden_layers=1,
        experts_implementation=experts_impl,
    )


def _init(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Standalone modules keep torch.empty / zero weights (a zero router weight sends every
    # token to the same k experts); N(0, 0.02) as moejax inits, so routing is roughly balanced.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, INIT_STD)
    module = module.to(dtype)
    if isinstance(module, DeepseekV3MoE):
        module.gate.float()  # transformers keeps the router in float32 (_keep_in_fp32_modules)
    return module


def _fwd_bwd_step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        loss = module(x).float().square().sum()
        loss.backward()

    return step


def build_steps(shape, *, experts_impls=("grouped_mm",), threads: int = 2, seed: int = 0):
    """-> ({name: step}, info): fwd+bwd steps for the HF MoE block(s) and the torch dense MLP.

    Names: `hf_deepseek_v3_moe` for the first implementation in `experts_impls`,
    `hf_deepseek_v3_moe_<impl>` for the others, and `torch_dense_mlp`.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    x = torch.randn(shape.batch, shape.seq_len, shape.d_model).to(dtype).requires_grad_(True)
    steps, info = (
        {},
        {
            **versions(),
            "threads": torch.get_num_threads(),
            "experts_implementations": list(experts_impls),
            "note": "DeepSeek-V3 sigmoid router (no aux loss), loss sum(y**2), "
            "grads w.r.t. params and x",
        },
    )
    for i, impl in enumerate(experts_impls):
        moe = _init(DeepseekV3MoE(_config(shape, impl)), dtype)
        steps["hf_deepseek_v3_moe" if i == 0 else f"hf_deepseek_v3_moe_{impl}"] = _fwd_bwd_step(
            moe, x
        )
        if i == 0:
            with torch.no_grad():  # the router returns (logits,) weights, ids: take the ints
                out = moe.gate(x.detach().reshape(-1, shape.d_model))
                ids = next(o for o in out if not o.is_floating_point())
            counts = torch.bincount(ids.reshape(-1), minlength=shape.experts).double()
            info["expert_load"] = {
                "max_over_mean": round(float(counts.max() / counts.mean()), 4),
                "min_over_mean": round(float(counts.min() / counts.mean()), 4),
            }
    dense = _init(
        DeepseekV3MLP(_config(shape, "eager"), intermediate_size=shape.dense_width), dtype
    )
    steps["torch_dense_mlp"] = _fwd_bwd_step(dense, x)
    return steps, info
