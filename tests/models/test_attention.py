"""Attention and RoPE against float64 NumPy and the closed forms of rotary embeddings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_model_reference as ref  # tests/ is on sys.path (pytest.ini)
import pytest

from moejax.models.attention import Attention, attention_mask
from moejax.models.config import ModelConfig
from moejax.nn.norm import RMSNorm
from moejax.nn.rotary import rotary_embedding

# init_std 0.3 (not 0.02) so attention scores are O(1): a near-uniform softmax would hide
# mask or head-grouping mistakes under the tolerance.
CFG = ModelConfig(d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32, init_std=0.3)


def _inputs(seed, b=2, length=8):
    x = jax.random.normal(jax.random.PRNGKey(seed), (b, length, CFG.d_model))
    seg = np.ones((b, length), np.int32)
    seg[1] = [1, 1, 1, 2, 2, 2, 2, 0]  # packed row: two segments and one padding token
    pos = np.tile(np.arange(length, dtype=np.int32), (b, 1))
    pos[1] = [0, 1, 2, 0, 1, 2, 3, 0]
    return x, jnp.asarray(seg), jnp.asarray(pos)


apply = ref.fast_jit(Attention(CFG).apply)


@pytest.fixture(scope="module")
def attn():
    x, seg, pos = _inputs(0)
    return ref.fast_jit(Attention(CFG).init)(jax.random.PRNGKey(1), x, seg, pos)


def test_attention_matches_numpy_gqa(attn):
    variables = attn
    x, seg, pos = _inputs(2)
    got = apply(variables, x, seg, pos)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
    assert p["wq"].shape == (16, 4, 4) and p["wk"].shape == (16, 2, 4)
    want = ref.attention(
        np.asarray(x, np.float64), p, np.asarray(seg), np.asarray(pos), CFG.rope_theta
    )
    assert np.abs(want).mean() > 0.1  # the reference is not trivially small
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_init_uses_scaled_output_std(attn):
    variables = attn
    p = nn.unbox(variables)["params"]
    np.testing.assert_allclose(np.std(p["wq"]), CFG.init_std, rtol=0.15)
    np.testing.assert_allclose(
        np.std(p["wo"]), CFG.init_std / (2 * CFG.num_layers) ** 0.5, rtol=0.15
    )
    assert tuple(nn.get_partition_spec(variables)["params"]["wq"]) == ("embed", "heads", "kv")


def test_attention_is_invariant_to_shifting_all_positions(attn):
    # RoPE makes scores depend on m - n only, so a common offset changes nothing.
    variables = attn
    x, seg, pos = _inputs(3)
    y0 = apply(variables, x, seg, pos)
    y1 = apply(variables, x, seg, pos + 37)
    np.testing.assert_allclose(y1, y0, atol=2e-5)
    y2 = apply(variables, x, seg, jnp.zeros_like(pos))  # but positions do matter
    assert np.max(np.abs(y2 - y0)) > 1e-2


def test_attention_mask_is_causal_and_per_segment():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(seg))[0, 0]
    want = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool
    )
    np.testing.assert_array_equal(mask, want)


def test_rope_matches_complex_rotation_and_preserves_norms():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 50, size=(2, 6)).astype(np.int32)
    got = np.asarray(rotary_embedding(jnp.asarray(x), jnp.asarray(pos), 10_000.0))
    want = ref.rope(x.astype(np.float64), pos.astype(np.float64), 10_000.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    zero = rotary_embedding(jnp.asarray(x), jnp.zeros((2, 6), jnp.int32), 10_000.0)
    np.testing.assert_array_equal(zero, x)  # position 0 is the identity


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    d = 16
    q = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)

    def score(m, n):
        qm = rotary_embedding(q, jnp.array([[m]]), 10_000.0)
        kn = rotary_embedding(k, jnp.array([[n]]), 10_000.0)
        return float(jnp.sum(qm * kn))

    for m, n in [(3, 1), (10, 10), (2, 9), (40, 7)]:
        base = score(m, n)
        for shift in (1, 5, 23):
            np.testing.assert_allclose(score(m + shift, n + shift), base, atol=1e-4)
    # Closed form: <R(m) q, R(n) k> = sum_i Re[(q_i + i q_i') conj(k_i + i k_i') e^{i(m-n)w_i}].
    qn, kn = np.asarray(q, np.float64)[0, 0, 0], np.asarray(k, np.float64)[0, 0, 0]
    zq, zk = qn[: d // 2] + 1j * qn[d // 2 :], kn[: d // 2] + 1j * kn[d // 2 :]
    w = 10_000.0 ** (-np.arange(d // 2) * 2.0 / d)
    for delta in (0, 1, 4, -6):
        want = np.sum((zq * np.conj(zk) * np.exp(1j * delta * w)).real)
        np.testing.assert_allclose(score(20 + delta, 20), want, atol=1e-4)
    assert abs(score(4, 0) - score(0, 0)) > 1e-2  # and the score does change with m - n


def test_rmsnorm_matches_numpy():
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 16)) * 3.0
    norm = RMSNorm(eps=1e-6)
    variables = norm.init(jax.random.PRNGKey(0), x)
    scale = jnp.linspace(0.5, 1.5, 16)
    got = norm.apply({"params": {"scale": scale}}, x)
    want = ref.rmsnorm(np.asarray(x, np.float64), np.asarray(scale, np.float64), 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nn.unbox(variables)["params"]["scale"], np.ones(16))


@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_mla_names_no_logical_axis_twice_and_each_has_a_rule(q_lora_rank):
    """A parameter that names one logical axis twice cannot be sharded (flax refuses it:
    "Dimensions ('kv',) occur more than once"), which stopped every converted DeepSeek-V3
    from training; the latent dims have their own axis (tests/hf/test_convert_layouts.py
    trains such checkpoints)."""
    import dataclasses

    from moejax.models.mla import MLAttention
    from moejax.sharding.config import DEFAULT_RULES

    cfg = dataclasses.replace(
        CFG,
        attention="mla",
        num_kv_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
    )
    x, seg, pos = _inputs(0)
    boxed = jax.eval_shape(MLAttention(cfg).init, jax.random.PRNGKey(0), x, seg, pos)["params"]
    names = {k: v.names for k, v in boxed.items() if isinstance(v, nn.LogicallyPartitioned)}
    assert {"wkv_a", "wkv_b", "wo"} <= set(names)
    assert ("wq_a" in names) == bool(q_lora_rank)
    rules = {name for name, _ in DEFAULT_RULES}
    for key, axes in names.items():
        assert len(set(axes)) == len(axes), (key, axes)
        assert set(axes) <= rules, (key, axes)
    assert names["wkv_b"] == ("latent", "heads", "kv")
