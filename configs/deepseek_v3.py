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

from pathlib import Path

from moejax.config.args import parse_arg
from moejax.config.files import load_config_file


def get_config(arg=None):
    # deepseekmoe.py's args (its POD_LAYOUTS for topology=)
    size = parse_arg(arg, size="tiny", steps=0, tokenizer="byte", topology="").size
    # deepseekmoe.py's model, data, train and mesh (tiny or pod), with V3's routing.
    c = load_config_file(Path(__file__).with_name("deepseekmoe.py")).get_config(arg)
    # DeepSeek's own training/inference code masks the dropped groups with -inf.
    c.moe.update(
        selection="sigmoid_bias",
        renormalize=True,
        group_mask="neg_inf",
        bias_update_rate=1e-3,
        seq_balance_coef=1e-4,
        balance_coef=0.0,
        z_loss_coef=0.0,
    )
    if size == "tiny":  # 4 groups of 4 experts, top-2 groups
        c.moe.update(n_group=4, topk_group=2)
    else:  # pod: DeepSeek-V2-Lite's 27 layers; a group per expert-parallel device
        c.model.num_layers = 27
        c.moe.update(n_group=8, topk_group=4, routed_scaling_factor=2.5)
    return c


def sweep_balancing(add):
    """DeepSeek-V3's auxiliary-loss-free ablation at this scale: bias-only balancing, the
    auxiliary-loss baseline (expert-level loss, frozen bias) and no balancing at all."""
    add(**{"moe.seq_balance_coef": 0.0})
    add(**{"moe.bias_update_rate": 0.0, "moe.seq_balance_coef": 0.0, "moe.balance_coef": 0.01})
    add(**{"moe.bias_update_rate": 0.0, "moe.seq_balance_coef": 0.0})
