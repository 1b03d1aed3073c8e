"""LoRA-expert variants (moejax.lora.variants) against float64 NumPy references.

Each variant's adapter on random inputs with random non-zero B equals a NumPy
re-implementation of its gates and mixture; rank-wise experts with every rank active and
unit gates are plain LoRA of rank r; zero-initialised adapters leave the model's logits
exactly as the base model's; the sign-rule bias update and SoRA's proximal step and pruning
match hand-computed values.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moejax.lora import sora
from moejax.lora.adapter import LoRAAdapter
from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.lora.targets import is_adapter_path
from moejax.lora.variants import MODEL_OVERRIDES, VARIANTS
from moejax.lora.weights import lora_scale
from moejax.models.config import ModelConfig
from moejax.models.side_outputs import apply_model
from moejax.models.transformer import Transformer
from moejax.moe.config import MoEConfig
from moejax.nn.adapter_hook import AdapterContext
from moejax.nn.mlp import DenseMLP
from moejax.nn.trees import split_tree
from moejax.train.state_rules import sign_rule, sign_rule_update

D_IN, D_OUT, T = 8, 6, 10
SMALL = {  # fewer experts than the papers, same rules
    "mola": dict(num_experts=4),
    "loramoe": dict(num_experts=3, top_k=3),
    "smora": dict(num_experts=6, top_k=3, routed_scale=3.0),
    "flylora": dict(num_experts=6, top_k=2, alpha=12.0),
    "dynmole": dict(num_experts=4, top_k=4),
}


def variant(name: str, **extra) -> LoRAConfig:
    return LoRAConfig(
        **{**VARIANTS[name], "rank": VARIANTS[name].get("rank", 2), **SMALL.get(name, {}), **extra}
    )


@pytest.fixture()
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _randomise(variables, seed=1):
    """Non-zero B (a trained adapter), non-zero balancing biases, random SoRA gates, and
    routers with O(1) logits (so routing is far from uniform)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for k, (path, v) in zip(keys, leaves):
        name = path[-1].key
        if name in ("b", "gate", "kernel") or (name == "bias" and path[0].key == "lora_bias"):
            v = jax.random.normal(k, v.shape, v.dtype) * {"bias": 0.3, "kernel": 0.2}.get(name, 1)
        out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _topk_mask(score, k):
    idx = np.argsort(-score, axis=-1, kind="stable")[:, :k]
    mask = np.zeros_like(score, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def reference_gates(cfg: LoRAConfig, v, x, h, gates_in):
    """g[T, E] of each method, float64 NumPy, from the adapter's variables."""
    if cfg.method in ("lora", "sora"):
        return None
    if cfg.method == "xlora":
        return np.asarray(gates_in, np.float64)
    if cfg.method == "flylora":
        bias = np.asarray(v["lora_bias"]["bias"], np.float64)
        return _topk_mask(np.abs(h.reshape(T, -1) + bias), cfg.top_k).astype(np.float64)
    logits = x @ np.asarray(v["params"]["router"]["kernel"], np.float64)
    if cfg.router == "sigmoid_bias":
        s = 1 / (1 + np.exp(-logits))
        mask = _topk_mask(s + np.asarray(v["lora_bias"]["router"]["bias"], np.float64), cfg.top_k)
        g = np.where(mask, s, 0.0)
        return g / g.sum(-1, keepdims=True) * cfg.routed_scale
    probs = _softmax(logits)
    if cfg.router == "dynmole":
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        keep = (np.cumsum(sorted_p, -1) <= cfg.top_p) | (
            np.arange(e := probs.shape[-1]) < cfg.min_experts
        )
        q = cfg.tsallis_q
        tsallis = (1 - (probs**q).sum(-1)) / (q - 1) / ((1 - e ** (1 - q)) / (q - 1))
        keep |= (tsallis > cfg.entropy_threshold)[:, None]
        mask = np.zeros_like(keep)
        np.put_along_axis(mask, order, keep, -1)
        return np.where(mask, probs, 0.0)
    g = np.where(_topk_mask(probs, cfg.top_k), probs, 0.0)
    return g / g.sum(-1, keepdims=True) if cfg.renormalize else g


def reference_delta(cfg: LoRAConfig, v, x, gates_in=None):
    a = np.asarray(v["params"]["a"] if "a" in v["params"] else v["lora_frozen"]["a"], np.float64)
    b = np.asarray(v["params"]["b"], np.float64)
    e, r = b.shape[:2]
    h = np.einsum("td,edr->ter", x, a)  # [T, E or 1, r]
    if cfg.method == "sora":
        h = h * np.asarray(v["params"]["gate"], np.float64)
    g = reference_gates(cfg, v, x, h, gates_in)
    h = np.broadcast_to(h, (T, e, r))
    if g is not None:
        h = h * g[:, :, None]
    return lora_scale(cfg) * np.einsum("ter,erd->td", h, b), g


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - {"mixlora"}))  # mixlora: below
def test_variant_equals_the_numpy_reference(name, x64):
    cfg = variant(name)
    module = LoRAAdapter(cfg, D_OUT, dtype="float64", param_dtype="float64")
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (T, D_IN), jnp.float64))
    gates = _softmax(np.asarray(jax.random.normal(jax.random.PRNGKey(4), (T, cfg.num_experts))))
    gates_in = jnp.asarray(gates) if cfg.method == "xlora" else None
    context = AdapterContext(scalings=gates_in)  # X-LoRA's scalings come from the block
    v = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(3), x, context))
    apply = jax.jit(module.apply)
    # Zero-initialised B: the delta is exactly 0, so the projection is exactly the base one.
    np.testing.assert_array_equal(np.asarray(apply(v, x, context)), 0.0)
    v = _randomise(v)
    got = np.asarray(apply(v, x, context))
    want, g = reference_delta(cfg, v, x, gates)
    assert np.abs(want).max() > 1e-3
    # Router logits and selection run in float32 (moejax.moe.routers), the rest in float64.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    if name == "dynmole":  # the test exercises top-p, the 2-expert floor and some all-in rows
        used = (g > 0).sum(-1)
        assert used.min() >= 2 and used.max() == cfg.num_experts
        assert (used < cfg.num_experts).any()
    if name == "llava_mole":  # dispatched by moejax's ragged plan; the rank axis agrees
        rank = module.clone(cfg=dataclasses.replace(cfg, dispatcher="none"))
        np.testing.assert_allclose(jax.jit(rank.apply)(v, x), got, rtol=2e-6, atol=1e-6)


