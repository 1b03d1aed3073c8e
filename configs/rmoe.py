"""RMoE: a layerwise recurrent (GRU) router on a GShard-style top-2 MoE.

Qiu et al., 2024, "Layerwise Recurrent Router for Mixture-of-Experts" (arXiv 2408.06793;
reference code qiuzh20/RMoE). Each MoE layer projects its hidden state to h = 128, one GRU
cell shared by all MoE layers updates the routing state carried from the previous MoE
layer, and a per-layer h -> E map gives the logits for softmax top-2 with renormalisation.
Gradients flow through the recurrence (the paper's default; `moe.gru_detach=True` is its
Table 5 ablation). `moe.selection=top_p` routes the same recurrent logits by top-p instead.

Tiny CPU run (same shape and budget as gshard.py and top_p.py: the README router table):
    python -m moejax.train --config=configs/rmoe.py --workdir=runs/rmoe
Pod run (gshard.py's pod shape with the recurrent router):
    python -m moejax.train --config=configs/rmoe.py:size=pod --workdir=/mnt/shared/runs/rmoe

Active FFN width 2 x 320 = 640, as gshard.py, dense.py and deepseekmoe.py; the router adds
d*h + 6h^2 + h*E parameters per model (about 0.1M here), negligible FLOPs.
Sweeps: `sweep_recurrence` (detach ablation, shared vs per-layer cell, h).
"""
from moejax.config.args import parse_arg
from moejax.config.base import default_config


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=0)  # steps=0: the size's default
    c = default_config()
    c.train.steps = arg.steps or {"tiny": 300, "pod": 100_000}.get(arg.size, 0)
    c.moe.update(router="gru", gru_dim=128, gru_shared=True, gru_detach=False)
    if arg.size == "tiny":
        c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=640)
        c.moe.update(num_experts=8, top_k=2, d_expert=320, renormalize=True,
                     balance_coef=0.01, z_loss_coef=1e-3, gmm_tile=128)
        c.data.update(seq_len=256, global_batch_size=16)
        c.train.update(learning_rate=3e-3, warmup_steps=min(30, c.train.steps), eval_every=100,
                       eval_batches=8, checkpoint_every=100, log_every=10)
    elif arg.size == "pod":
        c.model.update(vocab_size=32768, d_model=1024, num_layers=24, num_heads=16,
                       num_kv_heads=16, d_ff=4096, dtype="bfloat16", remat="dots")
        c.moe.update(num_experts=8, top_k=2, d_expert=4096)
        c.data.update(seq_len=2048, global_batch_size=1024)
        c.train.update(learning_rate=3e-4, warmup_steps=2000, eval_every=1000,
                       eval_batches=64, checkpoint_every=1000)
        c.mesh.update(data=-1, expert=8)
    else:
        raise ValueError(f"size={arg.size!r}: choose tiny or pod")
    return c


def sweep_recurrence(add):
    """The paper's ablations: detached state, one cell per layer, and the state size."""
    add(**{"moe.gru_detach": True})
    add(**{"moe.gru_shared": False})
    for h in (32, 256):
        add(**{"moe.gru_dim": h})
