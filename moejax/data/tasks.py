"""Generated prompt -> answer tasks with conflicting output formats (`data.sources="multitask"`).

Four tasks, each tagged in the prompt, each exact-match scorable:

    rev:kqzd=dzqk       reverse four letters
    rot:kqzd=ntcg       Caesar shift of four letters by 3
    srt:5071=0157       sort four digits
    add:37+8=45         add a 2-digit and a 1-digit number

Letters go to two different functions and digits to two others, so one adapter has to switch
behaviour on the tag (the setting mixtures of LoRA experts are meant for, e.g. MoLA,
LoRAMoE). A row is one example: BOS, prompt, answer, EOS, then padding; the loss covers the
answer and its EOS only (`loss_mask`), not the prompt.

Determinism and held-out examples. Training example `k` is drawn from
`np.random.default_rng((seed, 0, k))` with task `k % 4`; an input whose CRC32 (with its tag)
falls in the held-out bucket (1 in `HELD_OUT_EVERY`) is never a training example, and the
evaluation split holds the first `EVAL_PER_TASK` held-out inputs of each task, so accuracy
is measured on inputs the model never saw. The iterator state is one integer (examples
consumed), so a resumed run sees the same batches.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from moejax.data.config import DataConfig
from moejax.data.errors import DataError
from moejax.data.model_batch import padding_batch
from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer

DATASET = "multitask"
TASKS = ("rev", "rot", "srt", "add")
HELD_OUT_EVERY = 8
EVAL_PER_TASK = 64
INPUT_LEN = 4
PROMPT_LEN = 1 + 4 + INPUT_LEN + 1  # BOS + "tag:xxxx="
MAX_ANSWER = INPUT_LEN
STATE_FORMAT = 1
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def solve(task: str, x: str) -> str:
    """The answer of `task` on input `x`."""
    if task == "rev":
        return x[::-1]
    if task == "rot":
        return "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in x)
    if task == "srt":
        return "".join(sorted(x))
    if task == "add":
        a, b = x.split("+")
        return str(int(a) + int(b))
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}.")


def draw_input(task: str, rng: np.random.Generator) -> str:
    if task in ("rev", "rot"):
        return "".join(rng.choice(_LETTERS, INPUT_LEN))
    if task == "srt":
        return "".join(str(d) for d in rng.integers(0, 10, INPUT_LEN))
    return f"{rng.integers(10, 100)}+{rng.integers(0, 10)}"


def held_out(task: str, x: str) -> bool:
    return zlib.crc32(f"{task}:{x}".encode()) % HELD_OUT_EVERY == 0


def train_example(seed: int, k: int) -> tuple[str, str, str]:
    """(task, input, answer) of training example `k`: never a held-out input."""
    task = TASKS[k % len(TASKS)]
    rng = np.random.default_rng((seed, 0, k))
    while True:
        x = draw_input(task, rng)
        if not held_out(task, x):
            return task, x, solve(task, x)


def eval_examples(seed: int, per_task: int = EVAL_PER_TASK) -> list[tuple[str, str, str]]:
    """The evaluation split: `per_task` distinct held-out inputs of each task, task-major."""
    out = []
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng((seed, 1, t))
        seen: set[str] = set()
        while len(seen) < per_task:
            x = draw_input(task, rng)
            if held_out(task, x) and x not in seen:
                seen.add(x)
                out.append((task, x, solve(task, x)))
    return out


def prompt_tokens(task: str, x: str) -> np.ndarray:
    """BOS + "task:x=" as int32 ids (PROMPT_LEN tokens for every generated input)."""
    return np.concatenate(
        [[BOS_ID], ByteTokenizer().encode_bytes(f"{task}:{x}=".encode())[1:-1]]
    ).astype(np.int32)


def decode_answer(ids: np.ndarray) -> str:
    """Generated ids after the prompt -> the answer text, up to the first EOS."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return ByteTokenizer().decode([i for i in ids if i not in (PAD_ID, BOS_ID)])


