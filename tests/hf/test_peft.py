"""peft LoRA adapters both ways: transformers + peft and moejax give the same logits (float32,
CPU, within 1e-4) for a random adapter on a tiny random Llama, and for LoRA on the routed
experts (peft's `target_parameters` on transformers' fused experts) of tiny Qwen3-MoE,
Mixtral and Qwen2-MoE; unsupported options raise."""

import json

import flax.traverse_util
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="peft tests need torch: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="peft tests need peft: pip install peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hf_models import random_hf_model  # noqa: E402

import moejax.hf as mhf  # noqa: E402
from moejax.config_section import ConfigError  # noqa: E402
from moejax.lora.config import LoRAConfig  # noqa: E402
from moejax.lora.hook import adapters_for  # noqa: E402
from moejax.lora.targets import is_adapter_path  # noqa: E402
from moejax.nn.trees import join_trees, split_tree  # noqa: E402

TOL = 1e-4
IDS = np.random.default_rng(0).integers(0, 96, (2, 9))
LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=48,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = random_hf_model("LlamaConfig", LLAMA)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _hf_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _random_adapter(base, path, seed=1, **config):
    """A peft LoRA adapter on the Llama `base` with random A and B (large enough to move the
    logits), saved in `path`; returns the peft model."""
    torch.manual_seed(seed)
    defaults = dict(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"],
    )
    config = {**defaults, **config}
    hf = peft.get_peft_model(_hf_base(base), peft.LoraConfig(**config)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_imports_with_the_same_logits(base, tmp_path, rslora):
    hf = _random_adapter(base, tmp_path, use_rslora=rslora)
    want = _logits(hf)
    model, variables = mhf.from_pretrained(str(base), adapter=str(tmp_path))
    assert model.adapters.cfg.rank == 4 and model.adapters.cfg.rslora == rslora
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(IDS))[0])
    assert np.abs(want - _logits(_hf_base(base))).max() > 0.1  # the adapter matters
    assert np.abs(got - want).max() < TOL


def _with_random_moejax_adapters(plain, variables, lora: LoRAConfig):
    """`plain` with `lora`'s adapters, and its params with random adapter leaves (0.3 N(0, 1),
    large enough to move the logits) joined to `variables`' base params."""
    import flax.linen as nn

    model = plain.clone(adapters=adapters_for(lora))
    fresh = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(IDS)))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    adapters = jax.tree_util.tree_unflatten(
        treedef,
        [
            0.3 * jax.random.normal(k, x.shape) if is_adapter_path(p) else None
            for k, (p, x) in zip(keys, leaves)
        ],
    )
    return model, join_trees(variables["params"], split_tree(adapters, is_adapter_path)[0])


def test_moejax_adapter_exports_to_peft(base, tmp_path):
    plain, variables = mhf.from_pretrained(str(base))
    lora = LoRAConfig(method="lora", targets="attn.wq,attn.wk,mlp.w_up", rank=3, alpha=5.0)
    model, params = _with_random_moejax_adapters(plain, variables, lora)
    want = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))[0])
    mhf.save_adapter(model, {"params": params}, str(tmp_path))
    hf = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path)).eval()
    n_lora = sum(p.numel() for k, p in hf.named_parameters() if "lora_" in k)
    assert n_lora == sum(x.size for x in jax.tree.leaves(split_tree(params, is_adapter_path)[0]))
    assert np.abs(_logits(hf) - want).max() < TOL


@pytest.mark.parametrize(
    "option,value",
    [
        ("use_dora", True),
        ("bias", "all"),
        ("modules_to_save", ["lm_head"]),
        ("rank_pattern", {"q_proj": 8}),
        ("alpha_pattern", {"q_proj": 2}),
        ("layers_to_transform", [0]),
        ("fan_in_fan_out", True),
        ("peft_type", "IA3"),
        ("some_future_option", {"enabled": True}),
    ],
)
def test_unsupported_peft_options_are_named(base, tmp_path, option, value):
    torch.manual_seed(1)
    hf = peft.get_peft_model(_hf_base(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    hf.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[option] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=option):
        mhf.from_pretrained(str(base), adapter=str(tmp_path))


def test_hf_directory_as_the_base_of_an_adapter_run(base, tmp_path):
    """lora.base_hf: the frozen base of an adapter run read with from_pretrained, placed like
    the model's params; a model section of another shape is refused naming the field."""
    import dataclasses

    import flax.linen as nn

    from moejax.models.transformer import Transformer
    from moejax.train.adapter_checkpoint import BaseModelError, fingerprint, load_base

    plain, variables = mhf.from_pretrained(str(base))
    lora = LoRAConfig(method="lora", targets="attn.*", rank=2, base_hf=str(base))
    model = Transformer(plain.model, plain.moe, adapters=adapters_for(lora))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(IDS))),
    )
    loaded, source = load_base(lora, str(tmp_path), abstract["params"], None, plain.model)
    assert source["kind"] == "hf" and source["path"] == str(base)
    assert fingerprint(loaded["params"]) == fingerprint(variables["params"])
    other = dataclasses.replace(plain.model, num_kv_heads=4)
    with pytest.raises(
        BaseModelError,
        match=r"num_kv_heads=2 but the config has "
        r"model.num_kv_heads=4",
    ):
        load_base(lora, str(tmp_path), abstract["params"], None, other)


