"""The bad-config table: every field of every section has a check, and each bad value is
rejected by `validate` (before anything is compiled) with a message naming the field.

Values are set on a plain dict copy of configs/deepseekmoe.py (tiny size), so values of the
wrong type reach `validate` the way a hand-written dict or a loose config file would.
"""

import dataclasses

import pytest
from testing_utils import load_config_module

from moejax.config.base import SECTIONS, default_config
from moejax.config.validation import ConfigAdjustedWarning, validate
from moejax.config_section import ConfigError

BAD = [
    # model
    ("model.vocab_size", -1, "model.vocab_size=-1 must be positive"),
    ("model.vocab_size", 200, "model.vocab_size=200 is smaller than the 259 ids of data.tokenizer"),
    ("model.d_model", -8, "model.d_model=-8 must be positive"),
    ("model.num_layers", 2.5, "config.model.num_layers=2.5 must be an int"),
    ("model.num_heads", 3, "model.d_model=128 is not divisible by model.num_heads=3"),
    ("model.num_kv_heads", 3, "multiple of model.num_kv_heads=3"),
    ("model.head_dim", 7, "head dim 7 must be even for rotary embeddings; set model.head_dim"),
    ("model.head_dim", -1, "model.head_dim=-1 must be >= 0"),
    ("model.d_ff", 0, "model.d_ff=0 must be positive"),
    ("model.first_k_dense", 9, "model.first_k_dense=9 must be in [0, model.num_layers=4]"),
    ("model.moe_every", -1, "model.moe_every=-1 must be >= 0"),
    ("model.layer_kinds", "dense,moe", "has 2 entries for model.num_layers=4"),
    ("model.qk_norm", "layer", "model.qk_norm='layer' must be one of"),
    ("model.rope_theta", 0.0, "model.rope_theta=0.0 must be positive"),
    ("model.norm_eps", -1e-6, "model.norm_eps=-1e-06 must be positive"),
    ("model.tie_embeddings", "yes", "config.model.tie_embeddings='yes' must be a bool"),
    ("model.init_std", 0.0, "model.init_std=0.0 must be positive"),
    ("model.dtype", "float8", "model.dtype='float8' must be one of"),
    ("model.param_dtype", "int8", "model.param_dtype='int8' must be one of"),
    ("model.remat", "sometimes", "model.remat='sometimes' must be one of"),
    ("model.scan_layers", "no", "config.model.scan_layers='no' must be a bool"),
    ("model.attention", "mha", "model.attention='mha' must be one of ('gqa', 'mla')"),
    ("model.attention_impl", "splash", "model.attention_impl='splash' must be one of"),
    ("model.attention_bias", "yes", "config.model.attention_bias='yes' must be a bool"),
    ("model.q_lora_rank", -1, "model.q_lora_rank=-1 must be >= 0"),
    ("model.kv_lora_rank", -1, "model.kv_lora_rank=-1 must be >= 0"),
    ("model.qk_nope_head_dim", -1, "model.qk_nope_head_dim=-1 must be >= 0"),
    ("model.qk_rope_head_dim", -2, "model.qk_rope_head_dim=-2 must be >= 0"),
    ("model.v_head_dim", -1, "model.v_head_dim=-1 must be >= 0"),
    # moe
    ("moe.num_experts", 0, "moe.num_experts=0 must be >= 1"),
    ("moe.top_k", 17, "moe.top_k=17 must be between 1 and moe.num_experts=16"),
    ("moe.d_expert", 0, "moe.d_expert=0 must be positive"),
    ("moe.n_shared", -1, "moe.n_shared=-1 must be >= 0"),
    ("moe.scorer", "hash", "moe.scorer='hash' is not a registered scorer"),
    ("moe.selection", "hash", "moe.selection='hash' is not a selection rule"),
    ("moe.selection", "", "moe.selection='' is not a selection rule"),  # old "" = gru's default
    ("moe.router", "hash", "config.moe.router='hash' is an old field"),  # moejax.config.renames
    ("moe.renormalize", 1, "config.moe.renormalize=1 must be a bool"),
    ("moe.balance_coef", -0.1, "moe.balance_coef=-0.1 must be >= 0"),
    ("moe.z_loss_coef", -1.0, "moe.z_loss_coef=-1.0 must be >= 0"),
    ("moe.dispatcher", "megablocks", "moe.dispatcher='megablocks' is unknown"),
    ("moe.capacity_factor", 0.0, "moe.capacity_factor=0.0 must be > 0"),
    ("moe.gmm_impl", "cutlass", "moe.gmm_impl='cutlass' must be one of"),
    ("moe.gmm_tile", 0, "moe.gmm_tile=0 must be positive"),
    ("moe.hybrid_capacity_factor", -0.5, "moe.hybrid_capacity_factor=-0.5 must be >= 0"),
    ("moe.hybrid_tile", 0, "moe.hybrid_tile=0 must be positive"),
    ("moe.d_shared", -1, "moe.d_shared=-1 must be >= 0"),
    ("moe.shared_gate", 1, "config.moe.shared_gate=1 must be a bool"),
    ("moe.kernel_backend", "cuda", "moe.kernel_backend='cuda' must be one of"),
    ("moe.top_p", 1.5, "moe.top_p=1.5 must be in (0, 1]"),
    ("moe.gru_dim", 0, "moe.gru_dim=0 must be positive"),
    ("moe.gru_shared", "yes", "config.moe.gru_shared='yes' must be a bool"),
    ("moe.gru_detach", 0, "config.moe.gru_detach=0 must be a bool"),
    ("moe.entropy_coef", -1e-4, "moe.entropy_coef=-0.0001 must be >= 0"),
    ("moe.n_group", 3, "moe.num_experts=16 is not divisible by moe.n_group=3"),
    ("moe.topk_group", 2, "moe.topk_group=2 must be between 1 and moe.n_group=1"),
    ("moe.routed_scaling_factor", 0.0, "moe.routed_scaling_factor=0.0 must be > 0"),
    ("moe.group_mask", "nan", "moe.group_mask='nan' must be one of ['neg_inf', 'zero']"),
    ("moe.bias_update_rate", -1e-3, "moe.bias_update_rate=-0.001 must be >= 0"),
    ("moe.seq_balance_coef", -1.0, "moe.seq_balance_coef=-1.0 must be >= 0"),
    ("moe.device_balance_coef", -1.0, "moe.device_balance_coef=-1.0 must be >= 0"),
    ("moe.balance_devices", 3, "moe.num_experts=16 is not divisible by moe.balance_devices=3"),
    ("moe.ep_capacity_factor", -1.0, "moe.ep_capacity_factor=-1.0 must be >= 0"),
    ("moe.ep_exchange", "nccl", "moe.ep_exchange='nccl' must be one of"),
    ("moe.fssdp_slots", -1, "moe.fssdp_slots=-1 must be >= 0"),
    ("moe.fssdp_max_sends", -2, "moe.fssdp_max_sends=-2 must be >= 0"),
    ("moe.fssdp_remat", "yes", "config.moe.fssdp_remat='yes' must be a bool"),
    ("moe.fssdp_reshard_every", -1, "moe.fssdp_reshard_every=-1 must be >= 0"),
    ("moe.fssdp_spare_rows", -4, "moe.fssdp_spare_rows=-4 must be >= 0"),
    ("moe.fssdp_spare_rows", 4, "nothing re-lays out: moe.dispatcher="),
    ("moe.fuse_gate_up", "yes", "config.moe.fuse_gate_up='yes' must be a bool"),
    # data (checked by DataConfig itself)
    ("data.sources", "", "data.sources must not be empty"),
    ("data.sources", "mystery:x", "data.sources"),
    ("data.tokenizer", "", "data.tokenizer must not be empty"),
    ("data.tokenizer", "wordpiece:x", "data.tokenizer"),
    ("data.eval_fraction", 1.5, "data.eval_fraction must be in (0, 1)"),
    ("data.pad_id", -2, "data.pad_id must be -1"),
    ("data.worker_count", -1, "data.worker_count must be >= 0"),
    ("data.data_dir", 3, "data.data_dir must be str"),
    ("data.text_key", "", "data.text_key must not be empty"),
    ("data.seq_len", 0, "data.seq_len must be positive"),
    ("data.global_batch_size", -4, "data.global_batch_size must be positive"),
    ("data.seed", -1, "data.seed must be >= 0"),
    ("data.max_bytes_per_domain", 0, "data.max_bytes_per_domain must be positive"),
    ("data.train_split", "", "data.train_split must not be empty"),
    ("data.eval_split", "", "data.eval_split must not be empty"),
    ("data.shuffle", "no", "data.shuffle must be bool"),
    # train
    ("train.steps", 0, "train.steps=0 must be positive"),
    ("train.learning_rate", -1.0, "train.learning_rate=-1.0 must be positive"),
    ("train.warmup_steps", -1, "train.warmup_steps=-1 must be >= 0"),
    ("train.min_lr_ratio", 1.5, "train.min_lr_ratio=1.5 must be in [0, 1]"),
    ("train.resume_lr", "warm", "train.resume_lr='warm' is unknown; choose one of ['schedule'"),
    ("train.weight_decay", -0.1, "train.weight_decay=-0.1 must be >= 0"),
    ("train.b1", 1.0, "train.b1=1.0 must be in [0, 1)"),
    ("train.b2", -0.5, "train.b2=-0.5 must be in [0, 1)"),
    ("train.eps", 0.0, "train.eps=0.0 must be positive"),
    ("train.grad_clip", -1.0, "train.grad_clip=-1.0 must be >= 0"),
    ("train.grad_accum", 0, "train.grad_accum=0 must be >= 1"),
    ("train.grad_accum", 3, "not divisible by train.grad_accum=3"),
    ("train.loss_chunk", -1, "train.loss_chunk=-1 must be >= 0"),
    ("train.seed", -3, "train.seed=-3 must be >= 0"),
    ("train.log_every", 0, "train.log_every=0 must be >= 1"),
    ("train.eval_every", -1, "train.eval_every=-1 must be >= 0"),
    ("train.eval_batches", -1, "train.eval_batches=-1 must be >= 0"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be >= 1"),
    ("train.async_checkpoint", "true", "config.train.async_checkpoint='true' must be a bool"),
    ("train.peak_tflops", -1.0, "train.peak_tflops=-1.0 must be >= 0"),
    ("train.abort_on_nan", None, "config.train.abort_on_nan=None must be a bool"),
    ("train.skip_non_finite", "no", "config.train.skip_non_finite='no' must be a bool"),
    ("train.max_bad_steps", 0, "train.max_bad_steps=0 must be >= 1"),
    ("train.dead_expert_logs", -1, "train.dead_expert_logs=-1 must be >= 0"),
    ("train.max_dropped_fraction", 1.5, "train.max_dropped_fraction=1.5 must be in [0, 1]"),
    ("train.max_load_cv", 0.0, "train.max_load_cv=0.0 must be positive"),
    ("train.steps", "1000", "config.train.steps='1000' must be an int"),
    # mesh
    ("mesh.data", 0, "mesh.data=0 must be a positive size or -1"),
    ("mesh.fsdp", -1, "only one axis may be -1, got ['data', 'fsdp']"),
    ("mesh.expert", 3, "which does not divide the 1 devices"),
    ("mesh.tensor", 2, "uses 2 devices but 1 are available"),
    ("mesh.rules", (("embed", "model"),), "mesh.rules maps 'embed' to unknown mesh axis"),
    ("mesh.rules", (("embed",),), "must be a (logical_axis, mesh_axes) pair"),
    ("mesh.topology", "v5p:4x4", "mesh.topology='v5p:4x4': topology 'v5p:4x4': expected"),
    ("mesh.num_slices", 0, "mesh.num_slices=0 must be >= 1"),
    # lora
    ("lora.method", "qlora", "lora.method='qlora' must be one of"),
    ("lora.targets", "wq", "lora.targets='wq' must be comma-separated '<module>.<param>'"),
    ("lora.rank", 0, "lora.rank=0 must be positive"),
    ("lora.alpha", -1.0, "lora.alpha=-1.0 must be positive"),
    ("lora.rslora", "yes", "config.lora.rslora='yes' must be a bool"),
    ("lora.num_experts", 0, "lora.num_experts=0 must be positive"),
    ("lora.top_k", 3, "lora.top_k=3 must be <= lora.num_experts=1"),
    ("lora.base_checkpoint", "runs/base", "lora.method='none' trains the whole model"),
    ("lora.base_hf", 7, "config.lora.base_hf=7 must be a string"),
    ("lora.scaling", "sqrt", "lora.scaling='sqrt' must be one of"),
    ("lora.shared_a", "yes", "config.lora.shared_a='yes' must be a bool"),
    ("lora.router", "gru", "lora.router='gru' must be one of"),
    ("lora.renormalize", 1.5, "config.lora.renormalize=1.5 must be a bool"),
    ("lora.routed_scale", 0.0, "lora.routed_scale=0.0 must be positive"),
    ("lora.dispatcher", "pallas", "lora.dispatcher='pallas' must be one of"),
    ("lora.balance_coef", -0.1, "lora.balance_coef=-0.1 must be >= 0"),
    ("lora.z_loss_coef", -1e-3, "lora.z_loss_coef=-0.001 must be >= 0"),
    ("lora.entropy_coef", -0.01, "lora.entropy_coef=-0.01 must be >= 0"),
    ("lora.cv_coef", -1.0, "lora.cv_coef=-1.0 must be >= 0"),
    ("lora.top_p", 0.0, "lora.top_p=0.0 must be in (0, 1]"),
    ("lora.min_experts", 2, "lora.min_experts=2 must be in [1, lora.num_experts=1]"),
    ("lora.entropy_threshold", 1.5, "lora.entropy_threshold=1.5 must be in [0, 1]"),
    ("lora.tsallis_q", 1.0, "lora.tsallis_q=1.0 must be positive and != 1"),
    ("lora.bias_update_rate", -1e-3, "lora.bias_update_rate=-0.001 must be >= 0"),
    ("lora.layer_experts", "2,x", "lora.layer_experts='2,x' must be comma-separated"),
    ("lora.flylora_density", 2.0, "lora.flylora_density=2.0 must be in [0, 1]"),
    ("lora.xlora_temperature", 0.0, "lora.xlora_temperature=0.0 must be positive"),
    ("lora.xlora_top_k", 2, "lora.xlora_top_k=2 must be in [0, lora.num_experts=1]"),
    ("lora.sora_lambda", -1.0, "lora.sora_lambda=-1.0 must be >= 0"),
    ("lora.frozen_experts", True, "lora.frozen_experts=True freezes the experts of lora.method"),
]


def _config_with(field: str, value) -> dict:
    config = load_config_module("deepseekmoe").get_config().to_dict()
    section, key = field.split(".")
    config[section][key] = value
    if field == "mesh.tensor":
        config["mesh"]["data"] = 1  # both fixed: 1 * 2 devices asked for, 1 available
    return config


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_value_is_rejected_naming_the_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        validate(_config_with(field, value), num_devices=1, num_processes=1)
    assert message in str(err.value)
    assert field.split(".")[1] in str(err.value)


def test_the_table_covers_every_field():
    covered = {field for field, _, _ in BAD}
    every = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert every - covered == set()
    assert len(BAD) >= 25


def test_an_unset_vocabulary_takes_the_tokenizer_size_rounded_to_128():
    config = default_config()
    config.model.vocab_size = 0
    assert validate(config, num_devices=1, num_processes=1).model.vocab_size == 384  # 259 -> 384


def test_a_run_shorter_than_its_warmup_warms_up_over_all_its_steps():
    config = default_config()
    config.train.update(steps=20, warmup_steps=30)
    with pytest.warns(ConfigAdjustedWarning, match=r"warmup_steps=30 > train.steps=20"):
        s = validate(config, num_devices=1, num_processes=1)
    assert s.train.warmup_steps == 20


@pytest.mark.parametrize(
    "name, arg",
    [("deepseekmoe", None), ("gshard", None), ("dense", None), ("mole_multitask", "stage=base")],
)
def test_every_config_runs_twenty_steps(name, arg):
    """`make train ARGS=--config.train.steps=20` and `:stage=base` short runs validate."""
    config = load_config_module(name).get_config(arg)
    config.train.steps = 20
    with pytest.warns(ConfigAdjustedWarning):
        s = validate(config, num_devices=1, num_processes=1)
    assert (s.train.steps, s.train.warmup_steps) == (20, 20)


@pytest.mark.parametrize(
    "name, arg",
    [
        ("deepseekmoe", "steps=20"),
        ("gshard", "steps=20"),
        ("dense", "steps=20"),
        ("rmoe", "steps=20"),
        ("top_p", "steps=20"),
        ("deepseek_v3", "steps=20"),
        ("lora", "smora,steps=20"),
        ("mole_multitask", "stage=base,steps=20"),
        ("mole_multitask", "variant=lora,steps=5"),
    ],
)
def test_every_config_takes_a_short_typed_steps_argument(name, arg):
    """The typed `:steps=N` form (issue 23 item 2: `mole_multitask.py:stage=base,steps=20`
    was refused) warms up over at most N steps, with nothing left for validate to adjust."""
    import warnings

    config = load_config_module(name).get_config(arg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigAdjustedWarning)
        s = validate(config, num_devices=1, num_processes=1)
    steps = int(arg.rpartition("steps=")[2])
    assert s.train.steps == steps and 0 < s.train.warmup_steps <= steps
