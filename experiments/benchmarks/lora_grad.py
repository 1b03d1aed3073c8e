"""Adapter-only step: gradients w.r.t. the adapters only vs w.r.t. every parameter.

Both steps freeze the base through the same optimizer (`make_optimizer(adapters=...)`,
moments for adapters only); `partitioned` differentiates w.r.t. the trainable partition
(what moejax.train does), `full` w.r.t. all params and lets the optimizer zero the base's
updates. Prints milliseconds per step (interleaved repeats) and the compiled steps' peak
temporary memory as XLA reports it.

    python experiments/benchmarks/lora_grad.py [--d_model 256 --layers 4 --seq 128 --batch 8]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.timing import measure  # noqa: E402
from moejax.config.base import default_config  # noqa: E402
from moejax.config.validation import validate  # noqa: E402
from moejax.sharding.mesh import make_mesh  # noqa: E402
from moejax.train.experiment import build_experiment  # noqa: E402
from moejax.train.step import train_step  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    c = default_config()
    c.model.update(
        d_model=a.d_model,
        num_layers=a.layers,
        num_heads=4,
        num_kv_heads=4,
        d_ff=4 * a.d_model,
        moe_every=0,
    )
    c.data.update(seq_len=a.seq, global_batch_size=a.batch)
    c.lora.update(method="lora", targets="attn.wq,attn.wv", rank=8)
    s = validate(c)
    exp = build_experiment(s, make_mesh(s.mesh))
    full = jax.jit(functools.partial(train_step, model=exp.model, tx=exp.tx, adapters_only=False))
    partitioned = jax.jit(
        functools.partial(train_step, model=exp.model, tx=exp.tx, adapters_only=True)
    )
    rng = np.random.default_rng(0)
    shape = (a.batch, a.seq)
    batch = {
        "inputs": rng.integers(0, 259, shape, dtype=np.int32),
        "targets": rng.integers(0, 259, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(a.seq, dtype=np.int32), shape).copy(),
        "domains": np.zeros(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }
    state = exp.init_fn(jax.random.PRNGKey(0))
    fns = {"partitioned": partitioned, "full": full}
    for name, fn in fns.items():
        mem = fn.lower(state, batch).compile().memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None)
        print(
            f"{name}: compiled; temporary memory {temp / 2**20:.2f} MiB"
            if temp is not None
            else f"{name}: compiled"
        )
    steps = {n: (lambda f=f: jax.block_until_ready(f(state, batch))) for n, f in fns.items()}
    times = measure(steps, a.repeats)
    for n, t in times.items():
        print(f"{n}: median {np.median(t):.2f} ms/step over {len(t)} repeats")
    print(
        f"device: {jax.devices()[0].device_kind}; d_model {a.d_model}, {a.layers} layers, "
        f"seq {a.seq}, batch {a.batch}, LoRA r=8 on attn.wq,attn.wv"
    )


if __name__ == "__main__":
    main()
