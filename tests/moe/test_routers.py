"""Routers: top-p selection against a brute-force NumPy rule, RMoE's GRU router against a
hand-written float64 NumPy recurrence over layers (and its gradient path), and every router
through every dispatcher equal to `dense_reference`. DeepSeek-V3's sigmoid_bias rule has its
own references in test_sigmoid_bias.py."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models.config import ModelConfig
from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import DISPATCHERS
from moejax.moe.gru_router import GRUCell, GRURouter
from moejax.moe.layer import MoELayer
from moejax.moe.routers import ROUTERS
from moejax.moe.selection import SELECTIONS, routing_slots, top_p, top_p_mask

E, T, D, H = 6, 24, 10, 7


# ----------------------------------------------------------------------------- top-p


def minimal_prefix(probs: np.ndarray, p: float) -> int:
    """Brute force: the fewest experts (largest first) whose probabilities sum to >= p."""
    s = np.sort(probs)[::-1]
    for n in range(1, len(s) + 1):
        if np.sum(s[:n], dtype=np.float64) >= p:
            return n
    return len(s)


@pytest.mark.parametrize(
    "p, want",
    [
        (0.4, [1, 0, 0, 0]),
        (0.5, [1, 0, 0, 0]),
        (0.6, [1, 1, 0, 0]),
        (0.75, [1, 1, 0, 0]),
        (0.8, [1, 1, 1, 0]),
        (0.875, [1, 1, 1, 0]),
        (0.9, [1, 1, 1, 1]),
        (1.0, [1, 1, 1, 1]),
    ],
)
def test_top_p_mask_exact_prefix_on_dyadic_probabilities(p, want):
    # Dyadic probabilities sum exactly in float32, so "sum reaches p" is exact at 0.5, 0.75,
    # 0.875 and 1.0: the prefix stops as soon as it reaches p, never one expert later.
    probs = jnp.asarray([[0.5, 0.25, 0.125, 0.125]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(top_p_mask(probs, p))[0], np.array(want, bool))


def test_top_p_ties_take_lower_expert_ids_first_and_p1_takes_all():
    cfg = MoEConfig(num_experts=4, top_k=4, selection="top_p", top_p=0.5)
    logits = jnp.zeros((1, 4))  # four experts at exactly 0.25
    sel = top_p(logits, None, cfg)  # 2 slots: ceil(0.5 * 4)
    np.testing.assert_array_equal(sel.expert_ids[0], [0, 1])
    np.testing.assert_allclose(sel.combine_weights[0], [0.25, 0.25])  # not renormalised
    sel = top_p(logits, None, dataclasses.replace(cfg, top_p=1.0))
    np.testing.assert_allclose(sel.combine_weights[0], [0.25] * 4)


def test_top_p_matches_brute_force_minimal_prefix_and_respects_max_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 8)) * rng.uniform(0.2, 3.0, size=(200, 1))
    for p, k in [(0.4, 8), (0.7, 8), (0.9, 3), (1.0, 8)]:
        cfg = MoEConfig(num_experts=8, top_k=k, selection="top_p", top_p=p)
        sel = top_p(jnp.asarray(logits, jnp.float32), None, cfg)
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
        used = np.asarray(sel.combine_weights) > 0
        for t in range(logits.shape[0]):
            n = min(minimal_prefix(probs[t], p), k)
            assert used[t].sum() == n, (p, k, t)
            chosen = np.asarray(sel.expert_ids[t])[used[t]]
            np.testing.assert_array_equal(chosen, np.argsort(-probs[t], kind="stable")[:n])
            np.testing.assert_allclose(
                np.asarray(sel.combine_weights[t])[used[t]], probs[t][chosen], rtol=1e-6
            )
        count = used.sum(axis=1)
        np.testing.assert_allclose(sel.metrics["experts_per_token"], count.mean(), rtol=1e-6)
        slots = routing_slots(cfg)
        assert sel.combine_weights.shape == (200, slots) and slots <= k
        np.testing.assert_allclose(
            sel.metrics["experts_per_token_hist"],
            np.bincount(count, minlength=slots + 1) / len(count),
            atol=1e-7,
        )


@pytest.mark.parametrize(
    "p, k, want", [(0.4, 8, 4), (0.5, 8, 4), (0.51, 8, 5), (0.4, 3, 3), (1.0, 8, 8), (0.01, 8, 1)]
)
def test_top_p_slots_are_the_most_any_token_can_need(p, k, want):
    cfg = MoEConfig(num_experts=8, top_k=k, selection="top_p", top_p=p)
    assert routing_slots(cfg) == want
    # The bound is reached: near-uniform probabilities need ceil(p * E) experts.
    sel = top_p(jnp.zeros((1, 8)) + jnp.arange(8) * 1e-4, None, cfg)
    assert int(np.sum(np.asarray(sel.combine_weights) > 0)) == want


def test_top_p_losses_count_only_used_slots_and_add_entropy():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(T, E)) * 2, jnp.float32)
    mask = jnp.asarray(np.arange(T) < T - 4)  # 4 padding tokens
    cfg = MoEConfig(
        num_experts=E,
        top_k=E,
        selection="top_p",
        top_p=0.4,
        balance_coef=1e-2,
        z_loss_coef=0.0,
        entropy_coef=1e-4,
    )
    sel = top_p(logits, mask, cfg)
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    m = np.asarray(mask, np.float64)
    counts = np.zeros(E)
    for t in range(T):
        for j in range(E):
            if sel.combine_weights[t, j] > 0:
                counts[int(sel.expert_ids[t, j])] += m[t]
    f = counts / counts.sum()
    pbar = (probs * m[:, None]).sum(0) / m.sum()
    entropy = np.sum(-np.sum(probs * np.log(probs), axis=1) * m) / m.sum()
    np.testing.assert_allclose(sel.aux_losses["balance"], 1e-2 * E * np.sum(f * pbar), rtol=1e-5)
    np.testing.assert_allclose(sel.aux_losses["entropy"], 1e-4 * entropy, rtol=1e-5)
    assert "z_loss" not in sel.aux_losses
    assert np.all(np.asarray(sel.combine_weights)[~np.asarray(mask)] == 0)


# ----------------------------------------------------------------------------- GRU (RMoE)


def np_gru(cell, u, h):
    """PyTorch's GRUCell equations in float64."""
    c = {k: np.asarray(v, np.float64) for k, v in cell.items()}
    gi, gh = u @ c["w_i"] + c["b_i"], h @ c["w_h"] + c["b_h"]
    (ir, iz, i_n), (hr, hz, hn) = np.split(gi, 3, axis=-1), np.split(gh, 3, axis=-1)
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    r, z = sig(ir + hr), sig(iz + hz)
    n = np.tanh(i_n + r * hn)
    return (1.0 - z) * n + z * h


