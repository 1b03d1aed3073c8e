"""moejax.hf against transformers: logits parity (float32), expert layouts, shards, export
round trip, greedy decoding, clear errors, and conversion to a trainable workdir.

Tiny random models are built from configs on CPU (no downloads) and re-initialised with
larger weights (std 0.2, norm scales 1 +- 0.1) so attention and routing are far from
uniform and a wrong RoPE layout or expert order would show.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF parity tests need torch: pip install -e '.[hf]'")
transformers = pytest.importorskip(
    "transformers", reason="HF parity tests need transformers: pip install -e '.[hf]'"
)
pytest.importorskip("safetensors", reason="moejax.hf needs safetensors: pip install -e '.[hf]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hf_models import hf_logits, random_hf_model  # noqa: E402

import moejax.hf as mhf  # noqa: E402
from moejax.config_section import ConfigError  # noqa: E402
from moejax.generate import generate  # noqa: E402
from moejax.models.transformer import Transformer  # noqa: E402

TOL = 1e-4
SMALL = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
MLA = dict(
    kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4
)

# A 3-layer Qwen2-MoE whose MoE layers `mlp_only_layers` picks (cases below).
QWEN2_MOE_3 = dict(
    SMALL,
    num_hidden_layers=3,
    intermediate_size=48,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)
CONFIGS = {
    "llama_tied_gqa": (
        "LlamaConfig",
        dict(SMALL, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mixtral_top2": (
        "MixtralConfig",
        dict(
            SMALL,
            intermediate_size=24,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    # decoder_sparse_step=2: layer 0 dense, layer 1 MoE (moejax: one period of moe_every=2).
    "qwen2_moe_gate_norm_off": (
        "Qwen2MoeConfig",
        dict(
            SMALL,
            intermediate_size=48,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
            decoder_sparse_step=2,
        ),
    ),
    # mlp_only_layers=[1]: MoE, dense, MoE, not a dense prefix then periods (moejax:
    # model.layer_kinds, one scan per run).
    "qwen2_moe_mlp_only_middle": ("Qwen2MoeConfig", dict(QWEN2_MOE_3, mlp_only_layers=[1])),
    "qwen2_moe_mlp_only_norm_on": (
        "Qwen2MoeConfig",
        dict(QWEN2_MOE_3, norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True),
    ),
    # Qwen3-MoE: per-head q/k norm, head_dim != d_model / heads, layer 0 dense (mlp_only).
    "qwen3_moe_qk_norm": (
        "Qwen3MoeConfig",
        dict(
            SMALL,
            head_dim=12,
            intermediate_size=48,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
    ),
    # OLMoE: q/k norm over the whole projection (k over num_kv_heads * head_dim), raw top-k.
    "olmoe_qk_norm_full": (
        "OlmoeConfig",
        dict(
            SMALL,
            intermediate_size=16,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    # DeepSeek-V2-Lite's shape: no q compression, greedy softmax top-k, shared experts, layer
    # 0 dense ...
    "deepseek_v2_lite_greedy": (
        "DeepseekV2Config",
        dict(
            SMALL,
            **MLA,
            intermediate_size=48,
            q_lora_rank=None,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=2,
            routed_scaling_factor=1.0,
            topk_method="greedy",
            n_group=4,  # ignored by greedy
            topk_group=1,
        ),
    ),
    # ... and DeepSeek-V2's group-limited greedy routing with a routed scaling factor.
    "deepseek_v2_group_limited": (
        "DeepseekV2Config",
        dict(
            SMALL,
            **MLA,
            intermediate_size=48,
            q_lora_rank=16,
            first_k_dense_replace=0,
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            n_shared_experts=1,
            routed_scaling_factor=16.0,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
        ),
    ),
    # DeepSeek-V3 with every layer dense: MLA alone (q compression, interleaved RoPE) ...
    "deepseek_v3_mla_qlora": (
        "DeepseekV3Config",
        dict(
            SMALL,
            **MLA,
            intermediate_size=48,
            q_lora_rank=16,
            first_k_dense_replace=2,
            rope_interleave=True,
        ),
    ),
    # ... and without q compression, rotate-half RoPE, tied embeddings.
    "deepseek_v3_mla_no_qlora": (
        "DeepseekV3Config",
        dict(
            SMALL,
            **MLA,
            intermediate_size=48,
            q_lora_rank=None,
            first_k_dense_replace=2,
            rope_interleave=False,
            tie_word_embeddings=True,
        ),
    ),
}
MOE_GROUPS = {  # DeepSeek-V3 MoE layers: the sigmoid_bias router
    # first_k_dense_replace > 0, n_group > 1, routed_scaling_factor != 1, shared experts.
    "deepseek_v3_moe_groups": (
        "DeepseekV3Config",
        dict(
            SMALL,
            **MLA,
            num_hidden_layers=3,
            intermediate_size=48,
            q_lora_rank=16,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
    ),
}
ALL = {**CONFIGS, **MOE_GROUPS}


def build_hf(name, seed=0):
    config_cls, kwargs = ALL[name]
    return random_hf_model(config_cls, kwargs, seed)


def moejax_logits(path, ids):
    model, variables = mhf.from_pretrained(str(path))
    return np.asarray(model.apply(variables, jnp.asarray(ids))[0]), model, variables


IDS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, 9))


# Cases that repeat a cheaper one's code paths (olmoe: a q/k norm like qwen3's; v2-lite: the
# V2 router without groups) run with `make test-slow`.
SLOW = ("olmoe_qk_norm_full", "deepseek_v2_lite_greedy")


@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(ALL)],
)
def saved(request, tmp_path_factory):
    name = request.param
    model = build_hf(name)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return name, model, path


def test_logits_parity(saved):
    name, model, path = saved
    want = hf_logits(model, IDS)
    got, _, _ = moejax_logits(path, IDS)
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = np.abs(got - want).max()
    print(f"{name}: max |logits diff| = {diff:.2e} (logits up to {np.abs(want).max():.1f})")
    assert diff < TOL


@pytest.mark.parametrize("name", ["mixtral_top2", "qwen2_moe_gate_norm_off"])
def test_fused_expert_layout_and_shards(name, tmp_path):
    """transformers 5.x in-memory layout (experts.gate_up_proj [E, 2I, d]) written as is, in
    several safetensors shards with an index."""
    from safetensors.torch import save_file

    model = build_hf(name, seed=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    keys = sorted(state)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in shard}, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    model.config.save_pretrained(tmp_path)
    got, _, _ = moejax_logits(tmp_path, IDS)
    assert np.abs(got - hf_logits(model, IDS)).max() < TOL


def test_hf_sharded_save(tmp_path):
    model = build_hf("qwen2_moe_mlp_only_norm_on", seed=2)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    got, _, _ = moejax_logits(tmp_path, IDS)
    assert np.abs(got - hf_logits(model, IDS)).max() < TOL


def test_export_in_shards(tmp_path):
    """save_pretrained(max_shard_bytes=) writes several shards and the index transformers
    reads; the one-file save of the same directory afterwards leaves no stale index."""
    model = build_hf("qwen2_moe_mlp_only_norm_on", seed=3)
    model.save_pretrained(tmp_path / "hf")
    got, mj_model, variables = moejax_logits(tmp_path / "hf", IDS)
    out = tmp_path / "out"
    mhf.save_pretrained(mj_model, variables, str(out), max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == float32_bytes(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(hf_logits(back, IDS) - got).max() < TOL
    mhf.save_pretrained(mj_model, variables, str(out))
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").exists()


def float32_bytes(path):
    """Bytes of the float32 tensors in the directory's safetensors files, from their headers."""
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as f:
            total += sum(4 * int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


def test_export_round_trip(saved, tmp_path):
    """moejax -> save_pretrained -> transformers gives the same logits."""
    name, model, path = saved
    got, mj_model, variables = moejax_logits(path, IDS)
    arch = mhf.save_pretrained(mj_model, variables, str(tmp_path))
    assert arch.name == model.config.architectures[0]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert np.abs(hf_logits(back, IDS) - got).max() < TOL


def test_export_of_a_moejax_initialised_model(tmp_path):
    """A model that never came from HF (moejax init, Qwen2-MoE features) loads in
    transformers as the same function."""
    from moejax.models.config import ModelConfig
    from moejax.moe.config import MoEConfig

    m = ModelConfig(
        vocab_size=96,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        d_ff=48,
        attention_bias=True,
        init_std=0.2,
    )
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        d_expert=16,
        n_shared=1,
        d_shared=24,
        shared_gate=True,
        renormalize=False,
    )
    model = Transformer(m, moe)
    variables = jax.tree.map(lambda a: a + 0.1, model.init(jax.random.PRNGKey(3), IDS))
    variables = {"params": jax.tree.map(np.asarray, dict(variables))["params"]}
    import flax.linen as nn

    variables = nn.unbox(variables)
    want = np.asarray(model.apply(variables, jnp.asarray(IDS))[0])
    assert mhf.save_pretrained(model, variables, str(tmp_path)).name == "Qwen2MoeForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert np.abs(hf_logits(back, IDS) - want).max() < TOL


