"""Old config spellings are read through the one table of moejax.config.renames: each
translation warns once naming the new fields, a removed field is refused naming its
replacement, an old value of a live field (lora.dispatcher='rank' -> 'none') is translated
while every other value passes silently, and the input config is left as given. (An old
run directory with moe.router resuming is in tests/train/test_preflight.py, one with
lora.dispatcher='rank' here; the command line in test_old_spelling_on_the_command_line.)"""

import json
import os
import re
import warnings

import ml_collections
import pytest
from testing_utils import load_config_module, run_module

from moejax.config.base import default_config
from moejax.config.renames import (
    RENAMES,
    ConfigDeprecationWarning,
    Rename,
    apply_renames,
    renamed_value,
)
from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.lora.config import LORA_DISPATCHERS, LoRAConfig
from moejax.lora.routing import router_config
from moejax.moe.config import MoEConfig
from moejax.train.adapter_checkpoint import load_adapted
from moejax.train.loop import train
from moejax.train.writers import read_jsonl

OLD_ROUTERS = [  # (old moe.router, old moe.selection) -> (moe.scorer, moe.selection)
    ("softmax_topk", "", "linear", "softmax_topk"),
    ("top_p", "", "linear", "top_p"),
    ("sigmoid_bias", "", "linear", "sigmoid_bias"),
    ("top_p", "top_p", "linear", "top_p"),
    ("gru", "", "gru", "softmax_topk"),
    ("gru", "top_p", "gru", "top_p"),
    ("gru", "sigmoid_bias", "gru", "sigmoid_bias"),
]


def _old_config(router: str, selection: str) -> dict:
    """configs/deepseekmoe.py as a run of before the rename wrote it to config.json."""
    config = load_config_module("deepseekmoe").get_config().to_dict()
    for field in ("scorer", "selection"):
        del config["moe"][field]
    config["moe"].update(router=router, selection=selection)
    return config


@pytest.mark.parametrize("router,selection,scorer,rule", OLD_ROUTERS)
def test_old_router_is_read_as_scorer_and_selection_with_one_message(
    router, selection, scorer, rule
):
    config = _old_config(router, selection)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = validate(config, num_devices=1, num_processes=1)
    assert (s.moe.scorer, s.moe.selection) == (scorer, rule)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigDeprecationWarning)]
    assert len(messages) == 1
    assert f"config.moe.router={router!r} is an old spelling" in messages[0]
    assert f"moe.scorer={scorer!r}, moe.selection={rule!r}" in messages[0]
    assert f"--config.moe.scorer={scorer} --config.moe.selection={rule}" in messages[0]
    assert config["moe"]["router"] == router and "scorer" not in config["moe"]  # as given


def test_old_router_on_a_configdict_gives_the_new_tree():
    config = default_config()
    config.moe.router = "gru"  # an old config file's `c.moe.update(router="gru")`
    config.moe.selection = "top_p"
    with pytest.warns(ConfigDeprecationWarning, match="read as moe.scorer='gru'"):
        tree = apply_renames(config)
    assert "router" not in tree["moe"]
    assert (tree["moe"]["scorer"], tree["moe"]["selection"]) == ("gru", "top_p")
    assert config.moe.router == "gru"  # the ConfigDict is left as given
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling translates silently
        assert apply_renames(tree) == tree


def test_old_router_contradicting_the_selection_is_refused():
    with pytest.raises(ConfigError, match="contradicts moe.selection='sigmoid_bias'"):
        validate(_old_config("top_p", "sigmoid_bias"), num_devices=1, num_processes=1)