class RouterChain(nn.Module):
    """num_layers GRU routers as in the Transformer: a shared cell created once, the state
    carried from layer to layer (h_0 = 0). Returns every layer's Routing."""

    cfg: MoEConfig
    num_layers: int

    @nn.compact
    def __call__(self, xs):
        shared = GRUCell(self.cfg.gru_dim, 0.3, name="cell")() if self.cfg.gru_shared else None
        state, out = None, []
        for i in range(self.num_layers):
            r = GRURouter(self.cfg, init_std=0.3, name=f"router_{i}")(xs[i], state, None, shared)
            state = r.state
            out.append(r)
        return out


def gru_cfg(**kw):
    base = dict(
        num_experts=E,
        top_k=2,
        scorer="gru",
        gru_dim=H,
        renormalize=True,
        balance_coef=0.0,
        z_loss_coef=0.0,
    )
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("shared", [True, False])
def test_gru_router_matches_numpy_recurrence_over_layers(shared):
    cfg, n = gru_cfg(gru_shared=shared), 4
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(n, T, D)), jnp.float32)
    chain = RouterChain(cfg, n)
    params = chain.init(jax.random.PRNGKey(0), xs)["params"]
    params = jax.tree.map(  # non-zero biases, so every term of the cell is exercised
        lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params
    )
    params = nn.unbox(params)
    routings = chain.apply({"params": params}, xs)
    h = np.zeros((T, H))
    for i, r in enumerate(routings):
        p = params[f"router_{i}"]
        cell = params["cell"] if shared else p["gru"]
        h = np_gru(cell, np.asarray(xs[i], np.float64) @ np.asarray(p["proj"], np.float64), h)
        np.testing.assert_allclose(r.state, h, rtol=1e-5, atol=1e-6)
        logits = h @ np.asarray(p["kernel"], np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :2]
        w = np.take_along_axis(probs, ids, axis=1)
        np.testing.assert_array_equal(r.expert_ids, ids)
        np.testing.assert_allclose(r.combine_weights, w / w.sum(1, keepdims=True), rtol=1e-5)
    assert ("cell" in params) == shared and ("gru" in params["router_0"]) == (not shared)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_first_router_from_last_layer_unless_detached(detach):
    cfg, n = gru_cfg(gru_detach=detach), 4
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(n, T, D)), jnp.float32)
    chain = RouterChain(cfg, n)
    params = nn.unbox(chain.init(jax.random.PRNGKey(1), xs)["params"])
    probe = jnp.asarray(np.random.default_rng(2).normal(size=(T, 2)), jnp.float32)

    def last_layer_loss(p):  # depends on the last layer's routing only
        return jnp.sum(chain.apply({"params": p}, xs)[-1].combine_weights * probe)

    grads = jax.grad(last_layer_loss)(params)
    first = float(jnp.max(jnp.abs(grads["router_0"]["proj"])))
    last = float(jnp.max(jnp.abs(grads[f"router_{n - 1}"]["proj"])))
    assert last > 1e-4
    if detach:
        assert first == 0.0
    else:
        assert first > 1e-6 * last and first > 0.0


