"""GShard-style MoE: top-2 of 8 experts, softmax gate, Switch balance loss.

Lepikhin et al., 2020, "GShard: Scaling Giant Models with Conditional Computation and
Automatic Sharding" (arXiv 2006.16668); every layer's FFN is MoE. Dispatch is dropless by
default (`moe.dispatcher=auto`); GShard's fixed capacity is `--config.moe.dispatcher=
capacity_einsum --config.moe.capacity_factor=1.25`, which reports the dropped fraction.

Tiny CPU run:
    python -m moejax.train --config=configs/gshard.py --workdir=runs/gshard
Pod run (d 1024, 24 layers, 8 experts of 4096):
    python -m moejax.train --config=configs/gshard.py:size=pod --workdir=/mnt/shared/runs/gshard
laid out for v5p:4x4x8 (128 chips) by default, `size=pod,topology=v6e:16x16` for a v6e-256.

The tiny size has 2 x 320 = 640 active FFN width, as dense.py and deepseekmoe.py.
`:tokenizer=bpe` trains on 4096 sub-word ids (as deepseekmoe.py). Sweeps: `sweep_capacity`
(compare `eval/loss` and `train/moe/dropped_fraction`) and `sweep_routers` (five routers at
this shape; experiments/README.md has both at CPU scale).
"""

from moejax.config.args import parse_arg
from moejax.config.base import default_config
from moejax.config.pod_data import c4_sentencepiece
from moejax.config.pod_layout import PodLayout, apply_pod_layout

# size=pod on each TPU slice it compiles for and fits (moejax/config/pod_layout.py; the README
# table, `python experiments/pod_table.py`); the first is the default. rmoe.py and top_p.py
# take these too.
POD_LAYOUTS = {
    "v5p:4x4x8": PodLayout(mesh=dict(fsdp=16, expert=8), grad_accum=1),
    "v6e:16x16": PodLayout(mesh=dict(fsdp=32, expert=8), grad_accum=1),
}


def get_config(arg=None):
    # steps=0: the size's default; topology: a key of POD_LAYOUTS ("" = the first);
    # tokenizer=bpe: a 4096-id BPE trained on the offline corpus (as deepseekmoe.py)
    arg = parse_arg(arg, size="tiny", steps=0, topology="", tokenizer="byte")
    c = default_config()
    c.train.steps = arg.steps or {"tiny": 300, "pod": 100_000}.get(arg.size, 0)
    if arg.size == "tiny":
        c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=640)
        c.moe.update(
            num_experts=8,
            top_k=2,
            d_expert=320,
            renormalize=True,
            balance_coef=0.01,
            z_loss_coef=1e-3,
            gmm_tile=128,
        )
        c.data.update(seq_len=256, global_batch_size=16)
        c.train.update(
            learning_rate=3e-3,
            warmup_steps=min(30, c.train.steps),
            eval_every=100,
            eval_batches=8,
            checkpoint_every=100,
            log_every=10,
        )
    elif arg.size == "pod":
        c.model.update(
            vocab_size=32768,
            d_model=1024,
            num_layers=24,
            num_heads=16,
            num_kv_heads=16,
            d_ff=4096,
            dtype="bfloat16",
        )
        # gmm_impl auto: the Mosaic grouped matmul on TPU
        c.moe.update(num_experts=8, top_k=2, d_expert=4096, dispatcher="expert_parallel")
        c.data.update(seq_len=2048, global_batch_size=1024, **c4_sentencepiece(32768))
        c.train.update(
            learning_rate=3e-4,
            warmup_steps=2000,
            eval_every=1000,
            eval_batches=64,
            checkpoint_every=1000,
        )
        # The [tokens, vocab] float32 logits a chunk at a time (moejax/train/chunked_loss.py):
        # 262,144 tokens (2,048 per chip on 128 chips) divide every layout's micro-batch.
        c.train.loss_chunk = 262_144
        apply_pod_layout(c, POD_LAYOUTS, arg.topology)
    else:
        raise ValueError(f"size={arg.size!r}: choose tiny or pod")
    if arg.topology and arg.size != "pod":
        raise ValueError("topology= picks a pod layout: use it with size=pod")
    if arg.tokenizer == "bpe":
        if arg.size != "tiny":
            raise ValueError("tokenizer=bpe trains on the offline corpus: use it with size=tiny")
        c.data.tokenizer = "corpus_bpe:4096"
        c.model.vocab_size = 0  # the tokenizer's size, rounded up to a multiple of 128
    elif arg.tokenizer != "byte":
        raise ValueError(f"tokenizer={arg.tokenizer!r}: choose byte or bpe")
    return c


def sweep_capacity(add):
    """GShard's fixed expert capacity (capacity_einsum drops what overflows) at capacity
    factors 1.0 / 1.25 / 2.0, against dropless dispatch (ragged): compare `eval/loss` with
    `train/moe/dropped_fraction`."""
    for cf in (1.0, 1.25, 2.0):
        add(
            name=f"capacity={cf}",
            **{"moe.dispatcher": "capacity_einsum", "moe.capacity_factor": cf},
        )
    add(name="dropless", **{"moe.dispatcher": "ragged"})


def sweep_routers(add, config):
    """The routers of the README router table on this shape and budget: softmax top-k
    (GShard), RMoE's recurrent GRU router (Qiu et al., 2024; h = d_model) with and without
    gradients through the recurrence (their Table 5 ablation), top-p dynamic routing (Huang
    et al., 2024: p = 0.4, entropy loss 1e-4, as top_p.py) and DeepSeek-V3's sigmoid router
    balanced by its bias alone (auxiliary-loss-free: no balance loss of any kind)."""
    gru = {"moe.scorer": "gru", "moe.gru_dim": config.model.d_model, "moe.gru_shared": True}
    add(name="softmax_topk")
    add(name="rmoe_gru", **gru, **{"moe.gru_detach": False})
    add(name="rmoe_gru_detached", **gru, **{"moe.gru_detach": True})
    add(
        name="top_p",
        **{
            "moe.selection": "top_p",
            "moe.top_p": 0.4,
            "moe.top_k": config.moe.num_experts,
            "moe.renormalize": False,
            "moe.balance_coef": 1e-2,
            "moe.z_loss_coef": 0.0,
            "moe.entropy_coef": 1e-4,
        },
    )
    add(
        name="sigmoid_bias_aux_free",
        **{
            "moe.selection": "sigmoid_bias",
            "moe.renormalize": True,
            "moe.bias_update_rate": 1e-3,
            "moe.balance_coef": 0.0,
            "moe.seq_balance_coef": 0.0,
            "moe.z_loss_coef": 0.0,
        },
    )