def test_the_table_is_generic_removed_fields_are_refused_naming_the_new_ones():
    config = default_config().to_dict()
    config["train"]["total_steps"] = 20
    config["lora"]["gate"] = "rank"
    table = {
        "train.total_steps": Rename(("train.steps",), lambda value, _: {"train.steps": value}),
        "lora.gate": Rename(("lora.dispatcher",)),  # removed, no translation
    }
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(ConfigError) as err:
        apply_renames(config, source="runs/x/config.json", renames=table)
    assert str(err.value) == (
        "runs/x/config.json: config.lora.gate='rank' was removed; set lora.dispatcher instead."
    )
    del config["lora"]["gate"]
    with pytest.warns(ConfigDeprecationWarning, match="config.train.total_steps=20"):
        tree = apply_renames(config, renames=table)
    assert tree["train"]["steps"] == 20 and "total_steps" not in tree["train"]
    assert set(RENAMES) == {  # the entries today
        "moe.router",
        ("lora.dispatcher", "rank"),
        "data.dataset",
        "data.domain_key",
    }


@pytest.mark.parametrize(
    "old, sources",
    [("moejax_corpus", "corpus"), ("multitask", "multitask"), ("c4/en:3.1.0", "tfds:c4/en:3.1.0")],
)
def test_data_dataset_becomes_data_sources(old, sources):
    config = default_config().to_dict()
    config["data"]["dataset"] = old
    config["data"]["domain_key"] = "domain"  # every old config.json holds it
    with pytest.warns(ConfigDeprecationWarning, match="data.dataset"):
        tree = apply_renames(config)
    assert tree["data"]["sources"] == sources
    assert "dataset" not in tree["data"] and "domain_key" not in tree["data"]


def test_the_table_renames_old_values_of_live_fields():
    # An entry keyed (field, old value) fires only on that value, and may refuse it.
    config = default_config().to_dict()
    config["data"]["dataset"] = "old_corpus"
    table = {
        ("data.dataset", "old_corpus"): renamed_value("data.dataset", "multitask"),
        ("lora.scaling", "sqrt"): Rename(("lora.scaling",)),  # removed value, no translation
    }
    with pytest.warns(ConfigDeprecationWarning, match="config.data.dataset='old_corpus'"):
        tree = apply_renames(config, renames=table)
    assert tree["data"]["dataset"] == "multitask"
    assert list(tree["data"]) == list(config["data"])  # the field stays where it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other values, and the new one, pass silently
        assert apply_renames(tree, renames=table) == tree
    config["lora"]["scaling"] = "sqrt"
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(ConfigError) as err:
        apply_renames(config, source="runs/x/config.json", renames=table)
    assert str(err.value) == (
        "runs/x/config.json: config.lora.scaling='sqrt' was removed; set lora.scaling instead."
    )


OLD_DISPATCHER_MESSAGE = (
    "config.lora.dispatcher='rank' is an old spelling, read as lora.dispatcher='none'; set "
    "that instead (e.g. --config.lora.dispatcher=none)."
)


def _deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ConfigDeprecationWarning)]


def test_old_lora_dispatcher_value_is_read_as_none_with_one_message():
    config = default_config().to_dict()
    config["lora"]["dispatcher"] = "rank"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = apply_renames(config, source="runs/x/config.json")
    assert _deprecations(caught) == [f"runs/x/config.json: {OLD_DISPATCHER_MESSAGE}"]
    assert tree["lora"]["dispatcher"] == "none"
    assert list(tree["lora"]) == list(config["lora"])  # the field stays where it was
    assert config["lora"]["dispatcher"] == "rank"  # as given
    assert tree["lora"]["scaling"] == config["lora"]["scaling"] == "rank"  # another field's


@pytest.mark.parametrize("variant", ["hydralora", "xlora", "mola"])
def test_old_lora_dispatcher_is_validated_as_none(variant):
    # HydraLoRA (shared A) and X-LoRA need the rank-axis mixture: 'rank' still reads as it.
    config = load_config_module("lora").get_config(variant).to_dict()
    assert config["lora"]["dispatcher"] == "none"
    config["lora"]["dispatcher"] = "rank"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = validate(config, num_devices=1, num_processes=1)
    assert s.lora.dispatcher == "none"
    assert _deprecations(caught) == [f"config: {OLD_DISPATCHER_MESSAGE}"]
    assert config["lora"]["dispatcher"] == "rank"  # as given


