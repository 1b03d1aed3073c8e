"""Accuracy on the generated tasks (`moejax.data.tasks`: rev, rot, srt, add) by greedy
decoding: each task's held-out evaluation inputs (`tasks.eval_examples(data.seed)`, inputs
the training stream never shows), prompted as in training (BOS, "tag:input="), decoded with
the key/value cache of `moejax.generate` for the longest answer plus its EOS, scored by exact
match of the text before the first EOS (`tasks.decode_answer`). Another decoder (SCMoE,
rewiring: `moejax.generate`) is scored the same way through `generate_fn`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from moejax.data import EOS_ID, ByteTokenizer, Tokenizer, tasks
from moejax.generate import generate


class TaskError(ValueError):
    """Tasks asked of a run that cannot do them (unknown task, not a byte vocabulary)."""


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """`all`, a comma-separated subset of `tasks.TASKS`, or a list of them."""
    if text is None:
        return []
    names = [t for t in (text.split(",") if isinstance(text, str) else text) if t]
    if names == ["all"]:
        return list(tasks.TASKS)
    unknown = [t for t in names if t not in tasks.TASKS]
    if unknown:
        raise TaskError(
            f"--tasks: unknown task {unknown[0]!r}; the tasks are {tasks.TASKS} or all."
        )
    return names


def task_accuracy(
    model,
    variables,
    tokenizer: Tokenizer,
    names: Sequence[str],
    *,
    seed: int = 0,
    per_task: int = tasks.EVAL_PER_TASK,
    generate_fn: Callable[..., jax.Array] = generate,
) -> dict[str, float]:
    """{task: exact-match accuracy} and "mean" over the tasks (module docstring).
    `generate_fn(model, variables, prompts_BxP, max_new_tokens, eos_id=)` -> `[B, P + n]`
    tokens decodes (default `moejax.generate.generate`; e.g. a partial of
    `moejax.generate.scmoe.scmoe_generate` scores decoding-time routing the same way)."""
    if not isinstance(tokenizer, ByteTokenizer):
        raise TaskError(
            "the generated tasks are byte-level; this run's data.tokenizer is "
            f"{getattr(tokenizer, 'spec', type(tokenizer).__name__)!r}, not byte."
        )
    if model.model.vocab_size < ByteTokenizer().vocab_size:
        raise TaskError(
            f"model.vocab_size={model.model.vocab_size} is smaller than the byte vocabulary."
        )
    examples = tasks.eval_examples(seed, per_task)
    out = {}
    for name in names:
        chosen = [(x, answer) for task, x, answer in examples if task == name]
        prompts = np.stack([tasks.prompt_tokens(name, x) for x, _ in chosen])
        tokens = generate_fn(model, variables, prompts, tasks.MAX_ANSWER + 1, eos_id=EOS_ID)
        tokens = np.asarray(jax.device_get(tokens))[:, prompts.shape[1] :]
        right = [tasks.decode_answer(row) == answer for row, (_, answer) in zip(tokens, chosen)]
        out[name] = float(np.mean(right))
    if names:
        out["mean"] = float(np.mean([out[n] for n in names]))
    return out
