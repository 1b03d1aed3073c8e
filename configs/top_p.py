"""Top-p dynamic routing: each token takes the fewest experts whose probabilities reach p.

Huang et al., 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(arXiv 2403.07652; reference code ZhenweiAn/Dynamic_MoE). p = 0.4, loss =
L_lm + 1e-2 * balance + 1e-4 * router entropy, weights are the router probabilities (not
renormalised), as reported. The number of experts per token is bounded by `moe.top_k`
(a static shape); here top_k = num_experts, so nothing is cut, and the routing arrays
still hold only ceil(p * E) = 4 slots, the most any token can need. Unused slots cost no
grouped-matmul FLOPs in the dropless dispatchers. `eval/moe/experts_per_token/<domain>`
shows which data take more experts; `train/moe/experts_per_token_hist` the distribution
per layer.

Tiny CPU run (same shape and budget as gshard.py and rmoe.py: the README router table):
    python -m moejax.train --config=configs/top_p.py --workdir=runs/top_p
Pod run (gshard.py's pod shape with top-p routing):
    python -m moejax.train --config=configs/top_p.py:size=pod --workdir=/mnt/shared/runs/top_p

Active FFN width is dynamic: 320 x the mean experts per token (logged); gshard.py's top-2
is 640. Sweep: `sweep_threshold` over p.
"""
from moejax.config.args import parse_arg
from moejax.config.base import default_config


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=0)  # steps=0: the size's default
    c = default_config()
    c.train.steps = arg.steps or {"tiny": 300, "pod": 100_000}.get(arg.size, 0)
    c.moe.update(router="top_p", top_p=0.4, renormalize=False, balance_coef=1e-2,
                 z_loss_coef=0.0, entropy_coef=1e-4)
    if arg.size == "tiny":
        c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=640)
        c.moe.update(num_experts=8, top_k=8, d_expert=320, gmm_tile=128)
        c.data.update(seq_len=256, global_batch_size=16)
        c.train.update(learning_rate=3e-3, warmup_steps=min(30, c.train.steps), eval_every=100,
                       eval_batches=8, checkpoint_every=100, log_every=10)
    elif arg.size == "pod":
        c.model.update(vocab_size=32768, d_model=1024, num_layers=24, num_heads=16,
                       num_kv_heads=16, d_ff=4096, dtype="bfloat16", remat="dots")
        c.moe.update(num_experts=8, top_k=8, d_expert=4096)
        c.data.update(seq_len=2048, global_batch_size=1024)
        c.train.update(learning_rate=3e-4, warmup_steps=2000, eval_every=1000,
                       eval_batches=64, checkpoint_every=1000)
        c.mesh.update(data=-1, expert=8)
    else:
        raise ValueError(f"size={arg.size!r}: choose tiny or pod")
    return c


def sweep_threshold(add):
    for p in (0.2, 0.3, 0.5):
        add(**{"moe.top_p": p})
