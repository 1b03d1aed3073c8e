"""`evaluate(run, sources=..., tasks=...)`: one report of a run, the measure every
post-training tool (`moejax.compress`) is judged by, before and after.

    report = moejax.eval.evaluate("runs/deepseekmoe", sources="corpus", tasks="all")
    report["sources"]["code"]["bits_per_byte"], report["tasks"]["mean"]

It holds: per-source loss and bits per byte over the held-out documents
(`moejax.eval.language`), with `tasks` the accuracy on the generated tasks by greedy
decoding (`moejax.eval.tasks`), and the expert usage of every MoE layer over the same
held-out tokens (`moejax.eval.usage`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moejax.data import domain_names, open_tokenizer
from moejax.data.config import MULTITASK
from moejax.eval.data import eval_data_config, heldout_batches
from moejax.eval.language import language_modelling, moe_expert_counts
from moejax.eval.tasks import parse_tasks, task_accuracy
from moejax.eval.usage import usage_statistics
from moejax.models.config import ModelConfig
from moejax.train.run_loader import LoadedRun, load_run, resolve_step


def moe_model_layers(m: ModelConfig) -> list[int]:
    """The model layer index of each MoE layer, in order."""
    return [i for i, kind in enumerate(m.layer_layout) if kind.moe]


def evaluate(
    run: str | LoadedRun,
    sources: str | None = None,
    tasks: str | Sequence[str] | None = None,
    *,
    step: int | None = None,
    max_batches: int = 0,
    seq_len: int = 0,
    batch_size: int = 0,
    data_dir: str | None = None,
    per_task: int = 0,
) -> dict:
    """The report of `run` (a workdir, or what `load_run` returned), module docstring.

    `sources`: a `data.sources` list (None: the run's own; "" or "none": no language
    modelling), `max_batches` batches per source (0: all held-out documents), `seq_len` /
    `batch_size` / `data_dir` override the run's data section. `tasks`: "all" or a subset of
    the generated tasks (None: none), `per_task` inputs each (0: the held-out split's 64).
    """
    report: dict = {}
    if isinstance(run, str):
        step = resolve_step(run, step)
        report.update(workdir=run, step=step)
        run = load_run(run, step)
    model, variables, s, tokenizer = run
    task_names = parse_tasks(tasks)
    if sources not in ("", "none"):
        cfg = eval_data_config(
            s, sources, seq_len=seq_len, batch_size=batch_size, data_dir=data_dir
        )
        token_bytes = np.asarray(open_tokenizer(cfg).token_bytes, np.float64)
        # The generated task rows are one source (their rows carry no corpus domain).
        names = ("multitask",) if cfg.sources.strip() == MULTITASK else domain_names(cfg)
        lm = language_modelling(
            model, variables, heldout_batches(cfg, max_batches), names, token_bytes
        )
        counts = lm.pop("counts")
        report.update(lm, data_sources=cfg.sources)
        report["experts"] = [
            {"moe_layer": i, "model_layer": layer, **usage_statistics(c)}
            for i, (layer, c) in enumerate(zip(moe_model_layers(s.model), counts))
        ]
    else:
        report["experts"] = [
            {"moe_layer": i, "model_layer": layer, "num_experts": e}
            for i, (layer, e) in enumerate(zip(moe_model_layers(s.model), moe_expert_counts(model)))
        ]
    if task_names:
        kw = {"per_task": per_task} if per_task else {}
        report["tasks"] = task_accuracy(
            model, variables, tokenizer, task_names, seed=s.data.seed, **kw
        )
    return report
