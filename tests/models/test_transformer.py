"""The Transformer LM against a float64 NumPy model, and its invariants.

Causality and packing isolation (checked through gradients and by perturbing inputs), the
dense/MoE layer layout and logical axis names, dispatcher / remat / mixed-precision
equivalence, and the aux-loss bookkeeping. Most tests share one 5-layer model whose layout
(1 dense layer, then 2 periods of [dense, MoE]) runs all three layer scans; every jit-compiled
function is cached per config so the suite compiles each variant once per worker.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_model_reference as ref  # tests/ is on sys.path (pytest.ini)
import pytest

from moejax.models.config import ModelConfig
from moejax.models.transformer import Transformer, unscan_params
from moejax.moe.config import MoEConfig
from moejax.sharding.config import DEFAULT_RULES

B, L = 3, 8
MODEL = ModelConfig(
    vocab_size=32,
    d_model=16,
    num_layers=5,
    num_heads=4,
    num_kv_heads=2,
    d_ff=32,
    first_k_dense=1,
    moe_every=2,
)
MOE = ref.tiny_moe_config()
DENSE = ModelConfig(
    vocab_size=32,
    d_model=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=6,
    d_ff=32,
    moe_every=0,
    tie_embeddings=True,
)


def with_dispatcher(name, **kw):
    return dataclasses.replace(MOE, dispatcher=name, **kw)


def params_for(m: ModelConfig, moe: MoEConfig):
    # The dispatcher, remat and compute dtype do not change the parameter tree, so every
    # variant of one layout gets the very same parameters.
    return _params(
        dataclasses.replace(m, remat="none", dtype="float32"),
        dataclasses.replace(moe, dispatcher="ragged", capacity_factor=1.0),
    )


@functools.lru_cache(maxsize=None)
def _params(m: ModelConfig, moe: MoEConfig):
    return ref.random_params(Transformer(m, moe), seed=0)


@functools.lru_cache(maxsize=None)
def loss_and_grad_fn(m: ModelConfig, moe: MoEConfig):
    """jit((params, tokens, seg, pos) -> ((loss, (logits, extras)), grads)); loss = LM + aux."""
    model = Transformer(m, moe)

    def loss(params, tokens, seg, pos):
        logits, extras = model.apply({"params": params}, tokens, seg, pos)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = (seg[:, 1:] > 0).astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.sum(w) + extras["aux_loss"], (logits, extras)

    return ref.fast_jit(jax.value_and_grad(loss, has_aux=True))


def _args(m, moe, tokens, seg=None, pos=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    seg = jnp.ones(tokens.shape, jnp.int32) if seg is None else jnp.asarray(seg, jnp.int32)
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return params_for(m, moe), tokens, seg, jnp.asarray(pos, jnp.int32)


def run(m, moe, tokens, seg=None, pos=None):
    """(loss, logits, extras, grads) of the jitted train-step function."""
    (loss, (logits, extras)), grads = loss_and_grad_fn(m, moe)(*_args(m, moe, tokens, seg, pos))
    return loss, logits, extras, grads


def jaxpr_text(m, moe, tokens):
    """The jaxpr of the function `run` compiles for these inputs."""
    return str(loss_and_grad_fn(m, moe).trace(*_args(m, moe, tokens)).jaxpr)


def tokens_for(seed, vocab=32):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, L)).astype(np.int32)


def packed_batch():
    """Row 0: [pad | segment 1 (3) | segment 2 (3) | pad]; rows 1, 2: each segment alone."""
    rng = np.random.default_rng(7)
    s1, s2 = rng.integers(0, 32, 3), rng.integers(0, 32, 3)
    tokens = np.zeros((B, L), np.int32)
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    tokens[0] = [5, *s1, *s2, 9]
    seg[0] = [0, 1, 1, 1, 2, 2, 2, 0]
    pos[0] = [0, 0, 1, 2, 0, 1, 2, 0]
    for row, s in ((1, s1), (2, s2)):
        tokens[row, :3], seg[row, :3], pos[row, :3] = s, 1, np.arange(3)
        tokens[row, 3:] = rng.integers(0, 32, L - 3)  # padding, segment 0
    return tokens, seg, pos


def assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------- numerics


def test_moe_model_matches_numpy_reference():
    tokens, seg, pos = packed_batch()
    loss, logits, extras, _ = run(MODEL, MOE, tokens, seg, pos)
    want, stats = ref.forward(params_for(MODEL, MOE), MODEL, MOE, tokens, seg, pos)
    assert np.std(want) > 0.5  # O(1) logits: every layer's contribution is visible
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    metrics = extras["moe_metrics"]
    assert len(stats) == MODEL.num_moe_layers == 2
    for name in ("load", "balance_loss", "z_loss"):
        np.testing.assert_allclose(
            metrics[name], np.stack([s[name] for s in stats]), rtol=1e-4, atol=1e-6, err_msg=name
        )
    assert np.isfinite(float(loss))


def test_dense_tied_model_matches_numpy_reference():
    tokens = tokens_for(1)
    _, logits, extras, grads = run(DENSE, MOE, tokens)
    want, stats = ref.forward(params_for(DENSE, MOE), DENSE, MOE, tokens)
    assert stats == [] and extras["moe_metrics"] == {} and float(extras["aux_loss"]) == 0.0
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert "lm_head" not in grads and grads["dense_layers"]["attn"]["wq"].shape == (2, 16, 4, 6)


# ----------------------------------------------------------------------------- causality


@functools.lru_cache(maxsize=None)
def influence_fn(m, moe):
    """jit((params, tokens) -> (logits, J)), J[b, t, v] = |d (logits[b, t] . r) / d E[v]|."""
    model = Transformer(m, moe)
    r = jnp.asarray(np.random.default_rng(0).normal(size=m.vocab_size), jnp.float32)

    def fn(params, tokens):
        def projected(embedding):
            logits, _ = model.apply({"params": {**params, "embedding": embedding}}, tokens)
            return logits @ r, logits

        jac, logits = jax.jacrev(projected, has_aux=True)(params["embedding"])
        return logits, jnp.max(jnp.abs(jac), axis=-1)

    return ref.fast_jit(fn)


@pytest.mark.parametrize("dispatcher", ["dense_reference", "ragged"])
def test_logits_do_not_depend_on_future_tokens_or_other_rows(dispatcher):
    moe = with_dispatcher(dispatcher)
    params = params_for(MODEL, moe)
    # Every (row, position) holds a distinct token, so the gradient that reaches embedding
    # row v is exactly the influence of position (v // L, v % L).
    tokens = np.arange(B * L, dtype=np.int32).reshape(B, L)
    logits, influence = influence_fn(MODEL, moe)(params, tokens)
    influence = np.asarray(influence)[:, :, : B * L].reshape(B, L, B, L)
    allowed = np.zeros((B, L, B, L), bool)
    for b in range(B):
        allowed[b, :, b, :] = np.tril(np.ones((L, L), bool))
    assert np.all(influence[~allowed] == 0.0), "information leaks from the future/other rows"
    assert np.all(influence[allowed] > 1e-6), "a visible position has no influence"
    # Discrete routing changes are invisible to gradients: perturb the future directly.
    t = 3
    changed = tokens.copy()
    changed[:, t + 1 :] = np.random.default_rng(3).integers(0, MODEL.vocab_size, (B, L - t - 1))
    logits2, _ = influence_fn(MODEL, moe)(params, changed)
    np.testing.assert_allclose(logits2[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
    assert np.max(np.abs(logits2[:, t + 1 :] - logits[:, t + 1 :])) > 1e-2


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("m", [DENSE, MODEL], ids=["dense", "moe_ragged"])
def test_packed_segments_equal_separate_rows_and_ignore_padding(m):
    tokens, seg, pos = packed_batch()
    _, logits, extras, _ = run(m, MOE, tokens, seg, pos)
    np.testing.assert_allclose(logits[0, 1:4], logits[1, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 4:7], logits[2, :3], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(logits[1, :3] - logits[2, :3])) > 1e-2
    # New padding tokens (segment 0, including the left pad row 0 starts with) change
    # neither the real tokens' logits nor the router statistics, which mask padding out.
    repadded = tokens.copy()
    repadded[seg == 0] = (repadded[seg == 0] + 11) % m.vocab_size
    _, logits2, extras2, _ = run(m, MOE, repadded, seg, pos)
    real = seg > 0
    np.testing.assert_allclose(
        np.asarray(logits2)[real], np.asarray(logits)[real], rtol=1e-5, atol=1e-5
    )
    assert np.max(np.abs(np.asarray(logits2)[~real] - np.asarray(logits)[~real])) > 1e-2
    routing, routing2 = extras.pop("routing"), extras2.pop("routing")
    assert_trees_close(extras2, extras, rtol=1e-5, atol=1e-6)
    for name in routing:  # per-token decisions: real tokens unchanged; padding uses 0 experts
        np.testing.assert_array_equal(
            np.asarray(routing2[name])[:, real], np.asarray(routing[name])[:, real]
        )
    if routing:
        np.testing.assert_array_equal(np.asarray(routing["experts_per_token"])[:, ~real], 0)


# ----------------------------------------------------------------------------- layout

LAYOUTS = [  # (num_layers, first_k_dense, moe_every)
    (3, 0, 0),
    (2, 2, 1),
    (3, 0, 1),
    (3, 1, 1),
    (4, 0, 2),
    (5, 1, 2),
    (3, 0, 3),
    (4, 1, 3),
]
UNSTACKED_NAMES = {
    "wq": ("embed", "heads", "kv"),
    "wk": ("embed", "heads", "kv"),
    "wv": ("embed", "heads", "kv"),
    "wo": ("heads", "kv", "embed"),
    "scale": ("norm",),
    "kernel": ("embed", "expert"),
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
}


def _expected_names(path):
    keys = [p.key for p in path]
    if keys[-1] in UNSTACKED_NAMES:
        return UNSTACKED_NAMES[keys[-1]]
    mlp = ("mlp", "embed") if keys[-1] == "w_down" else ("embed", "mlp")
    return (("expert",) if "experts" in keys else ()) + mlp


def _stack_depth(path):
    keys = [p.key for p in path]
    if keys[0] == "moe_periods":
        return 2 if keys[1] == "dense" else 1
    return 1 if keys[0] in ("dense_layers", "moe_layers") else 0


def _count_layers(params, leaf_name, unstacked_ndim):
    return sum(
        int(np.prod(v.shape[: v.ndim - unstacked_ndim]))
        for path, v in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == leaf_name and path[-2].key in ("attn", "router", "mlp")
    )


@pytest.mark.parametrize("num_layers,first_k_dense,moe_every", LAYOUTS)
def test_layer_layout_and_logical_axis_names(num_layers, first_k_dense, moe_every):
    m = dataclasses.replace(
        MODEL, num_layers=num_layers, first_k_dense=first_k_dense, moe_every=moe_every
    )
    model = Transformer(m, MOE)
    boxed = ref.abstract_variables(model, B, L)
    _, extras = jax.eval_shape(model.apply, boxed, jax.ShapeDtypeStruct((B, L), jnp.int32))
    n_moe = sum(m.is_moe_layer(i) for i in range(num_layers))
    assert n_moe == m.num_moe_layers
    if n_moe:
        assert extras["moe_metrics"]["load"].shape == (n_moe, MOE.num_experts)
        assert all(v.shape[0] == n_moe for v in jax.tree.leaves(extras["moe_metrics"]))
    else:
        assert extras["moe_metrics"] == {}
    params = nn.unbox(boxed)["params"]
    assert _count_layers(params, "wq", 3) == num_layers
    assert _count_layers(params, "kernel", 2) == n_moe  # one router per MoE layer
    assert _count_layers(params, "w_gate", 2) == num_layers - n_moe  # dense FFNs
    n_prefix = num_layers if moe_every == 0 else first_k_dense
    want_keys = {"embedding", "final_norm", "lm_head"}
    want_keys |= {"dense_layers"} if n_prefix else set()
    want_keys |= ({"moe_layers"} if moe_every == 1 else {"moe_periods"}) if n_moe else set()
    assert set(params) == want_keys

    rules = {name for name, _ in DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(leaves) == len(jax.tree.leaves(params))
    for path, box in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(box, nn.Partitioned), where
        depth = _stack_depth(path)
        assert len(box.names) == box.value.ndim, where
        # A period's dense blocks are stacked twice: the period scan, then inside the period.
        assert box.names == ("layers", "period_layers")[:depth] + _expected_names(path), where
        assert set(box.names) <= rules, where  # every logical axis has a sharding rule
    spec = nn.get_partition_spec(boxed)["params"]
    if n_moe:
        block = spec["moe_layers"] if moe_every == 1 else spec["moe_periods"]["moe_block"]
        assert tuple(block["moe"]["experts"]["w_down"]) == ("layers", "expert", "mlp", "embed")


def test_real_init_gives_distinct_layers_and_documented_scales():
    m = ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, moe_every=1
    )
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=16, dispatcher="ragged")
    variables = ref.fast_jit(Transformer(m, moe).init)(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)
    )
    p = nn.unbox(variables)["params"]
    layers = p["moe_layers"]
    for path, v in jax.tree_util.tree_leaves_with_path(layers):
        assert v.dtype == jnp.float32 and v.shape[0] == 2
        if path[-1].key != "scale":  # each scanned layer gets its own RNG stream
            assert not np.allclose(v[0], v[1]), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(layers["attn_norm"]["scale"], 1.0)
    out_std = m.init_std / (2 * m.num_layers) ** 0.5
    np.testing.assert_allclose(np.std(layers["attn"]["wq"]), m.init_std, rtol=0.1)
    np.testing.assert_allclose(np.std(layers["attn"]["wo"]), out_std, rtol=0.1)
    np.testing.assert_allclose(np.std(layers["moe"]["experts"]["w_gate"]), m.init_std, rtol=0.1)
    np.testing.assert_allclose(np.std(layers["moe"]["experts"]["w_down"]), out_std, rtol=0.1)
    np.testing.assert_allclose(np.std(p["embedding"]), 1.0, rtol=0.1)


# ----------------------------------------------------------------------------- equivalences


def test_dispatchers_give_same_logits_and_grads():
    tokens = tokens_for(2)
    loss, logits, extras, grads = run(MODEL, with_dispatcher("dense_reference"), tokens)
    experts = grads["moe_periods"]["moe_block"]["moe"]
    for path, g in jax.tree_util.tree_leaves_with_path(experts):  # the MoE gets real signal
        assert np.max(np.abs(g)) > 1e-4, jax.tree_util.keystr(path)
    for name, extra in [
        ("ragged", {}),
        ("capacity_einsum", dict(capacity_factor=float(MOE.num_experts))),
    ]:
        loss2, logits2, extras2, grads2 = run(MODEL, with_dispatcher(name, **extra), tokens)
        np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(loss2, loss, rtol=1e-6, err_msg=name)
        assert_trees_close(grads2, grads, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(extras2["moe_metrics"]["dropped_fraction"], 0.0)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_preserves_loss_and_grads(policy):
    tokens = tokens_for(3)
    loss, logits, _, grads = run(MODEL, MOE, tokens)
    m = dataclasses.replace(MODEL, remat=policy)
    loss2, logits2, _, grads2 = run(m, MOE, tokens)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads2, grads, rtol=1e-5, atol=1e-6)
    # ... and the rematerialisation is really there (not a comparison of a model with itself).
    text = jaxpr_text(m, MOE, tokens)
    assert "remat" in text or "checkpoint" in text
    assert ("DotsSaveable" in text) == (policy == "dots")


GRU_MOE = dataclasses.replace(MOE, scorer="gru", gru_dim=6)
TOP_P_MOE = dataclasses.replace(MOE, selection="top_p", top_k=4, top_p=0.6, entropy_coef=0.01)


@pytest.mark.parametrize("moe", [GRU_MOE, TOP_P_MOE], ids=["gru", "top_p"])
def test_scanned_unscanned_and_remat_stacks_are_one_function(moe):
    """RMoE's state crosses the scanned stacks (incl. the nested dense scan of a period) and
    remat exactly as it crosses an unrolled loop of layers."""
    tokens = tokens_for(5)
    loss, logits, extras, grads = run(MODEL, moe, tokens)
    loss_r, logits_r, _, grads_r = run(dataclasses.replace(MODEL, remat="full"), moe, tokens)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads_r, grads, rtol=1e-5, atol=1e-6)

    flat = dataclasses.replace(MODEL, scan_layers=False)
    params = unscan_params(params_for(MODEL, moe))
    want_tree = jax.tree.structure(
        nn.unbox(ref.abstract_variables(Transformer(flat, moe)))["params"]
    )
    assert jax.tree.structure(params) == want_tree
    assert "moe_periods_1" in params and "dense_0" in params["moe_periods_1"]
    (loss_u, (logits_u, extras_u)), grads_u = loss_and_grad_fn(flat, moe)(
        params, *_args(MODEL, moe, tokens)[1:]
    )
    np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
    np.testing.assert_allclose(logits_u, logits, rtol=1e-5, atol=1e-6)
    assert_trees_close(extras_u, extras, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads_u, unscan_params(grads), rtol=1e-5, atol=1e-6)
    if moe.scorer == "gru":  # one shared cell, trained through every MoE layer
        assert "router_gru" in grads and np.max(np.abs(grads["router_gru"]["w_h"])) > 1e-5
        assert np.max(np.abs(grads["moe_periods"]["moe_block"]["moe"]["router"]["proj"][0])) > 0
    else:
        assert 1.0 <= float(np.mean(extras["moe_metrics"]["experts_per_token"])) < 4.0


def test_bfloat16_compute_with_float32_params():
    m = dataclasses.replace(MODEL, dtype="bfloat16", param_dtype="float32")
    boxed = ref.abstract_variables(Transformer(m, MOE), B, L)
    assert {v.dtype for v in jax.tree.leaves(nn.unbox(boxed))} == {jnp.dtype(jnp.float32)}
    tokens = tokens_for(4)
    loss, logits, extras, grads = run(m, MOE, tokens)
    loss32, logits32, _, _ = run(MODEL, MOE, tokens)
    assert logits.dtype == jnp.float32 and np.isfinite(float(loss))
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    err = np.linalg.norm(logits - logits32) / np.linalg.norm(logits32)
    assert 1e-4 < err < 5e-2, err  # close, but really computed in bfloat16
    np.testing.assert_allclose(loss, loss32, rtol=5e-2)
    assert "bf16" in jaxpr_text(m, MOE, tokens)


# ----------------------------------------------------------------------------- aux losses


def test_aux_loss_is_weighted_sum_over_layers():
    tokens, seg, pos = packed_batch()
    _, _, extras, _ = run(MODEL, MOE, tokens, seg, pos)
    mm = extras["moe_metrics"]
    want = np.sum(
        MOE.balance_coef * np.asarray(mm["balance_loss"], np.float64)
        + MOE.z_loss_coef * np.asarray(mm["z_loss"], np.float64)
    )
    np.testing.assert_allclose(extras["aux_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(
        extras["aux_losses"]["balance"], MOE.balance_coef * np.sum(mm["balance_loss"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        extras["aux_losses"]["z_loss"], MOE.z_loss_coef * np.sum(mm["z_loss"]), rtol=1e-6
    )
    # A zero coefficient removes its term (and only that term).
    moe = dataclasses.replace(MOE, balance_coef=0.0)
    _, extras0 = ref.fast_jit(Transformer(MODEL, moe).apply)(
        {"params": params_for(MODEL, MOE)}, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos)
    )
    assert set(extras0["aux_losses"]) == {"z_loss"}
    np.testing.assert_allclose(extras0["aux_loss"], extras["aux_losses"]["z_loss"], rtol=1e-6)


SIGMOID_MOE = dataclasses.replace(
    MOE,
    selection="sigmoid_bias",
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.0,
    seq_balance_coef=0.01,
)


def test_router_bias_collection_is_stacked_used_and_required():
    """DeepSeek-V3's bias: a `router_bias` collection stacked per MoE layer like the params,
    the same function scanned, unrolled (`unscan_params`) and rematerialised, and required."""
    tokens = jnp.asarray(tokens_for(6))
    params = params_for(MODEL, SIGMOID_MOE)
    shape = (MODEL.num_moe_layers, SIGMOID_MOE.num_experts)
    bias = {
        "moe_periods": {
            "moe_block": {
                "moe": {
                    "router": {
                        "bias": jnp.asarray(
                            np.random.default_rng(0).normal(size=shape) * 0.2, jnp.float32
                        )
                    }
                }
            }
        }
    }
    abstract = ref.abstract_variables(Transformer(MODEL, SIGMOID_MOE))
    assert jax.tree.map(lambda a: a.shape, nn.unbox(abstract["router_bias"])) == jax.tree.map(
        lambda a: a.shape, bias
    )
    assert nn.get_partition_spec(abstract)["router_bias"]["moe_periods"]["moe_block"]["moe"][
        "router"
    ]["bias"] == jax.sharding.PartitionSpec("layers", "expert")

    @functools.lru_cache(maxsize=None)
    def apply_fn(m):
        return ref.fast_jit(Transformer(m, SIGMOID_MOE).apply)

    def logits_of(m, variables):
        return apply_fn(m)(variables, tokens)[0]

    logits = logits_of(MODEL, {"params": params, "router_bias": bias})
    zero = logits_of(MODEL, {"params": params, "router_bias": jax.tree.map(jnp.zeros_like, bias)})
    assert np.max(np.abs(np.asarray(logits) - np.asarray(zero))) > 1e-3  # the bias routes
    remat = logits_of(
        dataclasses.replace(MODEL, remat="full"), {"params": params, "router_bias": bias}
    )
    np.testing.assert_allclose(remat, logits, rtol=1e-5, atol=1e-6)
    flat = logits_of(
        dataclasses.replace(MODEL, scan_layers=False),
        {"params": unscan_params(params), "router_bias": unscan_params(bias)},
    )
    np.testing.assert_allclose(flat, logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="router_bias"):
        Transformer(MODEL, SIGMOID_MOE).apply({"params": params}, tokens)
