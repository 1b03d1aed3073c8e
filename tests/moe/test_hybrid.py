"""The `hybrid` plan: buffers + overflow loop cover every assignment once, and equal the
dense reference in values and gradients at every split, including closed-over arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import dispatch
from moejax.moe.experts import ExpertFn, swiglu_expert_fn
from moejax.moe.hybrid import head_capacity, make_layout
from moejax.moe.routing import Routing

E, K, D, F, T = 5, 2, 6, 4, 48


def inputs(seed=0, unused=False):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    params = tuple(
        jnp.asarray(rng.normal(size=s) * 0.4, jnp.float32)
        for s in [(E, D, F), (E, D, F), (E, F, D)]
    )
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    ids[: T // 2, 0] = 0  # expert 0 hot: its assignments overflow every small buffer
    w = rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32)
    if unused:
        w[::3, 1] = 0.0  # empty slots (padding tokens, top-p): never computed
    return x, params, jnp.asarray(ids), jnp.asarray(w)


def run(dispatcher, x, expert_fn, ids, w, **overrides):
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=F, dispatcher=dispatcher, **overrides)
    routing = Routing(expert_ids=ids, combine_weights=w, aux_losses={}, metrics={})
    return dispatch(x, routing, expert_fn, cfg)[0]


@pytest.mark.parametrize("factor", [0.25, 1.0])
@pytest.mark.parametrize("tile", [1, 3, 8])
def test_buffers_and_tiles_cover_each_used_assignment_once(factor, tile):
    _, _, ids, w = inputs(unused=True)
    cap = head_capacity(T * K, E, factor)
    lay = jax.jit(make_layout, static_argnums=(2, 3, 4))(ids, w > 0, E, cap, tile)
    seen = np.zeros(T * K, int)
    slot_assign = np.asarray(lay.slot_assign)
    for s, a in enumerate(slot_assign):
        if a < T * K:
            seen[a] += 1
            assert np.asarray(lay.slot).reshape(-1)[a] == s
    order, plan = np.asarray(lay.order), jax.tree.map(np.asarray, lay.plan)
    for i in range(int(plan.count)):
        rows = order[plan.start[i] : plan.start[i] + plan.rows[i]]
        assert 0 < plan.rows[i] <= tile
        assert np.all(np.asarray(ids).reshape(-1)[rows] == plan.group[i])
        seen[rows] += 1
    used = np.asarray(w).reshape(-1) > 0
    np.testing.assert_array_equal(seen, used.astype(int))
    # Buffers hold at most C per expert; the loop holds exactly the rest.
    loads = np.bincount(np.asarray(ids).reshape(-1)[used], minlength=E)
    assert (slot_assign < T * K).sum() == np.minimum(loads, cap).sum()


@pytest.mark.parametrize("factor,tile", [(0.0, 4), (0.25, 3), (1.0, 8), (4.0, 64)])
def test_values_and_gradients_match_dense_reference(factor, tile):
    x, params, ids, w = inputs(seed=1, unused=True)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=(T, D)), jnp.float32)

    def loss(dispatcher, **kw):
        return lambda x, p, w: jnp.sum(
            run(dispatcher, x, swiglu_expert_fn(*p), ids, w, **kw) * probe
        )

    kw = dict(hybrid_capacity_factor=factor, hybrid_tile=tile)
    want = jax.value_and_grad(loss("dense_reference"), argnums=(0, 1, 2))(x, params, w)
    got = jax.jit(jax.value_and_grad(loss("hybrid", **kw), argnums=(0, 1, 2)))(x, params, w)
    # Unused slots are never computed (as in `ragged`): no gradient reaches their weight.
    used = np.asarray(w) > 0
    (got_v, (*got_g, got_w)), (want_v, (*want_g, want_w)) = got, want
    for g, r in zip(jax.tree.leaves((got_v, got_g)), jax.tree.leaves((want_v, want_g))):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_w, np.where(used, want_w, 0.0), atol=2e-5, rtol=2e-5)


def test_gradient_reaches_arrays_the_expert_function_closes_over():
    """The overflow loop's custom VJP sees closed-over arrays (MixLoRA's frozen W_down) as
    explicit inputs (`jax.closure_convert`), so they get their gradient too."""
    x, (a, _, _), ids, w = inputs(seed=4)
    scale = jnp.linspace(0.5, 1.5, F)

    def loss(dispatcher, **kw):
        def f(a, scale):
            fn = ExpertFn(lambda wt, xs, mm: jnp.tanh(mm(xs, wt["a"]) * scale), {"a": a})
            return jnp.sum(run(dispatcher, x, fn, ids, w, **kw) ** 2)

        return f

    want = jax.grad(loss("dense_reference"), argnums=(0, 1))(a, scale)
    got = jax.jit(
        jax.grad(loss("hybrid", hybrid_capacity_factor=0.25, hybrid_tile=2), argnums=(0, 1))
    )(a, scale)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_matches_float32_within_rounding():
    x, params, ids, w = inputs(seed=5)
    kw = dict(hybrid_capacity_factor=0.5, hybrid_tile=4)
    want = run("hybrid", x, swiglu_expert_fn(*params), ids, w, **kw)
    got = run("hybrid", x, swiglu_expert_fn(*params, dtype=jnp.bfloat16), ids, w, **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05, rtol=0.05)


def test_capacity_rounds_up_to_eight():
    assert head_capacity(96, 5, 1.0) == 24  # ceil(19.2) = 20 -> 24
    assert head_capacity(96, 5, 0.0) == 0
