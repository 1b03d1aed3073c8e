"""The multi-task LoRA experiment runs end to end in quick mode: base pretraining, adapter
runs through moejax.train, greedy exact-match accuracy per task, and the table."""

import importlib.util
import json

from testing_utils import REPO

from moejax.data import tasks

spec = importlib.util.spec_from_file_location(
    "mole_multitask", REPO / "experiments" / "mole_multitask.py"
)
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)


def test_quick_mode_prints_per_task_accuracies(tiny_corpus_dir, tmp_path, capsys):
    result = experiment.main(
        [
            "--quick",
            f"--workdir={tmp_path}",
            "--variants=lora,rslora",
            f"--data_dir={tiny_corpus_dir}",
        ]
    )
    out = capsys.readouterr().out
    header = "| method | matched to | rank | trainable params | " + " | ".join(tasks.TASKS)
    assert header in out
    rows = {r["name"]: r for r in result["rows"]}
    # rsLoRA has single LoRA's parameter count, so its match is the `lora` run itself.
    assert [r["name"] for r in result["rows"]] == ["lora", "rslora", "lora"]
    assert result["rows"][2]["matched_to"] == "rslora"
    assert rows["lora"]["params"] == rows["rslora"]["params"] > 0
    for row in result["rows"]:
        assert set(row["accuracy"]) == set(tasks.TASKS)
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert f"| {row['name']} |" in out
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]
