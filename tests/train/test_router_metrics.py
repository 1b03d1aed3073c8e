"""Router metrics in evaluation and training logs: routing stability, experts per token per
layer and per data domain, for the RMoE and top-p configs."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from moejax.config.validation import validate
from moejax.data import DOMAINS
from moejax.sharding.config import batch_mesh_axes
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import batch_sharding, shard_batch
from moejax.train.evaluation import _eval_batches, evaluate
from moejax.train.experiment import build_experiment
from moejax.train.loop import train
from moejax.train.routing_stability import RoutingStability, top1_changes, top1_dtype
from moejax.train.step import forward
from moejax.train.writers import read_jsonl


def _evaluation(stab: RoutingStability, *batches) -> dict:
    """One evaluation of `RoutingStability` over batches of top-1 experts [layers, B, L],
    compared on device with `top1_changes` as the eval step does."""
    stab.start()
    changed = compared = 0
    for top1 in batches:
        top1 = jnp.asarray(top1, top1_dtype(4))
        previous = stab.previous(jax.ShapeDtypeStruct(top1.shape, top1.dtype))
        assert previous.dtype == np.int8
        c, n = top1_changes(previous, top1)
        changed, compared = changed + np.asarray(c), compared + np.asarray(n)
        stab.add(top1)
    return stab.finish(changed, compared)


def test_routing_stability_closed_form():
    stab = RoutingStability()
    first = np.array([[0, 1, 2, 3, -1], [1, 1, 1, 1, -1]])[:, None]  # [layers, B=1, L=5]
    assert _evaluation(stab, first[..., :3], first[..., 3:]) == {}
    second = np.array([[0, 1, 3, 3, 2], [0, 0, 1, 1, -1]])[:, None]
    got = _evaluation(stab, second[..., :3], second[..., 3:])  # two batches, counts summed
    np.testing.assert_allclose(got["moe/top1_changed"], [1 / 4, 2 / 4])  # -1: not a loss token
    assert _evaluation(stab, np.zeros((2, 1, 3), int)) == {}  # another evaluation set
    assert _evaluation(stab, np.zeros((2, 1, 3), int))["moe/top1_changed"].tolist() == [0, 0]


def test_the_narrowest_top1_dtype_holds_every_expert_id():
    assert [top1_dtype(n) for n in (1, 128, 129, 32768, 32769)] == [
        np.int8,
        np.int8,
        np.int16,
        np.int16,
        np.int32,
    ]


def test_stability_is_zero_for_the_same_params_and_sees_a_moved_router(tiny_config):
    s = validate(tiny_config("rmoe", **{"moe.gru_dim": 16}))
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    params = exp.init_fn(jax.random.PRNGKey(0)).params
    stab = RoutingStability()
    first = evaluate(exp.eval_fn, params, s, mesh, stab)
    assert "eval/moe/top1_changed" not in first
    present = [d for d in DOMAINS if f"eval/loss/{d}" in first]
    assert present
    for d in present:  # softmax top-2: exactly two experts for every token of every domain
        assert first[f"eval/moe/experts_per_token/{d}"] == pytest.approx(2.0, abs=1e-6)
    again = evaluate(exp.eval_fn, params, s, mesh, stab)
    assert again["eval/moe/top1_changed"] == 0.0
    assert again["eval/moe/top1_changed/layer0"] == 0.0
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.5 * jax.random.normal(jax.random.PRNGKey(1), a.shape)
            if "router" in jax.tree_util.keystr(path)
            else a
        ),
        nn.unbox(params),
    )
    changed = evaluate(exp.eval_fn, moved, s, mesh, stab)["eval/moe/top1_changed"]
    assert 0.05 < changed <= 1.0


def test_top_p_run_logs_experts_per_token_by_layer_and_domain(tiny_config, tmp_path):
    config = tiny_config("top_p", **{"train.steps": 4, "train.eval_every": 2})
    train(config, str(tmp_path))
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert "eval/moe/top1_changed" not in evals[0]
    assert 0.0 <= evals[1]["eval/moe/top1_changed"] <= 1.0
    k = config.moe.top_k
    for r in evals:
        present = [d for d in DOMAINS if f"eval/loss/{d}" in r]
        assert present and all(
            f"eval/moe/experts_per_token/{d}" not in r for d in DOMAINS if d not in present
        )
        for d in present:
            assert 1.0 <= r[f"eval/moe/experts_per_token/{d}"] <= k
        assert 1.0 <= r["eval/moe/experts_per_token/layer0"] <= k
    train_row = [r for r in rows if "train/loss" in r][-1]
    hist = np.asarray(train_row["train/moe/experts_per_token_hist/layer0"])
    assert hist.shape == (k + 1,) and hist[0] == 0.0 and abs(hist.sum() - 1.0) < 1e-5
    mean = np.dot(np.arange(k + 1), hist)
    assert mean == pytest.approx(train_row["train/moe/experts_per_token/layer0"], rel=1e-5)
    assert "train/aux/entropy" in train_row and "train/aux/z_loss" not in train_row


def _moved_routers(params, scale=0.5):
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + scale * jax.random.normal(jax.random.PRNGKey(1), a.shape)
            if "router" in jax.tree_util.keystr(path)
            else a
        ),
        params,
    )


def test_eval_keeps_top1_on_device_and_matches_a_numpy_reference(tiny_config):
    """The compiled eval step returns small replicated sums and the top-1 experts split like
    the batch (int8); two evaluations give the loss (here from chunked cross-entropy) and the
    per-layer stability fractions of a NumPy reference over the same batches."""
    config = tiny_config("deepseekmoe", **{"model.first_k_dense": 0, "train.loss_chunk": 48})
    s = validate(config, num_devices=1, num_processes=1)
    assert s.model.num_moe_layers == 2
    mesh = make_mesh(s.mesh)
    exp = build_experiment(s, mesh)
    state = exp.init_fn(jax.random.PRNGKey(0))
    batches = list(_eval_batches(s))
    assert len(batches) >= 2

    sharded = shard_batch(batches[0], mesh, s.mesh.rules)
    b, length = sharded["inputs"].shape
    top1_sharding = batch_sharding(mesh, s.mesh.rules, lead=1)
    like = jax.ShapeDtypeStruct((2, b, length), jnp.int8, sharding=top1_sharding)
    compiled = exp.eval_fn.lower(
        state.params, sharded, like, collections=state.collections
    ).compile()
    sums_info, top1_info = compiled.out_info
    assert (top1_info.shape, top1_info.dtype) == ((2, b, length), jnp.int8)
    assert top1_info.sharding.spec == PartitionSpec(None, batch_mesh_axes(s.mesh.rules))
    for name, leaf in sums_info.items():  # nothing per token, all replicated
        assert leaf.size <= 2 * s.moe.num_experts, name
        assert leaf.sharding.spec == PartitionSpec(), name

    forward_ = jax.jit(lambda p, batch: forward(exp.model, p, batch, state.collections))

    def reference(params):
        """(loss, top-1 experts of every batch [layers, tokens]) in NumPy."""
        nll_sum, tokens, top1 = 0.0, 0.0, []
        for batch in batches:
            logits, extras = forward_(params, jax.tree.map(jnp.asarray, batch))
            z = np.asarray(logits, np.float64)
            z = z - z.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
            mask = batch["loss_mask"] > 0
            nll_sum, tokens = nll_sum + nll[mask].sum(), tokens + mask.sum()
            experts = np.asarray(extras["routing"]["top1_expert"])
            top1.append(np.where(mask[None], experts, -1).reshape(2, -1))
        return nll_sum / tokens, np.concatenate(top1, axis=1)

    moved = _moved_routers(state.params)
    stab = RoutingStability()
    first = evaluate(exp.eval_fn, state.params, s, mesh, stab, state.collections)
    second = evaluate(exp.eval_fn, moved, s, mesh, stab, state.collections)
    (loss_a, top1_a), (loss_b, top1_b) = reference(state.params), reference(moved)
    assert first["eval/loss"] == pytest.approx(loss_a, rel=1e-5)
    assert second["eval/loss"] == pytest.approx(loss_b, rel=1e-5)
    assert "eval/moe/top1_changed" not in first
    valid = (top1_a >= 0) & (top1_b >= 0)
    want = ((top1_a != top1_b) & valid).sum(1) / valid.sum(1)
    assert valid.sum() > 0 and np.all(want > 0.05)
    for i in range(2):
        assert second[f"eval/moe/top1_changed/layer{i}"] == pytest.approx(want[i], abs=1e-12)
    assert second["eval/moe/top1_changed"] == pytest.approx(want.mean(), abs=1e-12)