def _adapter_pair(base, tmp_path):
    """Two peft adapters on `base` with different random weights and alphas, and the peft
    logits of each alone."""
    hf_a = _random_adapter(base, tmp_path / "a", seed=1)
    hf_b = _random_adapter(base, tmp_path / "b", seed=2, lora_alpha=4)
    return {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, _logits(hf_a), _logits(hf_b)


def test_peft_adapters_as_frozen_xlora_experts(base, tmp_path):
    """from_pretrained(adapters=...): the adapters are X-LoRA's experts in `lora_frozen`.
    (a) a classifier that gives one expert all the weight reproduces that adapter's peft
    logits; (b) a training step (moejax's optimizer on the trainable mask) moves the
    classifier only; (c) below."""
    import optax

    from moejax.config.train import TrainConfig
    from moejax.lora.trainable import is_trainable
    from moejax.train.optimizer import make_optimizer

    dirs, want_a, want_b = _adapter_pair(base, tmp_path)
    model, variables = mhf.from_pretrained(str(base), adapters=dirs, method="xlora")
    cfg = model.adapters.cfg
    assert (cfg.method, cfg.num_experts, cfg.frozen_experts, cfg.rank) == ("xlora", 2, True, 4)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    assert {k for k in flat if is_adapter_path(k.split("/"))} == {
        "lora_xlora_classifier/kernel",
        "lora_xlora_classifier/bias",
    }
    apply = jax.jit(model.apply)
    ids = jnp.asarray(IDS)
    # (a) X-LoRA's scalings forced to one expert: kernel 0, bias +-50 (softmax -> 1, ~1e-44).
    params = variables["params"]
    for bias, want in (([50.0, -50.0], want_a), ([-50.0, 50.0], want_b)):
        classifier = {"kernel": jnp.zeros_like(params["lora_xlora_classifier"]["kernel"])}
        classifier["bias"] = jnp.asarray(bias)
        forced = {**variables, "params": {**params, "lora_xlora_classifier": classifier}}
        got = np.asarray(apply(forced, ids)[0])
        assert np.abs(got - want).max() < TOL
    assert np.abs(want_a - want_b).max() > 0.1  # the two adapters differ
    # (b) one optimizer step: only the classifier moves, the experts stay bit-identical.
    tx = make_optimizer(TrainConfig(warmup_steps=0, learning_rate=1e-2), model.adapters)

    def loss(p):
        logits = model.apply({**variables, "params": p}, ids[:, :-1])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p):
        updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
        return optax.apply_updates(p, updates)

    after = flax.traverse_util.flatten_dict(step(params), sep="/")
    moved = {k for k, v in flat.items() if not np.array_equal(np.asarray(v), after[k])}
    assert (
        moved
        == {k for k in flat if is_trainable(k.split("/"))}
        == {
            "lora_xlora_classifier/kernel",
            "lora_xlora_classifier/bias",
        }
    )


def test_xlora_over_peft_adapters_decodes_with_the_cache(base, tmp_path):
    """(c) greedy decoding with the key/value cache (one per X-LoRA pass) is the argmax of the
    full forward at every step (fast on a random model: tests/lora/test_variants.py)."""
    from moejax.generate import generate

    dirs, _, _ = _adapter_pair(base, tmp_path)
    model, variables = mhf.from_pretrained(str(base), adapters=dirs, method="xlora")
    params = variables["params"]
    classifier = jax.tree.map(lambda x: 0.5 + x * 30, params["lora_xlora_classifier"])
    variables = {**variables, "params": {**params, "lora_xlora_classifier": classifier}}
    tokens = np.asarray(generate(model, variables, jnp.asarray(IDS[:, :4]), 4))
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens))[0])
    np.testing.assert_array_equal(tokens[:, 4:], np.argmax(logits[:, 3:-1], -1))


