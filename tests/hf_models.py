"""Tiny random Hugging Face models for the parity tests, built in-process (nothing is
downloaded): transformers' own init, then matrices ~ N(0, 0.2^2), norm scales 1 + N(0, 0.1^2)
and other vectors ~ N(0, 0.2^2), so that every weight matters to the logits.

    model = random_hf_model("Qwen2MoeConfig", dict(vocab_size=96, ...), seed=0)
"""

import numpy as np


def random_hf_model(config_cls: str, kwargs: dict, seed: int = 0):
    """A `transformers.AutoModelForCausalLM` of `transformers.<config_cls>(**kwargs)`, in eval
    mode, with the random weights of the module docstring (DeepSeek-V3's
    `e_score_correction_bias` buffer too)."""
    import torch
    import transformers

    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
            elif "norm" in key:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        for key, b in model.named_buffers():
            if key.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def hf_logits(model, ids) -> np.ndarray:
    """float32 logits [B, S, V] of a transformers model on integer ids [B, S]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()
