"""Mixtures of LoRA experts on conflicting tasks: the configs of experiments/mole_multitask.py.

Two stages over one tiny dense model (d 64, 2 layers, byte vocabulary):

    stage=base       pretrain it on the offline corpus (moejax_corpus) with moejax.train
    stage=finetune   adapters only (`lora` from moejax.lora.variants.VARIANTS[variant]) on
                     data.sources="multitask" (moejax/data/tasks.py: reverse, Caesar shift,
                     sort digits, add; loss on answer tokens), base from lora.base_checkpoint

    python -m moejax.train --config=configs/mole_multitask.py:stage=base --workdir=runs/mt/base
    python -m moejax.train --config=configs/mole_multitask.py:variant=lora,rank=4 \\
        --config.lora.base_checkpoint=runs/mt/base --workdir=runs/mt/lora

The experiment script runs both stages for every variant and reports exact-match accuracy
per task by greedy decoding. Metrics to compare: accuracy per task, mean accuracy, at equal
trainable parameters (single LoRA's rank matched to each variant's count). `quick=true`
shrinks everything to seconds (the test); `size=pod` is the same recipe on the dense pod
shape (configs/dense.py).
"""

from pathlib import Path

from moejax.config.args import parse_arg
from moejax.config.base import default_config
from moejax.config.files import load_config_file
from moejax.config.pod_layout import apply_pod_layout
from moejax.lora.variants import MODEL_OVERRIDES, variant_overrides


def get_config(arg=None):
    arg = parse_arg(
        arg,
        stage="finetune",
        variant="lora",
        rank=8,
        quick=False,
        steps=0,
        seed=0,
        size="tiny",
        topology="",  # size=pod: a key of configs/dense.py's POD_LAYOUTS ("" = its first)
    )
    c = default_config()
    c.model.update(
        vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=192, moe_every=0
    )
    if arg.quick:  # seconds: one small layer, no MFU calibration matmul
        c.model.update(d_model=32, num_layers=1, d_ff=64)
        c.train.peak_tflops = 1.0
    if arg.size not in ("tiny", "pod"):
        raise ValueError(f"size={arg.size!r}: choose tiny or pod")
    c.train.update(
        log_every=50,
        eval_every=0,
        checkpoint_every=100_000,
        keep_checkpoints=1,
        async_checkpoint=False,
        weight_decay=0.0,
    )
    if arg.stage == "base":
        c.data.update(sources="corpus", seq_len=64, global_batch_size=16)
        if arg.quick:
            c.data.update(max_bytes_per_domain=200_000, global_batch_size=4)
        c.train.update(
            steps=arg.steps or (3 if arg.quick else 600),
            learning_rate=3e-3,
            warmup_steps=1 if arg.quick else 50,
        )
    elif arg.stage == "finetune":
        c.data.update(sources="multitask", seq_len=20, global_batch_size=32)
        c.train.update(
            steps=arg.steps or (3 if arg.quick else 1000),
            learning_rate=1e-2,
            warmup_steps=1 if arg.quick else 20,
        )
        c.train.seed = arg.seed  # adapter initialisation (and routers)
        c.data.seed = arg.seed  # the generated training and evaluation examples
        # Section defaults of this experiment, then the variant's own fields on top.
        c.lora.update(targets="attn.*,mlp.*", rank=arg.rank, alpha=2.0 * arg.rank)
        c.lora.update(variant_overrides(arg.variant))
        c.model.update(MODEL_OVERRIDES.get(arg.variant, {}))
    else:
        raise ValueError(f"stage={arg.stage!r}: choose base or finetune")
    if arg.size == "pod":  # the same recipe on configs/dense.py's pod shape
        c.model.update(
            d_model=2048,
            num_layers=24,
            num_heads=16,
            num_kv_heads=8,
            d_ff=8192,
            dtype="bfloat16",
        )
        c.data.update(global_batch_size=1024)
        dense = load_config_file(Path(__file__).with_name("dense.py"))
        apply_pod_layout(c, dense.POD_LAYOUTS, arg.topology)
    c.train.checkpoint_every = c.train.steps
    # `steps=N` shorter than the warmup warms up over all N, as the other configs' `steps=`.
    c.train.warmup_steps = min(c.train.warmup_steps, c.train.steps)
    return c
