"""Dense baseline: the same Transformer with a SwiGLU FFN in every layer (no MoE).

Its FFN width (`d_ff=640`) equals the active FFN width of the tiny gshard.py and
deepseekmoe.py configs, so the three compare at equal active parameters per token.

Tiny CPU run:
    python -m moejax.train --config=configs/dense.py --workdir=runs/dense
Pod run (d 2048, 24 layers, d_ff 8192):
    python -m moejax.train --config=configs/dense.py:size=pod --workdir=/mnt/shared/runs/dense
"""

from moejax.config.args import parse_arg
from moejax.config.base import default_config
from moejax.config.pod_data import c4_sentencepiece


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=0)  # steps=0: the size's default
    c = default_config()
    c.train.steps = arg.steps or {"tiny": 300, "pod": 100_000}.get(arg.size, 0)
    c.model.moe_every = 0
    if arg.size == "tiny":
        c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=640)
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
            d_model=2048,
            num_layers=24,
            num_heads=16,
            num_kv_heads=8,
            d_ff=8192,
            dtype="bfloat16",
            remat="dots",
        )
        c.data.update(seq_len=2048, global_batch_size=1024, **c4_sentencepiece(32768))
        c.train.update(
            learning_rate=3e-4,
            warmup_steps=2000,
            eval_every=1000,
            eval_batches=64,
            checkpoint_every=1000,
        )
        c.mesh.update(data=-1, fsdp=8)
    else:
        raise ValueError(f"size={arg.size!r}: choose tiny or pod")
    return c