def test_mixlora_equals_the_numpy_reference(x64):
    cfg = variant("mixlora", num_experts=4)
    f = 12
    mlp = DenseMLP(
        f, dtype="float64", param_dtype="float64", adapters=adapters_for(cfg), name="mlp"
    )
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, D_IN), jnp.float64)
    params = nn.unbox(jax.jit(mlp.init)(jax.random.PRNGKey(3), x))["params"]
    adapters, base = split_tree(params, is_adapter_path)
    assert set(adapters) == {"lora_router", "lora_w_gate", "lora_w_up", "lora_w_down"}
    apply = jax.jit(mlp.apply)
    plain = DenseMLP(f, dtype="float64", param_dtype="float64", name="mlp")
    # Zero B: the base FFN plus expert differences that are 0 up to XLA fusing silu
    # differently in two places (~1 ulp of the base, see moejax.lora.mixlora).
    np.testing.assert_allclose(
        apply({"params": params}, x), plain.apply({"params": base}, x), rtol=1e-13, atol=1e-18
    )
    params = _randomise({"params": params})["params"]
    got = np.asarray(apply({"params": params}, x)).reshape(-1, D_IN)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x).reshape(-1, D_IN)
    probs = _softmax(xs @ p["lora_router"]["kernel"])
    w = np.where(_topk_mask(probs, cfg.top_k), probs, 0.0)
    w /= w.sum(-1, keepdims=True)
    s = lora_scale(cfg)

    def lora(name, h, e):
        return h @ p[name]["a"][e] @ p[name]["b"][e] * s

    want = np.zeros_like(xs)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    for e in range(cfg.num_experts):
        h = silu(xs @ p["w_gate"] + lora("lora_w_gate", xs, e)) * (
            xs @ p["w_up"] + lora("lora_w_up", xs, e)
        )
        want += w[:, e : e + 1] * (h @ p["w_down"] + lora("lora_w_down", h, e))
    assert (w > 0).sum(-1).max() == 2
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_flylora_has_no_trainable_router_and_a_frozen_a():
    cfg = variant("flylora")
    v = LoRAAdapter(cfg, D_OUT).init(jax.random.PRNGKey(0), jnp.ones((T, D_IN)))
    assert set(v["params"]) == {"b"}  # no router, no A among the trainable leaves
    a = np.asarray(nn.unbox(v["lora_frozen"]["a"]))
    assert a.shape == (6, D_IN, 1)
    nnz = max(1, int(D_IN * cfg.top_k / cfg.num_experts))  # density k / R per rank row
    np.testing.assert_array_equal((a != 0).sum(axis=1), nnz)


