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

from pathlib import Path

from moejax.config.files import load_config_file


def get_config(arg=None):
    # gshard.py's model, data, train and mesh (tiny or pod): the same shape and budget
    c = load_config_file(Path(__file__).with_name("gshard.py")).get_config(arg)
    c.moe.update(
        selection="top_p",
        top_p=0.4,
        top_k=c.moe.num_experts,
        renormalize=False,
        balance_coef=1e-2,
        z_loss_coef=0.0,
        entropy_coef=1e-4,
    )
    return c


def sweep_threshold(add):
    for p in (0.2, 0.3, 0.5):
        add(**{"moe.top_p": p})