@pytest.mark.parametrize("dispatcher", LORA_DISPATCHERS)
def test_current_lora_dispatchers_pass_silently(dispatcher):
    assert "rank" not in LORA_DISPATCHERS and LoRAConfig().dispatcher == "none"
    config = load_config_module("lora").get_config("mola").to_dict()
    config["lora"]["dispatcher"] = dispatcher
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_renames(config) == config
        assert validate(config, num_devices=1, num_processes=1).lora.dispatcher == dispatcher


@pytest.mark.slow  # fast representative: test_preflight's old moe.router run
def test_run_written_with_the_old_lora_dispatcher_resumes(tiny_config, tmp_path):
    """config.json of an adapter run from before lora.dispatcher='rank' became 'none',
    resumed with the config it saved (as a user would): read as 'none', with a message
    naming the new value, and the steps after the resume are the uninterrupted run's."""
    lora = {
        "lora.method": "moe",
        "lora.targets": "attn.wq,mlp.*",
        "lora.num_experts": 2,
        "lora.rank": 2,
        "train.steps": 4,
        "train.checkpoint_every": 2,
    }
    whole, run = tmp_path / "whole", tmp_path / "run"
    train(tiny_config("dense", **lora), str(whole))
    train(tiny_config("dense", **{**lora, "train.steps": 2}), str(run))
    path = run / "config.json"
    saved = json.loads(path.read_text())
    assert saved["lora"]["dispatcher"] == "none"
    saved["lora"]["dispatcher"] = "rank"  # as the run was written then
    path.write_text(json.dumps(saved))
    config = ml_collections.ConfigDict(saved)
    config.train.steps = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, str(run))
    assert _deprecations(caught) == [
        f"config: {OLD_DISPATCHER_MESSAGE}",  # the config passed in
        f"{path}: {OLD_DISPATCHER_MESSAGE}",  # the run directory's resume check
    ]
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]

    def losses_after_2(workdir):
        records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        return {r["step"]: r["train/loss"] for r in records if "train/loss" in r and r["step"] > 2}

    resumed = losses_after_2(run)
    assert sorted(resumed) == [3, 4] and resumed == losses_after_2(whole)
    with pytest.warns(ConfigDeprecationWarning, match=re.escape(OLD_DISPATCHER_MESSAGE)):
        _, variables = load_adapted(str(run))  # reads the run's old config.json too
    assert "params" in variables


def test_sections_take_only_the_new_fields():
    # Old spellings are translated once, on the config tree (apply_renames); a section built
    # directly from a mapping in the old spelling is refused naming the field, and the
    # adapters' router sections are built with the two new fields.
    with pytest.raises(ConfigError, match=r"config.moe has unknown field\(s\) \['router'\]"):
        MoEConfig.from_mapping({"router": "gru"})
    with pytest.raises(TypeError):
        MoEConfig(router="gru")
    for lora_router, selection in [("softmax_topk", "softmax_topk"), ("dynmole", "top_p")]:
        cfg = router_config(LoRAConfig(method="moe", router=lora_router), num_experts=4)
        assert (cfg.scorer, cfg.selection, cfg.num_experts) == ("linear", selection, 4)


def test_old_spelling_on_the_command_line(tmp_path):
    proc = run_module(
        "moejax.train",
        "--config=configs/gshard.py",
        "--config.moe.router=gru",
        "--config.model.num_heads=3",  # stops at validation, before anything is compiled
        f"--workdir={tmp_path}",
    )
    assert proc.returncode == 1
    assert "config.moe.router='gru' is an old spelling, read as moe.scorer='gru'" in proc.stderr
    assert proc.stderr.count("ConfigDeprecationWarning") == 1
    assert "model.num_heads=3" in proc.stderr  # the config was read on to validation
    assert not (tmp_path / "checkpoints").exists()