@pytest.mark.parametrize("kind", ["static", "flylora"])
def test_rank_wise_experts_with_unit_gates_equal_plain_lora(kind, x64):
    r = 4
    x = jax.random.normal(jax.random.PRNGKey(2), (T, D_IN), jnp.float64)
    plain = LoRAAdapter(LoRAConfig(method="lora", rank=r, alpha=8.0), D_OUT, "float64", "float64")
    if kind == "static":  # E = r static experts of rank 1: g = 1, s = alpha / (E * 1)
        cfg = LoRAConfig(method="lora", num_experts=r, rank=1, alpha=8.0, scaling="total")
    else:  # every rank active: top_k = R, binary gates
        cfg = LoRAConfig(
            method="flylora", num_experts=r, rank=1, top_k=r, alpha=8.0, scaling="total"
        )
    wise = LoRAAdapter(cfg, D_OUT, "float64", "float64")
    v = _randomise(nn.unbox(wise.init(jax.random.PRNGKey(3), x)))
    a = v["params"]["a"] if kind == "static" else v["lora_frozen"]["a"]
    plain_v = {"params": {"a": a[:, :, 0].T[None], "b": v["params"]["b"][:, 0][None]}}
    np.testing.assert_allclose(wise.apply(v, x), plain.apply(plain_v, x), rtol=1e-12, atol=1e-12)


MODEL = ModelConfig(
    vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=24, moe_every=0
)
TOKENS = jnp.arange(16).reshape(2, 8) % 64


# Every variant's adapter gives an exact 0 at init (test above; MixLoRA's MLP: its own
# test); these two change the model around the adapters: X-LoRA's two passes and MoLA's
# unrolled layers. (The adapters' losses reaching the step metrics, and each biased
# router's load reaching the sign rule, are checked by test_variant_training.py.)
@pytest.mark.parametrize("name", ["xlora", "mola"])
def test_zero_initialised_adapters_give_the_base_logits(name):
    cfg = variant(name, targets="attn.wq,mlp.w_down")
    m = dataclasses.replace(MODEL, **MODEL_OVERRIDES.get(name, {}))
    model = Transformer(m, MoEConfig(), adapters=adapters_for(cfg))
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS))
    adapters, base = split_tree(variables["params"], is_adapter_path)
    assert adapters
    if name == "xlora":
        assert "lora_xlora_classifier" in adapters
    assert model.adapters.decodes_with_cache  # X-LoRA: each pass keeps its own cache
    want, _ = jax.jit(Transformer(m, MoEConfig()).apply)({"params": base}, TOKENS)
    got, extras = jax.jit(functools.partial(apply_model, model))(variables, TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if name == "mola":  # router metrics reach the model's extras (sown, collected once)
        assert extras["lora_metrics"]["experts_per_token"] == cfg.top_k


def test_xlora_decodes_with_the_cache():
    """Greedy decoding with the key/value cache (one per X-LoRA pass) equals the argmax of
    the full forward at every step, with random experts and classifier (the model is
    causal, so one forward over the generated tokens gives every step's logits)."""
    from moejax.generate import generate

    model = Transformer(MODEL, MoEConfig(), adapters=adapters_for(variant("xlora")))
    variables = _randomise(nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS)))
    got = np.asarray(generate(model, variables, TOKENS[:, :3], 4))
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(got))[0])
    np.testing.assert_array_equal(got[:, 3:], np.argmax(logits[:, 2:-1], -1))


def test_frozen_experts_live_in_lora_frozen():
    """lora.frozen_experts: every expert's a and b are `lora_frozen` variables, so X-LoRA's
    classifier is the only trainable adapter parameter (the layout of loaded adapters,
    moejax.hf.from_pretrained(adapters=...))."""
    cfg = variant("xlora", num_experts=2, targets="attn.wq,mlp.w_down", frozen_experts=True)
    model = Transformer(MODEL, MoEConfig(), adapters=adapters_for(cfg))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS))
    adapters, _ = split_tree(shapes["params"], is_adapter_path)
    assert set(traverse_util.flatten_dict(adapters)) == {
        ("lora_xlora_classifier", "kernel"),
        ("lora_xlora_classifier", "bias"),
    }
    frozen = traverse_util.flatten_dict(shapes["lora_frozen"], sep="/")
    assert frozen["dense_layers/attn/lora_wq/a"].shape == (2, 2, 16, 2)  # [layers, E, in, r]
    assert sorted(k.rsplit("/", 2)[-2:][0] for k in frozen) == ["lora_w_down"] * 2 + ["lora_wq"] * 2


def test_mola_gives_each_layer_its_expert_count():
    cfg = variant("mola", layer_experts="2,4,6,8")
    m = dataclasses.replace(MODEL, num_layers=4, scan_layers=False)
    params = jax.eval_shape(
        Transformer(m, MoEConfig(), adapters=adapters_for(cfg)).init, jax.random.PRNGKey(0), TOKENS
    )["params"]
    counts = [
        nn.unbox(params[f"dense_layers_{i}"]["attn"]["lora_wq"]["b"]).shape[0] for i in range(4)
    ]
    assert counts == [2, 4, 6, 8]
    # Adapter routers name their expert axis lora_experts (replicated), not the MoE's expert.
    assert params["dense_layers_0"]["attn"]["lora_wq"]["router"]["kernel"].names == (
        "embed",
        "lora_experts",
    )


