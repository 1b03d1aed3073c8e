"""Every config builds; bad configs are rejected before compiling, each with its own message."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import REPO, load_config_module, run_module

from moejax.config.args import parse_arg
from moejax.config.base import default_config
from moejax.config.validation import validate
from moejax.config_section import ConfigError
from moejax.models.flops import count_params
from moejax.models.transformer import Transformer
from moejax.sharding.topology import parse_topology

# configs/finetune.py is built from a converted run (its `base=`), so it is validated by
# tests/lora/test_finetune_recipe.py on one instead.
RUN_DERIVED = {"finetune"}
CONFIGS = sorted(
    p[:-3] for p in os.listdir(REPO / "configs") if p.endswith(".py") and p[:-3] not in RUN_DERIVED
)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", ["tiny", "pod"])
def test_every_config_validates_and_builds(name, size):
    config = load_config_module(name).get_config(f"size={size}")
    # A pod config's mesh fits the chips of its default slice (mesh.topology), 4 per host.
    devices = 1 if size == "tiny" else parse_topology(config.mesh.topology).chips
    s = validate(config, num_devices=devices, num_processes=max(1, devices // 4))
    model = Transformer(s.model, s.moe)
    tokens = jnp.zeros((1, min(s.data.seq_len, 64)), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract["params"])))
    assert n == count_params(s.model, s.moe).total
    # Non-trainable state: DeepSeek-V3's per-expert router bias, [MoE layers, E].
    biases = jax.tree.leaves(nn.unbox(abstract.get("router_bias", {})))
    if s.moe.selection == "sigmoid_bias" and s.model.num_moe_layers:
        assert [b.shape for b in biases] == [(s.model.num_moe_layers, s.moe.num_experts)]
    else:
        assert not biases


def test_default_config_is_valid():
    validate(default_config(), num_devices=1, num_processes=1)


# Bad values, one per field: tests/config/test_bad_configs.py.


BAD_SIGMOID_BIAS = [  # configs/deepseek_v3.py: 16 experts, top-4, 4 groups, top-2 groups
    ({"n_group": 3}, "moe.num_experts=16 is not divisible by moe.n_group=3"),
    ({"topk_group": 5}, "moe.topk_group=5 must be between 1 and moe.n_group=4"),
    (
        {"topk_group": 1, "top_k": 5},
        "moe.top_k=5 is more than the 4 experts in moe.topk_group=1 groups of 4",
    ),
    ({"routed_scaling_factor": 0.0}, "moe.routed_scaling_factor=0.0 must be > 0"),
]


@pytest.mark.parametrize(
    "overrides,message", BAD_SIGMOID_BIAS, ids=[",".join(b[0]) for b in BAD_SIGMOID_BIAS]
)
def test_bad_sigmoid_bias_config_is_rejected_with_its_own_message(overrides, message):
    config = load_config_module("deepseek_v3").get_config()
    config.moe.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config, num_devices=1, num_processes=1)


def test_device_balance_groups_default_to_the_expert_mesh_axis():
    config = load_config_module("deepseek_v3").get_config()
    config.moe.update(device_balance_coef=1e-3)
    config.mesh.update(data=-1, expert=4)
    assert validate(config, num_devices=4, num_processes=1).moe.balance_devices == 4
    assert config.moe.balance_devices == 0  # resolved in the sections, the config is as given
    config.moe.balance_devices = 2
    assert validate(config, num_devices=4, num_processes=1).moe.balance_devices == 2


@pytest.mark.parametrize("config_name", CONFIGS)
def test_pallas_dispatcher_is_accepted_by_every_config(config_name):
    config = load_config_module(config_name).get_config()
    config.moe.update(dispatcher="pallas", kernel_backend="jax_triton")
    sections = validate(config, num_devices=1, num_processes=1)
    assert sections.moe.dispatcher == "pallas" and sections.moe.kernel_backend == "jax_triton"


def test_expert_axis_must_divide_experts():
    config = load_config_module("deepseekmoe").get_config()
    config.mesh.update(data=-1, expert=3)
    with pytest.raises(ConfigError, match="moe.num_experts=16 is not divisible by mesh.expert=3"):
        validate(config, num_devices=6, num_processes=1)


def _fssdp_on_four_expert_devices(**moe):
    """configs/deepseekmoe.py (16 experts) with the fssdp dispatcher over mesh.expert=4."""
    config = load_config_module("deepseekmoe").get_config()
    config.mesh.update(data=-1, expert=4)
    config.moe.update(dispatcher="fssdp", **moe)
    return config


def test_adapter_runs_refuse_moving_the_experts_between_devices():
    config = _fssdp_on_four_expert_devices()
    config.lora.update(method="lora", targets="shared.*")
    with pytest.raises(ConfigError, match="--config.moe.fssdp_reshard_every=0 for adapter runs"):
        validate(config, num_devices=4, num_processes=1)
    config.moe.update(fssdp_reshard_every=0)
    assert validate(config, num_devices=4, num_processes=1).moe.fssdp_reshard_every == 0


def test_spare_expert_rows_must_divide_over_the_expert_axis():
    config = _fssdp_on_four_expert_devices(fssdp_spare_rows=6)
    with pytest.raises(ConfigError, match="fssdp_spare_rows=6 is not divisible by mesh.expert=4"):
        validate(config, num_devices=4, num_processes=1)
    config.moe.update(fssdp_spare_rows=8)
    assert validate(config, num_devices=4, num_processes=1).moe.fssdp_spare_rows == 8


def test_fssdp_slots_must_fit_the_experts_a_device_does_not_own():
    config = _fssdp_on_four_expert_devices(fssdp_slots=12)
    assert validate(config, num_devices=4, num_processes=1).moe.fssdp_slots == 12
    config.moe.update(fssdp_slots=13)
    with pytest.raises(ConfigError, match="moe.fssdp_slots=13 is more than the 12 experts"):
        validate(config, num_devices=4, num_processes=1)
    # On one device the plan runs locally with no replicas: the run reads back (load_run).
    config.mesh.update(expert=1)
    assert validate(config, num_devices=1, num_processes=1).moe.fssdp_slots == 13


def test_expert_parallel_tokens_must_split_over_the_token_axes():
    # A `batch` rule without data-parallel axes passes the batch check, but the
    # expert_parallel dispatcher still splits tokens over data * fsdp * expert = 3.
    config = load_config_module("deepseekmoe").get_config()
    config.mesh.update(data=3, rules=(("batch", None),) + tuple(config.mesh.rules[1:]))
    config.moe.update(dispatcher="expert_parallel")
    with pytest.raises(ConfigError, match="mesh.data \\* mesh.fsdp \\* mesh.expert = 3"):
        validate(config, num_devices=3, num_processes=1)


def test_batch_must_divide_over_data_parallel_devices():
    config = load_config_module("deepseekmoe").get_config()
    with pytest.raises(ConfigError, match="divide over the 32 data-parallel devices"):
        validate(config, num_devices=32, num_processes=1)


def test_unknown_fields_and_sections_are_named():
    config = default_config()
    config.unlock() if hasattr(config, "unlock") else None
    config.moe.topk = 2
    with pytest.raises(
        ConfigError,
        match=r"config.moe has unknown field\(s\) \['topk' \(did you mean 'top_k'\?\)\]; "
        r"valid fields are \[.*'top_k'",
    ):
        validate(config, num_devices=1, num_processes=1)
    config = default_config()
    config.optim = {"lr": 1.0}
    config.mo = {"top_k": 1}
    with pytest.raises(
        ConfigError, match=r"unknown section\(s\) \['mo' \(did you mean 'moe'\?\), 'optim'\]"
    ):
        validate(config, num_devices=1, num_processes=1)


def test_parse_arg_types_and_errors():
    arg = parse_arg("size=pod,steps=20,bf16=true", size="tiny", steps=300, bf16=False)
    assert (arg.size, arg.steps, arg.bf16) == ("pod", 20, True)
    with pytest.raises(ConfigError, match="unknown config arg 'sise'"):
        parse_arg("sise=pod", size="tiny")
    with pytest.raises(ConfigError, match="must be a int"):
        parse_arg("steps=many", steps=1)


def test_cli_rejects_bad_config_before_compiling(tmp_path):
    proc = run_module(
        "moejax.train",
        "--config=configs/dense.py",
        "--config.model.num_heads=3",
        f"--workdir={tmp_path}",
    )
    assert proc.returncode != 0
    assert "model.num_heads=3" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_lora_base_sources_are_exclusive():
    config = default_config()
    config.lora.update(method="lora", base_checkpoint="runs/base", base_hf="hf/llama")
    with pytest.raises(
        ConfigError,
        match=r"lora.base_checkpoint='runs/base' and "
        r"lora.base_hf='hf/llama' both name a base model",
    ):
        validate(config, num_devices=1, num_processes=1)


# What each LoRA method needs of the `lora` section is its own `check` (moejax.lora.methods);
# (method and fields, the message, or None for a section the method accepts).
LORA_METHOD_CHECKS = [
    (
        {"method": "flylora", "num_experts": 2, "rank": 2, "top_k": 5},
        "lora.top_k=5 must be <= lora.num_experts=2 * lora.rank (FlyLoRA activates ranks).",
    ),
    ({"method": "flylora", "num_experts": 2, "rank": 2, "top_k": 3}, None),  # 3 of 4 ranks
    (
        {"method": "lora", "num_experts": 2, "top_k": 3},
        "lora.top_k=3 must be <= lora.num_experts=2.",
    ),
    (
        {"method": "lora", "layer_experts": "2,4"},
        "lora.layer_experts='2,4' needs lora.method='moe' (MoLA routes each layer's experts); "
        "method='lora'.",
    ),
    (
        {"method": "sora", "dispatcher": "ragged"},
        "lora.dispatcher='ragged' dispatches routed experts, which only lora.method='moe' "
        "has; use 'none' for method='sora'.",
    ),
    ({"method": "moe", "num_experts": 4, "top_k": 2, "dispatcher": "ragged"}, None),
    (
        {"method": "mixlora", "num_experts": 4, "top_k": 2, "dispatcher": "none"},
        "lora.method='mixlora' routes with lora.router='softmax_topk', renormalize=True",
    ),
    (
        {"method": "moe", "num_experts": 4, "router": "dynmole", "renormalize": True},
        "lora.renormalize=True does not apply to lora.router='dynmole'",
    ),
    ({"method": "xlora", "num_experts": 2, "frozen_experts": True}, None),
    (
        {"method": "lora", "frozen_experts": True, "targets": "attn.wq,experts.*"},
        "lora.frozen_experts=True does not freeze LoRA on the routed experts",
    ),
]


@pytest.mark.parametrize("fields,message", LORA_METHOD_CHECKS)
def test_each_lora_method_checks_what_it_needs(fields, message):
    config = default_config()
    config.lora.update(fields)
    if message is None:
        assert validate(config, num_devices=1, num_processes=1).lora.method == fields["method"]
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config, num_devices=1, num_processes=1)