def test_layer_layout_keys_map_to_layer_kinds_and_back():
    """mlp_only_layers / decoder_sparse_step / first_k_dense_replace -> the per-layer layout
    (periodic ones keep first_k_dense / moe_every), and export writes them back."""
    import dataclasses

    from moejax.hf.architectures import MIXTRAL
    from moejax.hf.layout import choose_architecture, from_hf_config, to_hf_config

    def hf_config(name, **change):
        config_cls, kwargs = ALL[name]
        config = getattr(transformers, config_cls)(**{**kwargs, **change})
        return {**config.to_dict(), "architectures": [config_cls.replace("Config", "ForCausalLM")]}

    arch, m, moe = from_hf_config(hf_config("qwen2_moe_mlp_only_middle"))
    assert (m.layer_kinds, m.periodic) == ("moe,dense,moe", None)
    hf = to_hf_config(arch, m, moe)
    assert (hf["mlp_only_layers"], hf["decoder_sparse_step"]) == ([1], 1)
    # 5 layers, step 2 and layer 3 dense: MoE only at layer 1
    _, m5, _ = from_hf_config(
        hf_config(
            "qwen2_moe_mlp_only_middle",
            num_hidden_layers=5,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        )
    )
    assert m5.layer_kinds == "dense,moe,dense,dense,dense"
    _, m_old, _ = from_hf_config(hf_config("qwen2_moe_mlp_only_norm_on"))  # layer 0 dense
    assert (m_old.first_k_dense, m_old.moe_every, m_old.layer_kinds) == (1, 1, "")
    kinds = dataclasses.replace(m_old, first_k_dense=0, layer_kinds="dense,moe,moe")
    hf = to_hf_config(arch, kinds, moe)  # a periodic layer_kinds: the old fields
    assert (hf["mlp_only_layers"], hf["decoder_sparse_step"]) == ([0], 1)
    _, ds, _ = from_hf_config(hf_config("deepseek_v3_mla_qlora", first_k_dense_replace=1))
    assert (ds.first_k_dense, ds.moe_every, ds.layer_kinds) == (0, 2, "")  # as before
    # A dense layer between MoE layers: only the Qwen-MoE architectures say it.
    assert choose_architecture(m, moe)[0].name == "Qwen2MoeForCausalLM"
    refused = "MixtralForCausalLM cannot express .*the layer layout moe,dense,moe "
    with pytest.raises(ConfigError, match=refused):
        to_hf_config(MIXTRAL, m, moe)
    # Per-layer expert counts: no Hugging Face architecture has them.
    per_layer = dataclasses.replace(m, layer_kinds="moe,dense,moe:e=2")
    with pytest.raises(ConfigError, match=r"different \(experts, top-k\).*per-layer expert count"):
        choose_architecture(per_layer, moe)