def example_row(task: str, x: str, answer: str, row_len: int) -> tuple[np.ndarray, int]:
    """(row int32[row_len], answer start) for one example, padded with PAD_ID."""
    prompt = prompt_tokens(task, x)
    full = np.concatenate([prompt, ByteTokenizer().encode_bytes(answer.encode())[1:]])
    row = np.full(row_len, PAD_ID, np.int32)
    row[: len(full)] = full
    return row, len(prompt)


class TaskBatches:
    """Iterator of task batches for one process, with the interface of `PackedBatches`."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        *,
        process_index: int = 0,
        process_count: int = 1,
        repeat: bool = True,
    ):
        if cfg.seq_len < PROMPT_LEN + MAX_ANSWER:
            raise DataError(
                f"data.seq_len={cfg.seq_len} is too short for data.sources="
                f"'{DATASET}' rows ({PROMPT_LEN + MAX_ANSWER} tokens); set "
                f"--config.data.seq_len >= {PROMPT_LEN + MAX_ANSWER}."
            )
        self.cfg, self.split, self.repeat = cfg, split, repeat
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = cfg.global_batch_size // process_count
        self.is_train = split == cfg.train_split
        self._eval = None if self.is_train else eval_examples(cfg.seed)
        self.consumed = 0  # global examples consumed (all processes)

    def _example(self, k: int):
        if self.is_train:
            return train_example(self.cfg.seed, k)
        if k >= len(self._eval):
            if not self.repeat:
                return None
            k %= len(self._eval)
        return self._eval[k]

    def __iter__(self) -> "TaskBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        g, row_len = self.cfg.global_batch_size, self.cfg.seq_len + 1
        if not self.is_train and not self.repeat and self.consumed >= len(self._eval):
            raise StopIteration
        rows = np.full((self.local_batch_size, row_len), PAD_ID, np.int32)
        starts = np.full(self.local_batch_size, row_len, np.int32)
        lengths = np.zeros(self.local_batch_size, np.int32)
        for r in range(self.local_batch_size):
            ex = self._example(self.consumed + r * self.process_count + self.process_index)
            if ex is not None:
                rows[r], starts[r] = example_row(*ex, row_len)
                lengths[r] = PROMPT_LEN + len(ex[2]) + 1
        self.consumed += g
        pos = np.arange(row_len - 1, dtype=np.int32)[None]
        real = pos < lengths[:, None]
        # Target t + 1 is an answer token (or its EOS) exactly when t + 1 >= answer start.
        answer = (pos + 1 >= starts[:, None]) & (pos + 1 < lengths[:, None])
        return {
            "inputs": rows[:, :-1],
            "targets": rows[:, 1:],
            "segment_ids": real.astype(np.int32),
            "positions": np.broadcast_to(pos, rows[:, :-1].shape).astype(np.int32),
            "domains": np.full(rows[:, :-1].shape, -1, np.int32),
            "loss_mask": answer.astype(np.float32),
        }

    def padding_batch(self) -> dict[str, np.ndarray]:
        return padding_batch(self.local_batch_size, self.cfg.seq_len)

    def get_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "source": f"{DATASET}/{self.split}",
            "seed": self.cfg.seed,
            "consumed": self.consumed,
            "process_count": self.process_count,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("format", STATE_FORMAT),
            ("source", f"{DATASET}/{self.split}"),
            ("seed", self.cfg.seed),
            ("process_count", self.process_count),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"Cannot resume the data iterator: it was saved with {key}="
                    f"{state.get(key)!r} but this one has {mine!r}."
                )
        self.consumed = int(state["consumed"])


def describe() -> dict[str, dict]:
    """The banner entry of `data.sources="multitask"`, in the keys of the other sources
    (`moejax.data.datasets.describe`): training examples are generated without end."""
    return {
        "multitask": {
            "tasks": "/".join(TASKS),
            "train_documents": "generated",
            "eval_documents": EVAL_PER_TASK * len(TASKS),
        }
    }