def test_peft_adapters_as_frozen_routed_experts(base, tmp_path):
    """method="moe" (LoRA-Mixer's frozen experts behind a router per projection): the routers
    are the only trainable adapter leaves; routers with zero weights mix the two adapters
    half and half, as X-LoRA's classifier forced to scalings (0.5, 0.5) does."""
    dirs, _, _ = _adapter_pair(base, tmp_path)
    ids = jnp.asarray(IDS)
    model, variables = mhf.from_pretrained(str(base), adapters=dirs, method="moe")
    cfg = model.adapters.cfg
    assert (cfg.method, cfg.num_experts, cfg.top_k, cfg.frozen_experts) == ("moe", 2, 2, True)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    adapter_leaves = {k for k in flat if is_adapter_path(k.split("/"))}
    assert adapter_leaves and all("/router/" in k for k in adapter_leaves)
    zero = {k: jnp.zeros_like(v) if k in adapter_leaves else v for k, v in flat.items()}
    routed = {**variables, "params": flax.traverse_util.unflatten_dict(zero, sep="/")}
    got = np.asarray(jax.jit(model.apply)(routed, ids)[0])
    xlora, xvars = mhf.from_pretrained(str(base), adapters=dirs, method="xlora")
    half = jax.tree.map(jnp.zeros_like, xvars["params"]["lora_xlora_classifier"])
    xvars = {**xvars, "params": {**xvars["params"], "lora_xlora_classifier": half}}
    want = np.asarray(jax.jit(xlora.apply)(xvars, ids)[0])
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - _logits(_hf_base(base))).max() > 0.1  # the experts matter


def test_mixture_adapters_must_match_and_methods_are_named(base, tmp_path):
    dirs = {"a": str(tmp_path / "a"), "c": str(tmp_path / "c")}
    _random_adapter(base, tmp_path / "a", seed=1)
    _random_adapter(base, tmp_path / "c", seed=3, r=2)
    with pytest.raises(ConfigError, match=r"adapter 'c' .* has rank r = 2 .* adapter 'a'"):
        mhf.from_pretrained(str(base), adapters=dirs, method="xlora")
    with pytest.raises(ConfigError, match="method='mixlora'.*xlora"):
        mhf.from_pretrained(str(base), adapters=dirs, method="mixlora")


# LoRA on routed experts: peft's target_parameters on transformers' fused experts.
MOE = dict(LLAMA, num_experts_per_tok=2)
MOE_BASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, num_experts=4, moe_intermediate_size=16)),
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=4, intermediate_size=16)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    ),
}
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _moe_base(name, path):
    config_cls, kwargs = MOE_BASES[name]
    random_hf_model(config_cls, kwargs).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "name,params",
    [
        ("qwen3_moe", EXPERT_PARAMS),
        pytest.param("mixtral", EXPERT_PARAMS, marks=pytest.mark.slow),
        pytest.param("qwen2_moe", EXPERT_PARAMS, marks=pytest.mark.slow),
        pytest.param("qwen3_moe", EXPERT_PARAMS[1:], marks=pytest.mark.slow),
    ],
)
def test_peft_expert_adapter_imports_with_the_same_logits(tmp_path, name, params):
    base = _moe_base(name, tmp_path / "base")
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        init_lora_weights=False,
        target_modules=["q_proj", "v_proj"],
        target_parameters=params,
    )
    hf = peft.get_peft_model(_hf_base(base), config).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "adapter")
    want = _logits(hf)
    model, variables = mhf.from_pretrained(str(base), adapter=str(tmp_path / "adapter"))
    targets = set(model.adapters.cfg.targets.split(","))
    assert targets == {"attn.wq", "attn.wv"} | (
        {"experts.w_gate", "experts.w_up"} if len(params) == 2 else set()
    ) | {"experts.w_down"}
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(IDS))[0])
    assert np.abs(want - _logits(_hf_base(base))).max() > 0.1  # the adapter matters
    err = np.abs(got - want).max()
    print(f"{name} {params}: max |logits diff| = {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize(
    "name",
    ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)],
)
def test_moejax_expert_adapter_exports_to_peft(tmp_path, name):
    """Gate and up with their own A: peft gets one rank-2r gate_up adapter (and every other
    adapter zero-padded to 2r) computing the same function."""
    base = _moe_base(name, tmp_path / "base")
    plain, variables = mhf.from_pretrained(str(base))
    lora = LoRAConfig(method="lora", targets="attn.wq,experts.*", rank=2, alpha=5.0)
    model, params = _with_random_moejax_adapters(plain, variables, lora)
    want = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))[0])
    config = mhf.save_adapter(model, {"params": params}, str(tmp_path / "adapter"))
    assert config["r"] == 4 and config["lora_alpha"] == 10.0
    assert config["target_parameters"] == sorted(EXPERT_PARAMS)
    hf = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path / "adapter")).eval()
    err = np.abs(_logits(hf) - want).max()
    print(f"{name}: max |peft - moejax| = {err:.2e}")
    assert err < TOL
    # And back: moejax reads its own export as the same function.
    back, back_vars = mhf.from_pretrained(str(base), adapter=str(tmp_path / "adapter"))
    got = np.asarray(jax.jit(back.apply)(back_vars, jnp.asarray(IDS))[0])
    assert np.abs(got - want).max() < TOL