@pytest.mark.parametrize(
    "name",
    [
        "mixtral_top2",
        "qwen2_moe_gate_norm_off",
        "deepseek_v3_mla_qlora",
        "deepseek_v3_moe_groups",
        "qwen3_moe_qk_norm",
        "deepseek_v2_group_limited",
        pytest.param("olmoe_qk_norm_full", marks=pytest.mark.slow),
    ],
)
def test_greedy_generate_matches_hf(name, tmp_path):
    model = build_hf(name, seed=4)
    model.save_pretrained(tmp_path)
    mj_model, variables = mhf.from_pretrained(str(tmp_path))
    prompt = IDS[:, :5]
    with torch.no_grad():
        want = model.generate(
            torch.tensor(prompt),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    got = np.asarray(generate(mj_model, variables, prompt, 20))
    np.testing.assert_array_equal(got, want)


def _write(path, config):
    with open(path / "config.json", "w") as f:
        json.dump(config, f)


def test_unsupported_architecture_key_and_value_are_named(saved, tmp_path):
    name, _, path = saved
    if name != "mixtral_top2":
        pytest.skip("one architecture is enough")
    config = mhf.read_config(str(path))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    _write(tmp_path, {**config, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*unsupported architecture"):
        mhf.from_pretrained(str(tmp_path))
    _write(tmp_path, {**config, "attention_sink_size": 4})
    with pytest.raises(ConfigError, match=r"unsupported key\(s\) \['attention_sink_size'\]"):
        mhf.from_pretrained(str(tmp_path))
    _write(
        tmp_path,
        {
            **config,
            "hidden_act": "gelu",
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4},
        },
    )
    with pytest.raises(ConfigError, match="hidden_act='gelu'.*rope_type='yarn'"):
        mhf.from_pretrained(str(tmp_path))
    _write(tmp_path, {**config, "num_local_experts": 8})  # tensors no longer match
    with pytest.raises(ConfigError, match=r"gate.weight has shape \(32, 4\).*needs \(32, 8\)"):
        mhf.from_pretrained(str(tmp_path))


def test_convert_writes_a_workdir_the_trainer_fine_tunes(tmp_path, tiny_config):
    from moejax.config.train import TrainConfig
    from moejax.data.tokenizer_training import train_tokenizer
    from moejax.train.checkpoint import Checkpointer
    from moejax.train.convert_hf import convert
    from moejax.train.loop import train
    from moejax.train.optimizer import make_optimizer
    from moejax.train.step import TrainState

    hf_dir = tmp_path / "hf"
    config = transformers.MixtralConfig(**dict(CONFIGS["mixtral_top2"][1], vocab_size=260))
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(hf_dir)
    # The checkpoint's tokenizer: a byte-level BPE of at most 260 ids (the model's rows).
    texts = [f"def f{i}(x): return x + {i}\n" for i in range(50)]
    train_tokenizer(texts, kind="bpe", vocab_size=260, out_dir=str(hf_dir))
    workdir = tmp_path / "run"
    convert(str(hf_dir), str(workdir))
    assert (workdir / "tokenizer" / "tokenizer.json").read_bytes() == (
        hf_dir / "tokenizer.json"
    ).read_bytes()
    import importlib.util

    spec = importlib.util.spec_from_file_location("converted", workdir / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.data.tokenizer == f"hf:{workdir / 'tokenizer'}"  # the run's own copy
    base = tiny_config("dense")
    c.data.update({k: v for k, v in base.data.to_dict().items() if k != "tokenizer"})
    c.train.update(
        steps=2,
        warmup_steps=0,
        learning_rate=1e-4,
        log_every=1,
        eval_every=0,
        checkpoint_every=1,
        async_checkpoint=False,
        peak_tflops=1.0,
    )
    metrics = train(c, str(workdir))
    assert metrics["step"] == 2 and np.isfinite(metrics["train/loss"])
    _, variables = mhf.from_pretrained(str(hf_dir))
    params = variables["params"]
    target = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(TrainConfig()).init(params),
    )
    with Checkpointer(str(workdir)) as ckpt:
        assert ckpt.all_steps() == [0, 1, 2]
        restored = ckpt.restore(2, target=target)[0]
    got = restored.params["moe_layers"]["attn"]["wq"]
    want = np.asarray(variables["params"]["moe_layers"]["attn"]["wq"])
    assert 0 < np.abs(np.asarray(got) - want).max() < 5e-3  # fine-tuned from the HF weights


def test_convert_keeps_deepseek_v3_router_bias_in_the_train_state(tmp_path):
    from moejax.config.train import TrainConfig
    from moejax.train.checkpoint import Checkpointer
    from moejax.train.convert_hf import convert
    from moejax.train.optimizer import make_optimizer
    from moejax.train.step import TrainState

    model = build_hf("deepseek_v3_moe_groups")
    model.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "run"))
    _, variables = mhf.from_pretrained(str(tmp_path / "hf"))
    params = variables["params"]
    target = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(TrainConfig()).init(params),
        collections={"router_bias": variables["router_bias"]},
    )
    with Checkpointer(str(tmp_path / "run")) as ckpt:
        restored = ckpt.restore(0, target=target)[0]
    want = [b.numpy() for k, b in model.named_buffers() if k.endswith("e_score_correction_bias")]
    got = np.asarray(jax.tree.leaves(restored.collections["router_bias"])[0])
    assert got.shape[0] == len(want) and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, np.stack(want))


def test_options_the_new_architectures_cannot_express_are_named(saved, tmp_path):
    """DeepSeek-V2: norm_topk_prob / moe_layer_freq (transformers ignores them where
    DeepSeek's code does not; V3's moe_layer_freq too) and topk_method other than greedy /
    group_limited_greedy; Qwen3-MoE: attention_bias (it biases o_proj too); OLMoE: clip_qkv."""
    name, _, path = saved
    bad = {
        "deepseek_v2_group_limited": [
            ({"norm_topk_prob": True}, "norm_topk_prob=True"),
            ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
            ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
        ],
        "deepseek_v3_mla_qlora": [({"moe_layer_freq": 2}, "moe_layer_freq=2")],
        "qwen3_moe_qk_norm": [({"attention_bias": True}, "attention_bias=True")],
        "olmoe_qk_norm_full": [({"clip_qkv": 8.0}, "clip_qkv=8.0")],
    }.get(name)
    if bad is None:
        pytest.skip("covers the architectures added with qk_norm and DeepSeek-V2")
    config = mhf.read_config(str(path))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    for change, message in bad:
        _write(tmp_path, {**config, **change})
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            mhf.from_pretrained(str(tmp_path))
