"""Evaluating a run: `python -m moejax.eval --workdir=W --sources=... --tasks=... --json`,
or `moejax.eval.evaluate(run, sources, tasks)` (`moejax/eval/evaluate.py`): per-source loss
and bits per byte, accuracy on the generated tasks by greedy decoding, expert usage."""

from moejax.eval.evaluate import evaluate
from moejax.eval.tasks import TaskError

__all__ = ["evaluate", "TaskError"]
