"""DeepSeek-V3's sigmoid_bias routing against a float64 NumPy reference and transformers'
DeepseekV3TopkRouter; the bias steers the selection but never a weight; the aux-loss-free
bias update (moejax.train.router_bias) moves each bias by exactly +-gamma towards balance."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.config import MoEConfig
from moejax.moe.selection import sigmoid_bias
from moejax.train.router_bias import router_bias_metrics
from moejax.train.state_rules import sign_rule_update

T, E = 64, 16


def np_sigmoid_bias(logits, bias, cfg: MoEConfig):
    """DeepSeek-V3 routing in float64, written from the paper and transformers' router:
    ties broken towards the lower expert id (as jax.lax.top_k)."""
    s = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    c = s + np.asarray(bias, np.float64)
    t, e = c.shape
    if cfg.n_group > 1:
        grouped = c.reshape(t, cfg.n_group, e // cfg.n_group)
        top2 = -np.sort(-grouped, axis=-1)[..., :2]
        group_scores = top2.sum(-1)
        best = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]
        keep = np.zeros((t, cfg.n_group), bool)
        np.put_along_axis(keep, best, True, axis=-1)
        fill = 0.0 if cfg.group_mask == "zero" else -np.inf
        c = np.where(keep[:, :, None], grouped, fill).reshape(t, e)
    ids = np.argsort(-c, axis=-1, kind="stable")[:, : cfg.top_k]
    w = np.take_along_axis(s, ids, axis=-1)
    if cfg.renormalize:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor


def random_inputs(seed, bias_scale=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = (rng.normal(size=E) * bias_scale).astype(np.float32)
    return logits, bias


CASES = [  # (n_group, topk_group, top_k, renormalize, routed_scaling_factor)
    (1, 1, 4, True, 1.0),
    (4, 2, 4, True, 2.5),
    (4, 1, 3, False, 1.0),
    (8, 3, 6, True, 1.5),
]


@pytest.mark.parametrize("group_mask", ["zero", "neg_inf"])
@pytest.mark.parametrize("n_group, topk_group, top_k, renormalize, scale", CASES)
def test_sigmoid_bias_equals_numpy_reference(
    n_group, topk_group, top_k, renormalize, scale, group_mask
):
    cfg = MoEConfig(
        num_experts=E,
        top_k=top_k,
        selection="sigmoid_bias",
        n_group=n_group,
        topk_group=topk_group,
        renormalize=renormalize,
        routed_scaling_factor=scale,
        group_mask=group_mask,
    )
    # bias_scale 1.0 makes some choice scores negative, so the two masks differ somewhere.
    for seed, bias_scale in ((0, 0.3), (1, 1.0)):
        logits, bias = random_inputs(seed, bias_scale)
        sel = sigmoid_bias(jnp.asarray(logits), None, cfg, jnp.asarray(bias))
        ids, w = np_sigmoid_bias(logits, bias, cfg)
        np.testing.assert_array_equal(sel.expert_ids, ids)
        np.testing.assert_allclose(sel.combine_weights, w, rtol=2e-6, atol=1e-7)


def test_group_masks_differ_exactly_when_kept_choices_are_negative():
    # s = [0.9, 0.2, 0.5, 0.5]; c = s + b = [0.9, -0.8, -1.5, -1.5]: group 0 (sum 0.1) is
    # kept, group 1 (-3.0) dropped. "zero" makes the dropped experts 0.0 > -0.8, so expert 2
    # (the lower id of the tie) is chosen; "neg_inf" keeps the choice inside group 0.
    s = np.array([[0.9, 0.2, 0.5, 0.5]])
    logits = jnp.asarray(np.log(s / (1 - s)), jnp.float32)
    bias = jnp.asarray([0.0, -1.0, -2.0, -2.0])
    cfg = MoEConfig(
        num_experts=4, top_k=2, selection="sigmoid_bias", n_group=2, topk_group=1, renormalize=False
    )
    zero = sigmoid_bias(logits, None, cfg, bias)
    neg_inf = sigmoid_bias(logits, None, dataclasses.replace(cfg, group_mask="neg_inf"), bias)
    np.testing.assert_array_equal(zero.expert_ids, [[0, 2]])
    np.testing.assert_array_equal(neg_inf.expert_ids, [[0, 1]])
    np.testing.assert_allclose(zero.combine_weights, [[0.9, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(neg_inf.combine_weights, [[0.9, 0.2]], rtol=1e-6)


def test_bias_changes_the_selection_but_never_a_weight():
    cfg = MoEConfig(
        num_experts=E,
        top_k=4,
        selection="sigmoid_bias",
        n_group=4,
        topk_group=2,
        renormalize=False,
        routed_scaling_factor=2.0,
    )
    logits, bias = random_inputs(2, 0.5)
    logits = jnp.asarray(logits)
    plain = sigmoid_bias(logits, None, cfg)
    biased = sigmoid_bias(logits, None, cfg, jnp.asarray(bias))
    assert np.mean(np.asarray(plain.expert_ids) != np.asarray(biased.expert_ids)) > 0.2
    scores = np.asarray(jax.nn.sigmoid(logits))
    for sel in (plain, biased):  # the weights are the unbiased scores at the chosen ids
        np.testing.assert_allclose(
            sel.combine_weights,
            2.0 * np.take_along_axis(scores, np.asarray(sel.expert_ids), -1),
            rtol=1e-6,
        )
    # Forcing one expert on every token: it is chosen, with its own (small) score as weight.
    force = jnp.zeros(E).at[5].set(10.0)
    forced = sigmoid_bias(logits, None, cfg, force)
    assert np.all(np.asarray(forced.expert_ids)[:, 0] == 5)
    np.testing.assert_allclose(forced.combine_weights[:, 0], 2.0 * scores[:, 5], rtol=1e-6)
    # No gradient reaches the bias: it only decides the top-k.
    for renormalize in (False, True):
        c = dataclasses.replace(cfg, renormalize=renormalize)
        grad = jax.grad(
            lambda b: jnp.sum(sigmoid_bias(logits, None, c, b).combine_weights * jnp.arange(4.0))
        )(jnp.asarray(bias))
        np.testing.assert_array_equal(grad, np.zeros(E))


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch and transformers (the `hf` extra) for the reference router",
)
@pytest.mark.parametrize("n_group, topk_group, top_k, renormalize, scale", CASES)
def test_sigmoid_bias_equals_transformers_deepseek_v3_router(
    n_group, topk_group, top_k, renormalize, scale
):
    import torch
    import transformers
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(
            f"transformers {transformers.__version__}: this test drives the 5.x "
            f"DeepseekV3TopkRouter, which selects as well as scores"
        )
    d = 12
    config = hf.DeepseekV3Config(
        hidden_size=d,
        n_routed_experts=E,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=renormalize,
        routed_scaling_factor=scale,
    )
    router = hf.DeepseekV3TopkRouter(config)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, T // 2, d)).astype(np.float32)
    kernel = rng.normal(size=(d, E)).astype(np.float32) * 0.5  # moejax layout [d, E]
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(kernel.T.copy()))
    # transformers 5.x masks dropped groups with -inf; with choice scores > 0 (a positive
    # bias) "zero" selects the same experts, with a mixed-sign bias only "neg_inf" does.
    for group_mask, bias in (
        ("neg_inf", rng.normal(size=E) * 0.3),
        ("zero", rng.uniform(0.0, 0.3, size=E)),
    ):
        bias = bias.astype(np.float32)
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.from_numpy(bias))
            _, want_w, want_ids = router(torch.from_numpy(x))
        cfg = MoEConfig(
            num_experts=E,
            top_k=top_k,
            selection="sigmoid_bias",
            n_group=n_group,
            topk_group=topk_group,
            renormalize=renormalize,
            routed_scaling_factor=scale,
            group_mask=group_mask,
        )
        logits = jnp.asarray(x.reshape(T, d)) @ jnp.asarray(kernel)
        sel = sigmoid_bias(logits, None, cfg, jnp.asarray(bias))
        # transformers' top-k is unsorted: compare per token, ordered by expert id.
        want_ids, want_w = want_ids.numpy(), want_w.numpy()
        order = np.argsort(want_ids, axis=-1)
        got_ids, got_w = np.asarray(sel.expert_ids), np.asarray(sel.combine_weights)
        got_order = np.argsort(got_ids, axis=-1)
        np.testing.assert_array_equal(
            np.take_along_axis(got_ids, got_order, -1), np.take_along_axis(want_ids, order, -1)
        )
        np.testing.assert_allclose(
            np.take_along_axis(got_w, got_order, -1),
            np.take_along_axis(want_w, order, -1),
            rtol=1e-5,
            atol=1e-6,
        )


# ----------------------------------------------------------------------------- bias update


def test_bias_update_is_plus_minus_gamma_towards_the_mean_load():
    load = jnp.asarray([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    bias = {
        "moe_layers": {
            "moe": {"router": {"bias": jnp.asarray([[0.1, 0.0, 0.0, -0.1], [0.0, 0.0, 0.0, 0.0]])}}
        }
    }
    loads = {"moe_layers": {"moe": {"router": {"bias": load}}}}
    new = sign_rule_update(bias, loads, 0.01, "router_bias")
    metrics = router_bias_metrics(new)
    got = np.asarray(new["moe_layers"]["moe"]["router"]["bias"])
    g = np.float32(0.01)
    # mean load 0.25: experts 0 is overloaded (-gamma), 2 and 3 underloaded (+gamma), the
    # balanced expert 1 and the balanced layer stay.
    want = np.array([[0.1, 0.0, 0.0, -0.1], [0, 0, 0, 0]], np.float32) + g * np.array(
        [[-1, 0, 1, 1], [0, 0, 0, 0]], np.float32
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(metrics["moe/router_bias_abs_mean"], np.abs(want).mean(-1))
    np.testing.assert_array_equal(metrics["moe/router_bias"], want)
    same = sign_rule_update(bias, loads, 0.0, "router_bias")  # gamma = 0 freezes the bias
    np.testing.assert_array_equal(
        same["moe_layers"]["moe"]["router"]["bias"], bias["moe_layers"]["moe"]["router"]["bias"]
    )
    assert router_bias_metrics(None) == {}
    with pytest.raises(ValueError, match="no load"):  # a bias without its router's load
        sign_rule_update(bias, {}, 0.01, "router_bias")


def test_bias_update_follows_layer_order_of_unscanned_layers():
    # scan_layers=False names layers moe_layers_0 .. moe_layers_11; "_10" sorts after "_9".
    n = 12
    u = np.random.default_rng(5).uniform(size=(n, 4))
    load = jnp.asarray(u / u.sum(1, keepdims=True), jnp.float32)  # a different load per layer
    tree = {f"moe_layers_{i}": {"moe": {"router": {"bias": jnp.zeros(4)}}} for i in range(n)}
    loads = {f"moe_layers_{i}": {"moe": {"router": {"bias": load[i]}}} for i in range(n)}
    new = sign_rule_update(tree, loads, 1.0, "router_bias")
    logged = router_bias_metrics(new)["moe/router_bias"]  # rows in layer order
    for i in range(n):
        want = np.sign(np.mean(np.asarray(load[i])) - np.asarray(load[i]))
        np.testing.assert_array_equal(new[f"moe_layers_{i}"]["moe"]["router"]["bias"], want)
        np.testing.assert_array_equal(logged[i], want)


def test_bias_update_balances_a_skewed_router():
    """Without any loss or gradient, the bias alone spreads a router that prefers a few
    experts (DeepSeek-V3's auxiliary-loss-free balancing)."""
    rng = np.random.default_rng(4)
    skew = np.linspace(2.0, -2.0, 8)
    logits = jnp.asarray(rng.normal(size=(512, 8)) + skew, jnp.float32)
    cfg = MoEConfig(num_experts=8, top_k=2, selection="sigmoid_bias", n_group=4, topk_group=2)

    @jax.jit
    def step(bias):
        load = sigmoid_bias(logits, None, cfg, bias["bias"][0]).metrics["load"]
        return sign_rule_update(bias, {"bias": load[None]}, 0.01, "router_bias"), load

    bias = {"bias": jnp.zeros((1, 8))}
    loads = []
    for _ in range(150):
        bias, load = step(bias)
        loads.append(np.asarray(load))
    assert loads[0].max() * 8 > 2.5  # the first experts take most of the load
    assert loads[-1].max() * 8 < 1.3 and loads[-1].min() * 8 > 0.7
    assert np.all(np.diff(np.asarray(bias["bias"][0])) > 0)  # preferred experts pay most