def test_sign_rule_against_hand_computed_values():
    bias = jnp.array([[0.0, 0.5, -0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # mean 0.25: expert 0 overloaded (-u), experts 1 and 2 at the mean (0), 3 under (+u).
    want = [[-0.1, 0.5, -0.5, 0.1], [1.0, 1.0, 1.0, 1.0]]
    np.testing.assert_allclose(sign_rule(bias, load, 0.1), want, atol=1e-7)
    tree = {"dense_layers": {"attn": {"lora_wq": {"router": {"bias": bias}}}}}
    loads = {"dense_layers": {"attn": {"lora_wq": {"router": {"bias": load}}}}}
    new = sign_rule_update(tree, loads, 0.1, "lora_bias")
    np.testing.assert_allclose(
        new["dense_layers"]["attn"]["lora_wq"]["router"]["bias"], want, atol=1e-7
    )
    with pytest.raises(ValueError, match="no load"):
        sign_rule_update(tree, {}, 0.1, "lora_bias")


def test_sora_proximal_step_and_prune():
    gate = jnp.array([0.5, -0.05, 0.02, -0.3])
    params = {
        "mlp": {
            "lora_w_up": {"a": jnp.ones((1, 3, 4)), "b": jnp.ones((1, 4, 2)), "gate": gate},
            "w_up": jnp.full((3, 2), 0.07),
        }
    }
    stepped = sora.proximal_step(params, 0.1)
    np.testing.assert_allclose(
        stepped["mlp"]["lora_w_up"]["gate"], [0.4, 0.0, 0.0, -0.2], atol=1e-7
    )
    np.testing.assert_array_equal(stepped["mlp"]["w_up"], params["mlp"]["w_up"])
    cfg = LoRAConfig(method="sora", rank=4, alpha=4.0)
    module = LoRAAdapter(cfg, 5)
    x = jax.random.normal(jax.random.PRNGKey(0), (T, 3))
    v = _randomise(nn.unbox(module.init(jax.random.PRNGKey(1), x)))
    v = {"params": {**v["params"], "gate": jnp.array([0.7, 0.0, -0.2, 0.0])}}
    pruned, ranks = sora.prune({"lora_w": v["params"]})
    assert ranks == {"lora_w": 2}
    small = LoRAAdapter(dataclasses.replace(cfg, rank=2, alpha=2.0), 5)  # same s = alpha / r
    np.testing.assert_allclose(
        small.apply({"params": pruned["lora_w"]}, x), module.apply(v, x), rtol=1e-5, atol=1e-6
    )


def test_sora_prune_on_scanned_params():
    """`prune` on the scanned params a run trains raised a bare IndexError (issue 23 item
    5). A stack shares one rank: the ranks zero in every layer go, and the pruned model
    (lora.rank 2, alpha 2: the same s = alpha / r) gives the same logits."""
    cfg = LoRAConfig(method="sora", rank=4, alpha=4.0, targets="attn.wq,mlp.w_up")
    model_cfg = ModelConfig(
        vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=24, moe_every=0
    )
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 32
    model = Transformer(model_cfg, MoEConfig(), adapters=adapters_for(cfg))
    v = _randomise(nn.unbox(model.init(jax.random.PRNGKey(0), tokens)))
    gate = jnp.array([[0.7, 0.0, -0.2, 0.0], [0.5, 0.0, 0.0, 0.0]])  # [layers, rank]
    flat = {
        k: gate if k[-1] == "gate" else x
        for k, x in traverse_util.flatten_dict(v["params"]).items()
    }
    assert sum(k[-1] == "gate" for k in flat) == 2  # wq and w_up, each stacked over 2 layers
    pruned, ranks = sora.prune(traverse_util.unflatten_dict(flat))
    assert ranks == {
        "dense_layers/attn/lora_wq": 2,
        "dense_layers/mlp/lora_w_up": 2,
    }
    gate_wq = pruned["dense_layers"]["attn"]["lora_wq"]["gate"]
    np.testing.assert_array_equal(gate_wq, np.float32([[0.7, -0.2], [0.5, 0.0]]))
    small = Transformer(
        model_cfg,
        MoEConfig(),
        adapters=adapters_for(dataclasses.replace(cfg, rank=2, alpha=2.0)),
    )
    want = model.apply({**v, "params": traverse_util.unflatten_dict(flat)}, tokens)[0]
    got = small.apply({**v, "params": pruned}, tokens)[0]
    assert np.abs(np.asarray(want)).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
