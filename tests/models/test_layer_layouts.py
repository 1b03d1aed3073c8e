"""Per-layer layouts (`model.layer_kinds`): runs of identical layers, each one scan, with
per-layer expert counts and top-k; the layouts of first_k_dense / moe_every keep their
stacks; malformed layouts are refused by validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_model_reference as ref  # tests/ is on sys.path (pytest.ini)
import pytest

from moejax.config.validation import validate_model
from moejax.config_section import ConfigError
from moejax.models.config import LayerKind, ModelConfig
from moejax.models.flops import count_params
from moejax.models.transformer import Transformer, scanned_abstract, unscan_params

B, L = 2, 8
# dense | moe (E=4, k=1) | 2 x moe (E=4, k=2) | dense | moe (E=2, k=2): five runs, one scan each
LAYOUT = "dense, moe:k=1, moe, moe, dense, moe:e=2"
MODEL = ModelConfig(
    vocab_size=32,
    d_model=16,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    d_ff=32,
    layer_kinds=LAYOUT,
)
MOE = ref.tiny_moe_config()


def _tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 32, size=(B, L)), jnp.int32)


def _loss_fn(m, moe):
    model = Transformer(m, moe)

    def loss(params, tokens):
        logits, extras = model.apply({"params": params}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(nll) + extras["aux_loss"], (logits, extras)

    return ref.fast_jit(jax.value_and_grad(loss, has_aux=True))


def test_layout_parses_into_runs():
    assert MODEL.periodic is None and MODEL.num_moe_layers == 4
    assert [(str(kind), start, n) for kind, start, n in MODEL.layer_runs] == [
        ("dense", 0, 1),
        ("moe:k=1", 1, 1),
        ("moe", 2, 2),
        ("dense", 4, 1),
        ("moe:e=2", 5, 1),
    ]
    assert [MODEL.is_moe_layer(i) for i in range(6)] == [False, True, True, True, False, True]
    derived = ModelConfig(num_layers=5, first_k_dense=1, moe_every=2)
    assert [k.moe for k in derived.layer_layout] == [False, False, True, False, True]
    assert derived.layer_layout[4] == LayerKind(True)


def test_per_layer_layout_matches_numpy_reference_and_unrolled_layers():
    params = ref.random_params(Transformer(MODEL, MOE), seed=0)
    assert sorted(k for k in params if k.startswith("runs_")) == [f"runs_{r}" for r in range(5)]
    assert params["runs_2"]["moe"]["router"]["kernel"].shape == (2, 16, 4)  # [layers, d, E]
    assert params["runs_4"]["moe"]["router"]["kernel"].shape == (1, 16, 2)
    counts = count_params(MODEL, MOE)  # per-layer E_l and k_l
    assert counts.total == ref.tree_size(params)
    one_layer = 3 * 16 * 8
    assert counts.total - counts.active == (3 + 2 * 2 + 0) * one_layer  # unused experts
    tokens = _tokens()
    (loss, (logits, extras)), grads = _loss_fn(MODEL, MOE)(params, tokens)
    want, stats = ref.forward(params, MODEL, MOE, np.asarray(tokens))
    assert np.std(want) > 0.5
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    # the MoE layers' metrics, in layer order; E=2's load padded with zero load to E=4
    load = extras["moe_metrics"]["load"]
    assert load.shape == (4, 4)
    want_load = np.stack([np.pad(s["load"], (0, 4 - len(s["load"]))) for s in stats])
    np.testing.assert_allclose(load, want_load, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        extras["aux_losses"]["z_loss"], 0.01 * sum(s["z_loss"] for s in stats), rtol=1e-4
    )
    # k=1 layer: its second slot is padding with combine weight 0
    weights = extras["routing"]["combine_weights"]
    assert weights.shape == (4, B, L, 2)
    assert np.all(weights[0, ..., 1] == 0) and np.all(weights[1:, ..., 1] > 0)

    flat = dataclasses.replace(MODEL, scan_layers=False)
    flat_params = unscan_params(params)
    assert "runs_2_1" in flat_params
    want_tree = jax.tree.structure(
        nn.unbox(ref.abstract_variables(Transformer(flat, MOE)))["params"]
    )
    assert jax.tree.structure(flat_params) == want_tree
    restored = scanned_abstract(nn.unbox(ref.abstract_variables(Transformer(flat, MOE)))["params"])
    assert jax.tree.map(lambda a: a.shape, restored) == jax.tree.map(lambda a: a.shape, params)
    (loss_u, (logits_u, extras_u)), grads_u = _loss_fn(flat, MOE)(flat_params, tokens)
    np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
    np.testing.assert_allclose(logits_u, logits, rtol=1e-5, atol=1e-6)
    for name, value in extras_u["moe_metrics"].items():
        np.testing.assert_allclose(value, extras["moe_metrics"][name], rtol=1e-5, atol=1e-6)
    for (path, g), g_u in zip(
        jax.tree_util.tree_leaves_with_path(unscan_params(grads)), jax.tree.leaves(grads_u)
    ):
        np.testing.assert_allclose(g_u, g, rtol=1e-4, atol=1e-6, err_msg=str(path))
    # every run trains: a finite loss and a nonzero gradient for each run's FFN
    assert np.isfinite(float(loss))
    for r, (kind, _, _) in enumerate(MODEL.layer_runs):
        ffn = grads[f"runs_{r}"]["moe" if kind.moe else "mlp"]
        assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ffn)) > 1e-6, r


def test_periodic_layer_kinds_keep_the_old_stacks():
    """A `layer_kinds` that first_k_dense / moe_every express is stacked as they are."""
    kinds = ModelConfig(num_layers=5, layer_kinds="dense,dense,moe,dense,moe")
    old = ModelConfig(num_layers=5, first_k_dense=1, moe_every=2)
    assert kinds.periodic == (1, 2) and kinds.num_moe_layers == 2
    shapes = [
        jax.tree.map(lambda a: a.shape, ref.abstract_variables(Transformer(m, MOE)))
        for m in (kinds, old)
    ]
    assert shapes[0] == shapes[1] and "moe_periods" in shapes[0]["params"]


@pytest.mark.parametrize(
    "layer_kinds, num_layers, match",
    [
        ("dense,moe", 3, "has 2 entries for model.num_layers=3"),
        ("dense,mlp,moe", 3, "entry 1 'mlp': unknown kind 'mlp'"),
        ("dense:e=2,moe,moe", 3, "entry 0 'dense:e=2': a dense layer takes no options"),
        ("moe:e=0,moe,moe", 3, "entry 0 'moe:e=0': option 'e=0'"),
        ("moe:x=3,moe,moe", 3, "option 'x=3'"),
        ("dense,moe:e=2:k=3,moe", 3, "layers moe:e=2:k=3: top-k 3 is more than its 2 experts"),
        ("dense,moe:k=5,moe", 3, "top-k 5 is more than its 4 experts"),
    ],
)
def test_validation_names_the_bad_entry(layer_kinds, num_layers, match):
    m = ModelConfig(num_layers=num_layers, layer_kinds=layer_kinds)
    with pytest.raises(ConfigError, match=match):
        validate_model(m, MOE)


def test_validation_refuses_first_k_dense_with_layer_kinds():
    m = ModelConfig(num_layers=3, first_k_dense=1, layer_kinds="dense,moe,moe")
    with pytest.raises(ConfigError, match="leave them at their defaults"):
        validate_model(m, MOE)
    validate_model(dataclasses.replace(m, first_k_dense=0), MOE)


def test_validation_of_per_layer_expert_counts_against_the_moe_section():
    m = ModelConfig(num_layers=3, layer_kinds="moe,dense,moe:e=2")
    grouped = dataclasses.replace(MOE, n_group=4, topk_group=2, top_k=1)
    with pytest.raises(ConfigError, match=r"layers moe:e=2: .*not divisible by moe.n_group=4"):
        validate_model(m, grouped)
    biased = dataclasses.replace(MOE, selection="sigmoid_bias", renormalize=True)
    with pytest.raises(ConfigError, match=r"different expert counts \[2, 4\]"):
        validate_model(m, biased)
    validate_model(dataclasses.replace(m, layer_kinds="moe,dense,moe:k=1"), biased)
