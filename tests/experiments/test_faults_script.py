"""`experiments/faults.py`: its tiny config is valid, and one scenario runs end to end and
reports the documented JSON (`scenarios`: scenario, trials, recovered, steps_lost, identical)."""

import importlib.util

from testing_utils import REPO, load_config_module, run_faults

from moejax.config.validation import validate

SCRIPT = REPO / "experiments" / "faults.py"
spec = importlib.util.spec_from_file_location("faults_script", SCRIPT)
faults_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(faults_script)


def test_tiny_flags_make_a_valid_config_with_the_stated_schedule(tmp_path):
    flags = faults_script.tiny_flags(str(tmp_path))
    config = load_config_module("deepseekmoe").get_config()
    for flag in flags[1:]:
        key, value = flag[len("--config.") :].split("=", 1)
        section, field = key.split(".")
        old = config[section][field]
        config[section][field] = type(old)(value) if not isinstance(old, bool) else value == "True"
    s = validate(config, num_devices=1, num_processes=1)
    assert (s.train.steps, s.train.checkpoint_every) == (faults_script.STEPS, faults_script.EVERY)
    assert s.train.async_checkpoint and s.train.log_every == 1
    assert all(hasattr(faults_script, f"scenario_{n}") for n in faults_script.SCENARIOS)


def test_nan_skip_scenario_end_to_end_json(tmp_path):
    proc, report = run_faults(tmp_path, "--scenarios=nan_skip", timeout=600)
    [row] = report["scenarios"]
    assert {k: row[k] for k in ("scenario", "trials", "recovered", "steps_lost", "identical")} == {
        "scenario": "nan_skip",
        "trials": 1,
        "recovered": 1,
        "steps_lost": 0,
        "identical": 1,
    }
    assert report["all_recovered"] is True
    # A progress line per stage and trial on stderr (it printed nothing for minutes).
    progress = [line for line in proc.stderr.splitlines() if line.startswith("faults: ")]
    assert (
        progress[0]
        == "faults: 1 scenario(s) x 1 trial(s), 2 at a time; a line per trial as it finishes"
    )
    assert progress[1].startswith("faults: the uninterrupted reference run (16 steps")
    assert progress[2].startswith("faults: reference done at ")
    assert progress[3].startswith(
        "faults: [1/1] nan_skip trial 0: recovered, identical, 0 step(s) lost, "
    )
