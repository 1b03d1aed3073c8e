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

from pathlib import Path

from moejax.config.files import load_config_file


def get_config(arg=None):
    # gshard.py's model, data, train and mesh (tiny or pod): the same shape and budget
    c = load_config_file(Path(__file__).with_name("gshard.py")).get_config(arg)
    c.moe.update(
        scorer="gru", selection="softmax_topk", gru_dim=128, gru_shared=True, gru_detach=False
    )
    return c


def sweep_recurrence(add):
    """The paper's ablations: detached state, one cell per layer, and the state size."""
    add(**{"moe.gru_detach": True})
    add(**{"moe.gru_shared": False})
    for h in (32, 256):
        add(**{"moe.gru_dim": h})
