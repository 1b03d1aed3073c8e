"""Generated multi-task rows: answers, held-out split, loss on answers only, resumable."""

import numpy as np
import pytest

from moejax.data import DataConfig, DataError, make_batches, tasks
from moejax.data.tokenizer import ByteTokenizer


def test_answers_and_held_out_split():
    cases = [("rev", "abcd"), ("rot", "xyza"), ("srt", "5071"), ("add", "37+8")]
    assert [tasks.solve(t, x) for t, x in cases] == ["dcba", "abcd", "0157", "45"]
    held = tasks.eval_examples(0, per_task=8)
    assert len(held) == 8 * len(tasks.TASKS)
    assert all(tasks.held_out(t, x) and tasks.solve(t, x) == a for t, x, a in held)
    train = [tasks.train_example(0, k) for k in range(400)]
    assert not any(tasks.held_out(t, x) for t, x, _ in train)
    assert train[:4] == [tasks.train_example(0, k) for k in range(4)]  # deterministic
    assert {len(tasks.prompt_tokens(t, x)) for t, x, _ in held + train} == {tasks.PROMPT_LEN}


def test_rows_train_on_the_answer_only_and_resume():
    cfg = DataConfig(sources="multitask", seq_len=16, global_batch_size=4)
    batches = make_batches(cfg, "train", process_index=0, process_count=1)
    first = next(batches)
    tok = ByteTokenizer()
    for r, k in enumerate(range(4)):
        task, x, answer = tasks.train_example(0, k)
        assert tok.decode(first["inputs"][r][: tasks.PROMPT_LEN]) == f"{task}:{x}="
        learned = first["targets"][r][first["loss_mask"][r] > 0]
        assert list(learned) == list(tok.encode(answer, add_bos=False))  # answer + EOS
    state = batches.get_state()
    want = next(batches)
    again = make_batches(cfg, "train", process_index=0, process_count=1)
    again.set_state(state)
    for key, value in next(again).items():
        np.testing.assert_array_equal(value, want[key])
    evals = list(make_batches(cfg, "validation", process_index=0, process_count=1))
    assert len(evals) == tasks.EVAL_PER_TASK * len(tasks.TASKS) // 4
    with pytest.raises(DataError, match="data.seq_len=8 is too short"):
        make_batches(
            DataConfig(sources="multitask", seq_len=8), "train", process_index=0, process_count=1
        )


def test_described_like_the_other_sources():
    """The trainer's `data:` banner line printed `bytes None` for adapter runs on the tasks
    (issue 23 item 5): the entry has the other sources' keys and no empty value."""
    from moejax.data import describe

    info = describe(DataConfig(sources="multitask"))
    assert info == {
        "multitask": {
            "tasks": "rev/rot/srt/add",
            "train_documents": "generated",
            "eval_documents": 4 * tasks.EVAL_PER_TASK,
        }
    }
