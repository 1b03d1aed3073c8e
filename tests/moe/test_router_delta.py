"""The apply-time router delta (`moejax.moe.router_delta`) through every selection rule:
an additive logit delta and a rank mask against a float64 NumPy routing of the same rule
on small [T, E] logits, a delta that forbids an expert routing no token to it, and the
routers reading nothing (and creating nothing) without the collection."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.config import MoEConfig
from moejax.moe.routers import ROUTERS, LinearRouter
from moejax.moe.selection import SELECTIONS
from moejax.nn.collections import ROUTER_DELTA

E = 5
LOGITS = np.array(
    [
        [0.3, 1.2, -0.4, 0.9, 0.1],
        [2.0, -1.0, 0.5, 0.4, 1.9],
        [-0.2, 0.0, 0.7, -1.5, 0.6],
        [1.1, 1.0, 0.9, 0.8, 0.7],
    ]
)
BIAS = np.array([0.0, 0.5, -0.3, 0.2, 0.9])
CONFIGS = {
    "softmax_topk": MoEConfig(num_experts=E, top_k=2),
    "softmax_topk_raw": MoEConfig(num_experts=E, top_k=2, renormalize=False),
    "top_p": MoEConfig(num_experts=E, top_k=3, selection="top_p", top_p=0.6),
    "sigmoid_bias": MoEConfig(
        num_experts=E, top_k=2, selection="sigmoid_bias", routed_scaling_factor=2.0
    ),
}


def numpy_routing(cfg, logits, forbid=(), ranks=None, bias=None):
    """float64 reference: {token: {expert: weight}} of the rule on `logits`, with experts in
    `forbid` never chosen and only the rule's choices at `ranks` (0-based) kept."""
    z = np.asarray(logits, np.float64)
    if cfg.selection == "sigmoid_bias":
        probs = 1 / (1 + np.exp(-z))
        choice = probs + (0.0 if bias is None else bias)
    else:
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        choice = probs.copy()
    out = []
    for t in range(z.shape[0]):
        order = [e for e in np.argsort(-choice[t], kind="stable") if e not in forbid]
        if ranks is not None:
            order = [order[r] for r in ranks]
        if cfg.selection == "top_p":
            kept, mass = [], 0.0
            for e in order[: cfg.top_k]:
                if mass >= cfg.top_p:
                    break
                kept.append(e)
                mass += probs[t, e]
            out.append({e: probs[t, e] for e in kept})
            continue
        kept = order[: cfg.top_k]
        w = np.array([probs[t, e] for e in kept])
        if cfg.renormalize:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        out.append(dict(zip(kept, w)))
    return out


def as_dicts(routing):
    ids, w = np.asarray(routing.expert_ids), np.asarray(routing.combine_weights)
    return [{int(e): float(x) for e, x in zip(ids[t], w[t]) if x > 0} for t in range(len(ids))]


def check(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w), (g, w)
        np.testing.assert_allclose([g[e] for e in sorted(g)], [w[e] for e in sorted(w)], rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_delta_and_rank_mask_route_as_numpy_under_every_rule(name):
    cfg = CONFIGS[name]
    rule = SELECTIONS[cfg.selection]
    bias = jnp.asarray(BIAS, jnp.float32) if cfg.selection == "sigmoid_bias" else None
    b64 = BIAS if bias is not None else None
    delta = np.array([0.5, -0.7, 0.0, 1.3, -0.2])
    ones = jnp.ones(E)
    # A plain additive delta: the rule on the shifted logits.
    got = rule(jnp.asarray(LOGITS + delta, jnp.float32), None, cfg, bias, None, ones)
    check(as_dicts(got), numpy_routing(cfg, LOGITS + delta, bias=b64))
    # Expert 1 forbidden by a -inf delta: never used, and the others fill its place.
    forbid = np.where(np.arange(E) == 1, -np.inf, 0.0)
    got = rule(jnp.asarray(LOGITS + forbid, jnp.float32), None, cfg, bias, None, ones)
    used = np.asarray(got.expert_ids)[np.asarray(got.combine_weights) > 0]
    assert 1 not in used
    check(as_dicts(got), numpy_routing(cfg, LOGITS + forbid, forbid=(1,), bias=b64))
    # SCMoE's rank-2 routing: the rule's second choice alone.
    rank2 = jnp.asarray(np.eye(E)[1], jnp.float32)
    got = rule(jnp.asarray(LOGITS, jnp.float32), None, cfg, bias, None, rank2)
    check(as_dicts(got), numpy_routing(cfg, LOGITS, ranks=[1], bias=b64))


def test_rank_two_weights_follow_the_scmoe_reference():
    # SCMoE's reference (routed_tok=[1]): sort the softmax, take slot 1, renormalise when the
    # model does (Mixtral: weight 1), else keep its probability (DeepSeekMoE).
    z = jnp.asarray(LOGITS, jnp.float32)
    p = np.asarray(jax.nn.softmax(z, axis=-1))
    second = np.argsort(-p, axis=-1, kind="stable")[:, 1]
    rank2 = jnp.asarray(np.eye(E)[1], jnp.float32)
    for renorm, want in [(True, np.ones(4)), (False, p[np.arange(4), second])]:
        r = SELECTIONS["softmax_topk"](
            z, None, MoEConfig(num_experts=E, top_k=2, renormalize=renorm), None, None, rank2
        )
        np.testing.assert_array_equal(np.asarray(r.expert_ids)[:, 0], second)
        np.testing.assert_allclose(np.asarray(r.combine_weights), np.stack([want, 0 * want], 1))


@pytest.mark.parametrize("scorer", sorted(ROUTERS))
def test_routers_read_the_collection_and_create_nothing_without_it(scorer):
    cfg = MoEConfig(num_experts=E, top_k=2, gru_dim=4)
    router = ROUTERS[scorer](cfg, init_std=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 8))
    variables = nn.unbox(router.init(jax.random.PRNGKey(1), x))
    assert ROUTER_DELTA not in variables
    plain = router.apply(variables, x)
    # Building the collection creates neutral variables: zero logits, every rank allowed.
    built, state = router.apply(variables, x, mutable=[ROUTER_DELTA])
    leaves = state[ROUTER_DELTA]
    np.testing.assert_array_equal(leaves["logits"], np.zeros(E))
    np.testing.assert_array_equal(leaves["ranks"], np.ones(E))
    for a, b in [
        (plain.expert_ids, built.expert_ids),
        (plain.combine_weights, built.combine_weights),
    ]:
        np.testing.assert_array_equal(a, b)
    # A delta forbidding the router's favourite expert moves every token off it.
    top = int(np.bincount(np.asarray(plain.expert_ids[:, 0]), minlength=E).argmax())
    delta = {"logits": jnp.where(jnp.arange(E) == top, -jnp.inf, 0.0)}
    moved = router.apply({**variables, ROUTER_DELTA: delta}, x)
    used = np.asarray(moved.expert_ids)[np.asarray(moved.combine_weights) > 0]
    assert top not in used and used.size == 12


def test_adapter_routers_ignore_the_collection():
    cfg = MoEConfig(num_experts=E, top_k=2)
    router = LinearRouter(cfg, read_delta=False)
    x = jnp.ones((3, 4))
    variables = router.init(jax.random.PRNGKey(0), x)
    _, state = router.apply(variables, x, mutable=[ROUTER_DELTA])
    assert not state.get(ROUTER_DELTA)
