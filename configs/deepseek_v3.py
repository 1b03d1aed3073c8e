"""DeepSeek-V3 routing: sigmoid affinities, auxiliary-loss-free bias balancing, group-limited
(node-limited) selection, and the complementary sequence-wise balance loss.

Liu et al., 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), section 2.1.2:
s = sigmoid(x W_r); experts are chosen by s + b (eq. 16), weighted by s renormalised over the
chosen ones (eq. 13) times the routed scaling factor; after every step each expert's bias b
moves by gamma = 1e-3 towards the mean load (`moe.bias_update_rate`); each token only
selects within the `topk_group` groups (nodes) of experts with the largest sum of their top-2
choice scores; the sequence-wise balance loss has a tiny alpha = 1e-4 (eq. 17-20,
`moe.seq_balance_coef`); no other auxiliary loss. DeepSeekMoE's fine-grained and shared
experts as in deepseekmoe.py. Attention is GQA here (not MLA); the first layer is dense.

Tiny CPU run (deepseekmoe.py's tiny shape and budget, 4 groups of 4 experts, top-2 groups):
    python -m moejax.train --config=configs/deepseek_v3.py --workdir=runs/deepseek_v3
Pod run (DeepSeek-V2-Lite-like shape with V3 routing; n_group = mesh.expert = 8, so a group
is one expert-parallel device and topk_group = 4 bounds the devices a token reaches, as V3's
M = 4 nodes):
    python -m moejax.train --config=configs/deepseek_v3.py:size=pod \\
        --workdir=/mnt/shared/runs/deepseek_v3

Read `train/moe/load_cv` and `train/moe/max_load` (balance without a balance loss),
`train/moe/router_bias_abs_mean` (how far the biases moved) and `eval/loss`.
Sweep: `sweep_balancing` (aux-loss-free vs the auxiliary-loss baseline vs none).
"""
from moejax.config.args import parse_arg
from moejax.config.base import default_config


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=0)  # steps=0: the size's default
    c = default_config()
    c.train.steps = arg.steps or {"tiny": 300, "pod": 100_000}.get(arg.size, 0)
    # DeepSeek's own training/inference code masks the dropped groups with -inf.
    c.moe.update(router="sigmoid_bias", renormalize=True, group_mask="neg_inf",
                 bias_update_rate=1e-3, seq_balance_coef=1e-4, balance_coef=0.0,
                 z_loss_coef=0.0)
    if arg.size == "tiny":
        c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=640,
                       first_k_dense=1)
        c.moe.update(num_experts=16, top_k=4, d_expert=128, n_shared=1, n_group=4,
                     topk_group=2, routed_scaling_factor=1.0, gmm_tile=128)
        c.data.update(seq_len=256, global_batch_size=16)
        c.train.update(learning_rate=3e-3, warmup_steps=min(30, c.train.steps), eval_every=100,
                       eval_batches=8, checkpoint_every=100, log_every=10)
    elif arg.size == "pod":
        c.model.update(vocab_size=102400, d_model=2048, num_layers=27, num_heads=16,
                       num_kv_heads=16, d_ff=10944, first_k_dense=1, dtype="bfloat16",
                       remat="dots")
        c.moe.update(num_experts=64, top_k=6, d_expert=1408, n_shared=2, n_group=8,
                     topk_group=4, routed_scaling_factor=2.5)
        c.data.update(seq_len=4096, global_batch_size=4608)
        c.train.update(learning_rate=4.2e-4, warmup_steps=2000, eval_every=1000,
                       eval_batches=64, checkpoint_every=1000)
        c.mesh.update(data=-1, fsdp=16, expert=8)
    else:
        raise ValueError(f"size={arg.size!r}: choose tiny or pod")
    return c


def sweep_balancing(add):
    """DeepSeek-V3's auxiliary-loss-free ablation at this scale: bias-only balancing, the
    auxiliary-loss baseline (expert-level loss, frozen bias) and no balancing at all."""
    add(**{"moe.seq_balance_coef": 0.0})
    add(**{"moe.bias_update_rate": 0.0, "moe.seq_balance_coef": 0.0, "moe.balance_coef": 0.01})
    add(**{"moe.bias_update_rate": 0.0, "moe.seq_balance_coef": 0.0})
