r"""A small randomly initialised Hugging Face MoE checkpoint, written offline with
transformers, for the experiments that import a HF model (nothing is downloaded).

    python -m experiments.tiny_hf_moe --arch=qwen2_moe --seed=0 --out=runs/hf/qwen2_moe_s0
    python -m moejax.train.convert_hf --from=runs/hf/qwen2_moe_s0 --workdir=runs/hf/run_s0

`--arch`: qwen2_moe (Qwen1.5-MoE's layout: 16 routed experts, top-4, a gated shared
expert) or mixtral (8 experts, top-2), at d_model 128, 4 layers and `--vocab` ids (default
4096, the size of the offline corpus's BPE, `data.tokenizer=corpus_bpe:4096`). The weights
are transformers' own initialisation under `torch.manual_seed(--seed)`. Fine-tuned with
`python -m moejax.train --config=<converted>/config.py`, it is a HF architecture trained
here, which `moejax.compress` and `moejax.hf.save_pretrained` take like any run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMON = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
ARCHS = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "intermediate_size": 640,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 80,
            "shared_expert_intermediate_size": 160,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"intermediate_size": 160, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.tiny_hf_moe", description=__doc__)
    p.add_argument("--arch", default="qwen2_moe", choices=sorted(ARCHS))
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the HF checkpoint directory to write")
    args = p.parse_args(argv)
    import torch
    import transformers

    config_cls, model_cls, fields = ARCHS[args.arch]
    config = getattr(transformers, config_cls)(vocab_size=args.vocab, **COMMON, **fields)
    torch.manual_seed(args.seed)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {params / 1e6:.2f}M parameters, seed {args.seed} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