@pytest.mark.parametrize("rule", sorted(SELECTIONS))
def test_gru_composes_with_every_selection_rule(rule):
    """The GRU scorer feeding a rule equals that rule applied to the GRU's logits."""
    groups = dict(n_group=2, topk_group=1) if rule == "sigmoid_bias" else {}
    cfg = gru_cfg(selection=rule, top_k=3, top_p=0.5, **groups)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(T, D)), jnp.float32)
    router = GRURouter(cfg, init_std=0.3)
    variables = nn.unbox(router.init(jax.random.PRNGKey(0), x))
    params, bias = variables["params"], None
    if rule == "sigmoid_bias":  # a bias that moves the selection
        bias = jnp.asarray(np.random.default_rng(8).normal(size=E) * 0.2, jnp.float32)
        variables = {**variables, "router_bias": {"bias": bias}}
    assert ("router_bias" in variables) == (rule == "sigmoid_bias")
    got = router.apply(variables, x)
    h = np_gru(
        params["gru"], np.asarray(x, np.float64) @ np.asarray(params["proj"]), np.zeros((T, H))
    )
    logits = jnp.asarray(h @ np.asarray(params["kernel"], np.float64), jnp.float32)
    want = SELECTIONS[rule](logits, None, cfg, bias)
    np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
    np.testing.assert_allclose(got.combine_weights, want.combine_weights, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- dispatchers

MODEL = ModelConfig(d_model=D, num_layers=2, init_std=0.3)
ROUTER_CONFIGS = {  # every scorer with every selection rule
    "softmax_topk": dict(scorer="linear", selection="softmax_topk", top_k=2),
    "top_p": dict(scorer="linear", selection="top_p", top_k=4, top_p=0.5, entropy_coef=1e-4),
    "gru": dict(scorer="gru", selection="softmax_topk", top_k=2, gru_dim=H),
    "gru+top_p": dict(scorer="gru", selection="top_p", top_k=4, top_p=0.5, gru_dim=H),
    "sigmoid_bias": dict(
        scorer="linear",
        selection="sigmoid_bias",
        top_k=3,
        n_group=3,
        topk_group=2,
        routed_scaling_factor=2.5,
        z_loss_coef=0.0,
        seq_balance_coef=1e-2,
        device_balance_coef=1e-2,
        balance_devices=2,
    ),
    "gru+sigmoid_bias": dict(
        scorer="gru",
        selection="sigmoid_bias",
        top_k=2,
        gru_dim=H,
        n_group=2,
        topk_group=1,
        group_mask="neg_inf",
        renormalize=False,
    ),
}


# expert_parallel and fssdp run their local (one-device) plan here; two routers cover them
# (top-p's zero-weight slots; GRU state with the sigmoid bias) to keep the suite fast. Their
# sharded plan is tests/moe/test_expert_parallel.py.
SHARDED_DISPATCHERS = {"expert_parallel", "fssdp"}
ROUTER_DISPATCHER_CASES = list(
    itertools.product(
        sorted(ROUTER_CONFIGS), sorted(set(DISPATCHERS) - {"dense_reference"} - SHARDED_DISPATCHERS)
    )
) + [("top_p", "fssdp"), ("gru+sigmoid_bias", "expert_parallel")]


@pytest.mark.parametrize(  # pallas (interpreted on CPU): one router by default
    "router, dispatcher",
    [
        pytest.param(r, d, marks=pytest.mark.slow)
        if d == "pallas" and r != "softmax_topk"
        else (r, d)
        for r, d in ROUTER_DISPATCHER_CASES
    ],
)
def test_every_router_through_every_dispatcher_equals_dense_reference(router, dispatcher):
    base = MoEConfig(
        num_experts=E, d_expert=5, gmm_tile=4, capacity_factor=float(E), **ROUTER_CONFIGS[router]
    )
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, T // 2, D)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(5).uniform(size=(2, T // 2)) > 0.2)
    state = (
        jnp.asarray(np.random.default_rng(6).normal(size=(T, H)), jnp.float32)
        if base.scorer == "gru"
        else None
    )
    layer_ref = MoELayer(dataclasses.replace(base, dispatcher="dense_reference"), MODEL)
    variables = nn.unbox(layer_ref.init(jax.random.PRNGKey(0), x, state, mask))
    # Non-trainable collections (sigmoid_bias's router bias), made non-zero so they matter.
    fixed = jax.tree.map(
        lambda a: jnp.asarray(np.random.default_rng(9).normal(size=a.shape) * 0.1, a.dtype),
        {k: v for k, v in variables.items() if k != "params"},
    )
    assert bool(fixed) == (base.selection == "sigmoid_bias")
    probe = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

    def run(layer):
        def loss(params):
            out = layer.apply({**fixed, "params": params}, x, state, mask)
            loss = jnp.sum(out.y * probe) + sum(out.aux_losses.values())
            return loss, (out.y, out.router_state, out.metrics)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (_, (want, want_state, _)), want_grad = run(layer_ref)
    (_, (got, got_state, metrics)), got_grad = run(
        MoELayer(dataclasses.replace(base, dispatcher=dispatcher), MODEL)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(metrics["dropped_fraction"]) == 0.0
    if state is not None:
        np.testing.assert_allclose(got_state, want_state, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_router_registries_are_fully_tested():
    assert {c["scorer"] for c in ROUTER_CONFIGS.values()} == set(ROUTERS)
    assert {c["selection"] for c in ROUTER_CONFIGS.values()} >= set(SELECTIONS)
    pairs = {(c["scorer"], c["selection"]) for c in ROUTER_CONFIGS.values()}
    assert pairs == set(itertools.product(ROUTERS, SELECTIONS))  # every scorer, every rule
