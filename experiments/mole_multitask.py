"""Single LoRA against mixtures of LoRA experts on four conflicting tasks, at equal trainable
parameters.

    python experiments/mole_multitask.py --workdir=runs/mole_multitask        # all variants
    python experiments/mole_multitask.py --workdir=/tmp/mt --quick            # seconds
    python experiments/mole_multitask.py --variants=lora,rslora --workdir=...
    python experiments/mole_multitask.py --seeds=3 --steps=2000 --workdir=...   # mean of 3

1. Base: the tiny dense model of configs/mole_multitask.py pretrained on the offline corpus by
   moejax.train (`<workdir>/base`, reused when it already holds its final step).
2. Every entry of `moejax.lora.variants.VARIANTS` fine-tuned through moejax.train on the
   generated tasks (moejax/data/tasks.py: reverse, Caesar shift, sort digits, add; loss on
   the answer only), adapters only, on that base (`lora.base_checkpoint`).
3. Equal parameters: each variant's trainable count N_v is read off its initialised params
   (`moejax.lora.trainable.count`); single LoRA on the same projections has
   N(r) = r * sum over adapted projections of (d_in + d_out), so its matched rank is
   r_v = max(1, round(N_v / N(1))); that single LoRA run is trained too (shared between
   variants with the same r_v, and with the `lora` variant itself when r_v equals its rank).
4. Exact-match accuracy per task by greedy decoding (moejax.generate) of the held-out
   evaluation examples (inputs never seen in training), averaged over `--seeds` runs (each
   seed draws its own adapter initialisation and task examples; the table's `sd` is the
   standard deviation of the mean accuracy over seeds), printed as a markdown table and
   written to `<workdir>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.config.files import load_config_file  # noqa: E402
from moejax.config.validation import validate  # noqa: E402
from moejax.data import tasks  # noqa: E402
from moejax.generate import generate  # noqa: E402
from moejax.lora import trainable  # noqa: E402
from moejax.lora.hook import adapters_for  # noqa: E402
from moejax.lora.variants import VARIANTS  # noqa: E402
from moejax.models.transformer import Transformer  # noqa: E402
from moejax.train.adapter_checkpoint import load_adapted  # noqa: E402
from moejax.train.checkpoint import Checkpointer  # noqa: E402
from moejax.train.loop import train  # noqa: E402

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mole_multitask.py"
)


def _config(arg: str):
    return load_config_file(CONFIG).get_config(arg)


def _finished(workdir: str, steps: int) -> bool:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    with Checkpointer(workdir, async_save=False) as ckpt:
        return (ckpt.latest_step() or 0) >= steps


def _run(config, workdir: str, log) -> float:
    """Trains `config` in `workdir` unless it already finished; returns seconds spent."""
    if _finished(workdir, config.train.steps):
        log(f"  {workdir}: already trained, reused")
        return 0.0
    t0 = time.perf_counter()
    train(config, workdir)
    return time.perf_counter() - t0


def trainable_count(config) -> int:
    s = validate(config)
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return trainable.count(nn.unbox(shapes)["params"])


def _greedy_without_cache(model, variables, prompts: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding by full forward passes over a fixed-length buffer (one compile): for
    models that cannot use the key/value cache (X-LoRA runs the model twice per call).
    Causal attention keeps the not-yet-written positions from affecting earlier logits."""
    b, p = prompts.shape
    tokens = np.zeros((b, p + new), np.int32)
    tokens[:, :p] = prompts
    forward = jax.jit(lambda t: model.apply(variables, t)[0])
    for i in range(new):
        logits = np.asarray(forward(jnp.asarray(tokens)))
        tokens[:, p + i] = logits[:, p + i - 1].argmax(-1)
    return tokens


def accuracy(workdir: str, per_task: int, seed: int) -> dict[str, float]:
    """Exact-match accuracy per task of the adapter run in `workdir`, greedy decoding."""
    model, variables = load_adapted(workdir)
    examples = tasks.eval_examples(seed, per_task)
    prompts = np.stack([tasks.prompt_tokens(t, x) for t, x, _ in examples])
    if model.adapters is not None and not model.adapters.decodes_with_cache:  # X-LoRA
        out = _greedy_without_cache(model, variables, prompts, tasks.MAX_ANSWER + 1)
    else:
        out = np.asarray(
            generate(model, variables, prompts, tasks.MAX_ANSWER + 1, eos_id=tasks.EOS_ID)
        )
    right: dict[str, list[bool]] = {t: [] for t in tasks.TASKS}
    for (task, _, answer), ids in zip(examples, out[:, prompts.shape[1] :]):
        right[task].append(tasks.decode_answer(ids) == answer)
    return {t: float(np.mean(v)) for t, v in right.items()}


