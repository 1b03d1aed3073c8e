"""Routing traces of a tiny run: the experts and weights are the router's own selection
(captured from the router modules of an independent forward pass), the losses are the
model's cross-entropy, every step traces the same tokens, quotas and sources hold, and a
trace is written batch by batch."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.analysis import metrics, trace
from moejax.data import domain_names, make_batches
from moejax.train.run_loader import load_run


def router_selections(model, variables, batch):
    """Each MoE layer's Routing (ids, weights) as the router modules returned it, captured
    by flax from a plain forward pass (not through the trace's code)."""
    apply = functools.partial(  # jitted: eagerly, each of the model's ops compiles alone
        model.apply,
        capture_intermediates=lambda mdl, _: mdl.name == "router",
        mutable=["intermediates"],
    )
    _, state = jax.jit(apply)(
        variables,
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["segment_ids"]),
        jnp.asarray(batch["positions"]),
    )
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        name = jax.tree_util.keystr(path)
        if ".expert_ids" in name:
            leaves["ids"] = np.asarray(leaf)
        elif ".combine_weights" in name:
            leaves["weights"] = np.asarray(leaf)
    return leaves  # [layers, T, k], stacked by the layer scan


def test_the_trace_is_the_routers_own_selection(tiny_moe_run):
    model, variables, s, tokenizer = load_run(tiny_moe_run)
    batch = next(iter(make_batches(s.data, s.data.eval_split, process_index=0, process_count=1)))
    scored = int((batch["loss_mask"] > 0).sum())
    # The first batch's table (the quota is far from reached).
    tables = trace.trace_tables(model, variables, s, tokenizer, step=4, tokens=10**9)
    df = next(tables).to_pandas()
    assert len(df) == scored * 2  # every scored token of the batch, 2 MoE layers
    want = router_selections(model, variables, batch)
    b, length = batch["inputs"].shape
    ids = want["ids"].reshape(2, b, length, -1)
    weights = want["weights"].reshape(2, b, length, -1)
    # Rows are token-major (the scored tokens in row-major order), MoE layers inside.
    b_idx, l_idx = np.nonzero(batch["loss_mask"] > 0)
    for i, (r, c) in enumerate(zip(b_idx, l_idx)):
        for layer in range(2):
            row = df.iloc[2 * i + layer]
            assert (row.layer, row.seq, row.position) == (layer, r, batch["positions"][r, c])
            assert row.token_id == batch["inputs"][r, c]
            assert row.target_id == batch["targets"][r, c]
            np.testing.assert_array_equal(row.experts, ids[layer, r, c])
            np.testing.assert_array_equal(row.weights, weights[layer, r, c].astype(np.float32))
    # The losses and predictions are those of the logits of the same forward pass.
    logits, _ = jax.jit(model.apply)(
        variables,
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["segment_ids"]),
        jnp.asarray(batch["positions"]),
    )
    logits = np.asarray(logits, np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    keep = batch["loss_mask"] > 0
    want_loss = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0][keep]
    got = df[df.layer == 0]
    np.testing.assert_allclose(got["loss"], want_loss, rtol=2e-5, atol=2e-5)
    assert (got["predicted_id"].to_numpy() == logits.argmax(-1)[keep]).all()
    assert (df["router_entropy"] > 0).all() and (df["router_entropy"] <= np.log(4) + 1e-5).all()


def test_the_cli_traces_every_step_on_the_same_tokens(tiny_moe_run, tmp_path, capsys):
    out = tmp_path / "trace.parquet"
    code = trace.main(
        [
            f"--workdir={tiny_moe_run}",
            "--tokens=150",
            "--step=all",
            f"--out={out}",
            "--batch_size=2",
            "--sources=code,arithmetic",
        ]
    )
    assert code == 0, capsys.readouterr().err
    df = metrics.read_trace(out)
    assert df.attrs["num_experts"] == 4 and df.attrs["top_k"] == 2
    assert str(df.attrs["layer_num_experts"]) == "4,4"  # both MoE layers of the tiny run
    assert sorted(df["step"].unique()) == [2, 4]
    assert list(df.columns) == [f.name for f in trace.SCHEMA]
    for step, part in df.groupby("step"):
        assert len(part) == 150 * 2
        assert part.groupby("source").size().to_dict() == {"arithmetic": 150, "code": 150}
    key = ["layer", "seq", "segment", "position", "token_id", "target_id"]
    a, b = (df[df.step == s][key].reset_index(drop=True) for s in (2, 4))
    assert a.equals(b)
    assert (df["experts"].map(len) == 2).all()
    saturation = metrics.router_saturation(df)
    assert (saturation[saturation.step == 4]["saturation"] == 1.0).all()
    assert len(saturation) == 4  # 2 steps x 2 layers


def test_sources_and_batches_bound_what_is_read(tiny_moe_run, tmp_path):
    model, variables, s, tokenizer = load_run(tiny_moe_run, step=2)
    name = domain_names(s.data)[1]
    tables = list(
        trace.trace_tables(
            model, variables, s, tokenizer, step=2, tokens=100, sources=[name], batch_size=1
        )
    )
    rows = [t.num_rows for t in tables]
    assert len(rows) > 1 and max(rows) <= 1 * s.data.seq_len * 2  # one row per batch
    df = np.concatenate([t.column("source").to_numpy(zero_copy_only=False) for t in tables])
    assert set(df) == {name} and len(df) == 100 * 2
    with pytest.raises(trace.TraceError, match="its domains are"):
        list(
            trace.trace_tables(model, variables, s, tokenizer, step=2, tokens=10, sources=["nope"])
        )


def test_a_dense_run_has_nothing_to_trace(tiny_moe_run):
    model, variables, s, tokenizer = load_run(tiny_moe_run)
    dense = dataclasses.replace(s, model=dataclasses.replace(s.model, moe_every=0))
    with pytest.raises(trace.TraceError, match="no MoE layer"):
        list(trace.trace_tables(model, variables, dense, tokenizer, step=4, tokens=10))
