"""configs/finetune.py end to end: a tiny random Qwen2-MoE with its own byte-level BPE
tokenizer, saved by transformers, converted (`moejax.train.convert_hf`), then 2 steps of LoRA on
attention and the routed experts on a jsonl file. Only the adapters move, the base stays bit
for bit the HF weights, the loss is finite, the run reads the checkpoint's tokenizer and the
adapters export to peft. A base that is missing or not converted is refused naming `base=`."""

import json
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from testing_utils import REPO

from moejax.config.files import load_config_file
from moejax.config_section import ConfigError

transformers = pytest.importorskip("transformers", reason="needs transformers")
torch = pytest.importorskip("torch", reason="needs torch")

FINETUNE = REPO / "configs" / "finetune.py"
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)]


def _hf_moe(path):
    """A 1-layer Qwen2-MoE (4 experts top-2, a gated shared expert) and its tokenizer."""
    from moejax.data.tokenizer_training import train_tokenizer

    config = transformers.Qwen2MoeConfig(
        vocab_size=272,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    )
    torch.manual_seed(0)
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(path)
    train_tokenizer(TEXTS, kind="bpe", vocab_size=272, out_dir=str(path))  # `tokenizers` BPE


def _documented(name, **replace):
    """README's command `name` (tests/test_readme_commands.py keeps the two equal) as argv,
    each `old=new` path of `replace` substituted."""
    from test_readme_commands import README

    command = README[name]
    for old, new in replace.values():
        command = command.replace(old, new)
    return shlex.split(command)


def test_finetune_recipe_trains_lora_on_attention_and_experts(tmp_path):
    """README's convert and fine-tune commands as typed (paths replaced, flags appended that
    shrink the run: later flags win), then the run read back."""
    import moejax.hf as mhf
    from moejax.lora.targets import is_adapter_path
    from moejax.nn.trees import split_tree
    from moejax.train.adapter_checkpoint import load_adapted

    hf_dir, base, run = tmp_path / "hf", tmp_path / "qwen_moe", tmp_path / "qwen_moe_lora"
    _hf_moe(hf_dir)
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "train-0.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"content": text}) + "\n")
    paths = dict(hf=("/path/to/hf_moe", str(hf_dir)), run=("runs/qwen_moe", str(base)))
    argv = _documented("ft_convert", **paths)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sources = f"jsonl:{tmp_path}/data/train-*.jsonl#content"
    argv = _documented(
        "ft_lora",
        lora=("runs/qwen_moe_lora", str(run)),  # before runs/qwen_moe, its prefix
        base=("runs/qwen_moe", str(base)),
        data=("jsonl:data/train-*.jsonl#text", sources),
    )
    assert argv[3].startswith("--config=configs/finetune.py:base=")
    argv[3] += ",steps=2,seq_len=16,batch=2"
    shrink = dict(log_every=1, eval_every=0, async_checkpoint=False, peak_tflops=1.0)
    argv += [f"--config.train.{k}={v}" for k, v in dict(shrink, learning_rate=1e-2).items()]
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"data: tokenizer hf:{base}/tokenizer;" in proc.stdout  # the checkpoint's own
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and np.isfinite(last["train/loss"])
    c = json.loads((run / "config.json").read_text())
    assert (c["lora"]["method"], c["lora"]["targets"]) == ("lora", "attn.*,experts.*")
    assert c["lora"]["base_checkpoint"] == str(base) and c["data"]["sources"] == sources
    converted = json.loads((base / "model.json").read_text())
    for section in ("model", "moe"):
        assert {k: c[section][k] for k in converted[section]} == converted[section]

    model, variables = load_adapted(str(run))
    adapters, got_base = split_tree(variables["params"], is_adapter_path)
    _, hf_variables = mhf.from_pretrained(str(hf_dir))
    want = traverse_util.flatten_dict(jax.device_get(hf_variables["params"]), sep="/")
    got = traverse_util.flatten_dict(jax.device_get(got_base), sep="/")
    assert set(got) == set(want)
    for key in want:  # the frozen base: the HF weights bit for bit
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    flat = traverse_util.flatten_dict(jax.device_get(adapters), sep="/")
    modules = {k.rsplit("/", 2)[-2] for k in flat}
    assert modules == {f"lora_{p}" for p in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    for key, value in flat.items():  # B starts at zero: every adapter trained
        if key.endswith("/b"):
            assert np.abs(value).max() > 0, key
    assert any("/experts/lora_w_" in k for k in flat)

    config = mhf.save_adapter(model, variables, str(tmp_path / "peft"))  # README's export
    # gate and up (A_gate != A_up) export as transformers' fused gate_up_proj: rank 2r.
    assert config["r"] == 2 * 8 and (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_a_missing_or_unconverted_base_is_refused_naming_base(tmp_path):
    get_config = load_config_file(FINETUNE).get_config
    with pytest.raises(ConfigError, match=r"needs base=WORKDIR"):
        get_config("")
    with pytest.raises(ConfigError, match=r"base='.*nope' is not a directory.*convert_hf"):
        get_config(f"base={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"holds no model\.json.*convert_hf"):
        get_config(f"base={tmp_path}")
    (tmp_path / "model.json").write_text(json.dumps({"model": {}, "moe": {}}))
    with pytest.raises(ConfigError, match=r"converted without a tokenizer.*tokenizer=hf:DIR"):
        get_config(f"base={tmp_path}")
    c = get_config(f"base={tmp_path},tokenizer=byte")
    assert c.data.tokenizer == "byte"


def test_the_config_reads_the_converted_sections_and_tokenizer(tmp_path):
    """What convert_hf writes (model.json with a tokenizer relative to the run) -> the model
    and moe sections as converted, the run's tokenizer copy by its absolute path."""
    sections = {
        "model": {"d_model": 48, "num_layers": 3, "vocab_size": 300},
        "moe": {"num_experts": 6, "top_k": 3},
        "data": {"tokenizer": "hf:tokenizer"},
    }
    (tmp_path / "model.json").write_text(json.dumps(sections))
    c = load_config_file(FINETUNE).get_config(f"base={tmp_path},rank=4,alpha=8")
    assert (c.model.d_model, c.model.num_layers, c.model.vocab_size) == (48, 3, 300)
    assert (c.moe.num_experts, c.moe.top_k) == (6, 3)
    assert c.data.tokenizer == f"hf:{tmp_path}/tokenizer"
    assert c.data.sources == "jsonl:data/train-*.jsonl#text"
    assert (c.lora.rank, c.lora.alpha, c.lora.base_checkpoint) == (4, 8.0, str(tmp_path))