def markdown(rows: list[dict]) -> str:
    head = ["method", "matched to", "rank", "trainable params", *tasks.TASKS, "mean", "sd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = [f"{100 * r['accuracy'][t]:.1f}" for t in tasks.TASKS]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    r["matched_to"] or "-",
                    str(r["rank"]),
                    str(r["params"]),
                    *acc,
                    f"{100 * r['mean']:.1f}",
                    f"{100 * r['sd']:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="runs/mole_multitask")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps (the test)")
    p.add_argument("--variants", default="", help="comma-separated subset of VARIANTS")
    p.add_argument("--rank", type=int, default=8, help="the variants' rank (config arg)")
    p.add_argument("--data_dir", default="", help="data.data_dir of the base stage")
    p.add_argument("--seeds", type=int, default=1, help="runs per method, averaged")
    p.add_argument("--steps", type=int, default=0, help="fine-tuning steps; 0 = the config's")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    quick = ",quick=true" if args.quick else ""
    per_task = 4 if args.quick else tasks.EVAL_PER_TASK
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    base_dir = os.path.join(workdir, "base")
    base = _config("stage=base" + quick)
    if args.data_dir:
        base.data.data_dir = args.data_dir
    log(f"[base] pretraining {base.train.steps} steps on the corpus -> {base_dir}")
    seconds = _run(base, base_dir, log)
    log(f"[base] done ({seconds:.0f} s)")

    def finetune_config(variant: str, rank: int, seed: int = 0):
        c = _config(f"variant={variant},rank={rank},seed={seed},steps={args.steps}{quick}")
        c.lora.base_checkpoint = base_dir
        return c

    unit = trainable_count(finetune_config("lora", 1))  # single LoRA, rank 1
    rows, done = [], {}

    def evaluate(name, variant, rank, matched_to):
        if name not in done:
            per_seed = []
            for seed in range(args.seeds):
                config = finetune_config(variant, rank, seed)
                run_dir = os.path.join(workdir, name if seed == 0 else f"{name}_s{seed}")
                log(
                    f"[{name} seed {seed}] fine-tuning {config.train.steps} steps "
                    f"({trainable_count(config)} trainable params)"
                )
                seconds = _run(config, run_dir, log)
                per_seed.append(accuracy(run_dir, per_task, config.data.seed))
                log(
                    f"[{name} seed {seed}] ({seconds:.0f} s) "
                    + " ".join(f"{t}={100 * a:.1f}%" for t, a in per_seed[-1].items())
                )
            done[name] = per_seed
        per_seed = done[name]
        acc = {t: float(np.mean([a[t] for a in per_seed])) for t in tasks.TASKS}
        means = [float(np.mean(list(a.values()))) for a in per_seed]
        rows.append(
            {
                "name": name,
                "matched_to": matched_to,
                "rank": rank,
                "params": trainable_count(finetune_config(variant, rank)),
                "accuracy": acc,
                "mean": float(np.mean(means)),
                "sd": float(np.std(means)),
                "seeds": len(per_seed),
            }
        )

    for variant in names:
        evaluate(variant, variant, args.rank, "")
        n = trainable_count(finetune_config(variant, args.rank))
        r = max(1, round(n / unit))
        if variant == "lora" and args.rank == r:
            continue  # single LoRA is its own match
        # Single LoRA at the variant's rank is the `lora` run itself (trained once).
        evaluate("lora" if r == args.rank else f"lora_r{r}", "lora", r, variant)

    table = markdown(rows)
    total = time.perf_counter() - t_start
    log(
        f"\nExact-match accuracy (%) on {per_task} held-out examples per task, "
        f"greedy decoding, mean of {args.seeds} seed(s); total {total:.0f} s\n"
    )
    log(table)
    result = {"rows": rows, "per_task": per_task, "seconds": total, "table": table}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
