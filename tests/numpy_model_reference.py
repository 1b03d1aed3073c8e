"""Float64 NumPy reference of the moejax Transformer, plus test helpers for tests/models.

Not a test module (no `test_` prefix). Test files load it by path with `load_reference()`
because `tests/models` is not a package and is not on `sys.path`.

The reference is written from the equations, not from the moejax code:
  x_0 = E[tokens];  per layer: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))
  Attn: GQA with RoPE (rotate-half), causal + same-segment mask, softmax(q k / sqrt(D)) v W_o
  FFN: SwiGLU, or MoE = softmax top-k router (optionally renormalised) over SwiGLU experts
       plus a shared SwiGLU of width n_shared * d_expert
  logits = RMSNorm(x_L) W_head (W_head = E^T when tied)
Layer i is found in the stacked params by the layout the config documents: `first_k_dense`
dense layers, then periods of `moe_every` layers whose last one is MoE.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- building blocks


def tiny_moe_config():
    """The MoE section the tests of tests/models compare with this reference: 4 experts of
    width 8, top-2 unrenormalised, one shared expert, ragged dispatch in tiles of 4."""
    from moejax.moe.config import MoEConfig

    return MoEConfig(
        num_experts=4,
        top_k=2,
        d_expert=8,
        n_shared=1,
        renormalize=False,
        balance_coef=0.1,
        z_loss_coef=0.01,
        dispatcher="ragged",
        gmm_tile=4,
    )


def rmsnorm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x_BLHD, positions_BL, theta):
    """Rotate-half RoPE as complex rotation of the pairs (i, i + D/2) by pos * theta^(-2i/D)."""
    d = x_BLHD.shape[-1]
    inv_freq = theta ** (-np.arange(d // 2, dtype=np.float64) * 2.0 / d)
    z = x_BLHD[..., : d // 2] + 1j * x_BLHD[..., d // 2 :]
    z = z * np.exp(1j * positions_BL[:, :, None, None] * inv_freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def silu(a):
    return a / (1.0 + np.exp(-a))


def swiglu(x, w_gate, w_up, w_down):
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def attention(x_BLD, p, segment_ids_BL, positions_BL, theta):
    """GQA attention; p holds wq [d,H,D], wk/wv [d,K,D], wo [H,D,d]."""
    num_heads, num_kv = p["wq"].shape[1], p["wk"].shape[1]
    group = num_heads // num_kv
    q = rope(np.einsum("bld,dhk->blhk", x_BLD, p["wq"]), positions_BL, theta)
    k = rope(np.einsum("bld,dhk->blhk", x_BLD, p["wk"]), positions_BL, theta)
    v = np.einsum("bld,dhk->blhk", x_BLD, p["wv"])
    b, length, _, hd = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(num_heads):
            kv = h // group  # query head h reads kv head h // (H / K)
            for t in range(length):
                allowed = [
                    s for s in range(t + 1) if segment_ids_BL[bi, s] == segment_ids_BL[bi, t]
                ]
                scores = np.array([q[bi, t, h] @ k[bi, s, kv] for s in allowed]) / np.sqrt(hd)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, t, h] = sum(wi * v[bi, s, kv] for wi, s in zip(w, allowed))
    return np.einsum("blhk,hkd->bld", out, p["wo"])


def moe_ffn(x_TD, p, top_k, renormalize, mask_T):
    """Softmax top-k MoE; returns y [T, d] and the per-layer router statistics."""
    logits = x_TD @ p["router"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ex = p["experts"]
    y = np.zeros_like(x_TD)
    num_experts = probs.shape[1]
    counts = np.zeros(num_experts)
    for t in range(x_TD.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:top_k]
        g = probs[t, top] / (probs[t, top].sum() if renormalize else 1.0)
        g = g * mask_T[t]  # padding tokens get no routed output (only the shared experts)
        for gi, e in zip(g, top):
            y[t] += gi * swiglu(x_TD[t], ex["w_gate"][e], ex["w_up"][e], ex["w_down"][e])
        counts[top] += mask_T[t]
    if "shared" in p:
        y += swiglu(x_TD, p["shared"]["w_gate"], p["shared"]["w_up"], p["shared"]["w_down"])
    n = mask_T.sum()
    load = counts / (n * top_k)
    mean_prob = (probs * mask_T[:, None]).sum(0) / n
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    stats = {
        "load": load,
        "balance_loss": num_experts * np.sum(load * mean_prob),
        "z_loss": np.sum(lse**2 * mask_T) / n,
    }
    return y, stats


# ----------------------------------------------------------------------------- whole model


def layer_params(params, m, i):
    """(params of layer i as float64 arrays, is_moe) from the stacked (scanned) tree."""

    def take(tree, *idx):
        return jax.tree.map(lambda a: np.asarray(a, np.float64)[idx], tree)

    if m.periodic is None:  # a per-layer layout: the scanned runs `runs_<r>`
        for r, (kind, start, length) in enumerate(m.layer_runs):
            if start <= i < start + length:
                return take(params[f"runs_{r}"], i - start), kind.moe
    first_k, every = m.periodic
    n_prefix = m.num_layers if every == 0 else first_k
    if i < n_prefix:
        return take(params["dense_layers"], i), False
    j = i - first_k
    period, r = divmod(j, every)
    if every == 1:
        return take(params["moe_layers"], period), True
    if r == every - 1:
        return take(params["moe_periods"]["moe_block"], period), True
    return take(params["moe_periods"]["dense"], period, r), False


def forward(params, m, moe, tokens, segment_ids=None, positions=None):
    """Float64 logits [B, L, V] and a list (one per MoE layer) of router statistics."""
    tokens = np.asarray(tokens)
    b, length = tokens.shape
    seg = np.ones((b, length), np.int64) if segment_ids is None else np.asarray(segment_ids)
    pos = (
        np.broadcast_to(np.arange(length), (b, length))
        if positions is None
        else np.asarray(positions)
    ).astype(np.float64)
    emb = np.asarray(params["embedding"], np.float64)
    x = emb[tokens]
    stats = []
    for i in range(m.num_layers):
        p, is_moe = layer_params(params, m, i)
        assert is_moe == m.is_moe_layer(i), i
        h = rmsnorm(x, p["attn_norm"]["scale"], m.norm_eps)
        x = x + attention(h, p["attn"], seg, pos, m.rope_theta)
        h = rmsnorm(x, p["ffn_norm"]["scale"], m.norm_eps)
        if is_moe:
            y, s = moe_ffn(
                h.reshape(b * length, -1),
                p["moe"],
                m.layer_layout[i].top_k or moe.top_k,
                moe.renormalize,
                (seg > 0).reshape(-1).astype(np.float64),
            )
            x = x + y.reshape(x.shape)
            stats.append(s)
        else:
            x = x + swiglu(h, p["mlp"]["w_gate"], p["mlp"]["w_up"], p["mlp"]["w_down"])
    x = rmsnorm(x, np.asarray(params["final_norm"]["scale"], np.float64), m.norm_eps)
    head = emb.T if m.tie_embeddings else np.asarray(params["lm_head"], np.float64)
    return x @ head, stats


# ----------------------------------------------------------------------------- test helpers


def abstract_variables(model, batch=1, length=8):
    """Boxed (nn.Partitioned) ShapeDtypeStructs of `model.init`, with no compile."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)


def random_params(model, seed=0, std=0.3):
    """Unboxed float32 params of `model`'s structure, filled with NumPy normals.

    Much cheaper than `model.init` (no XLA compile of the RNG) and larger than the default
    init (std 0.02), so that every sub-layer moves the logits by O(1) and a wrong branch
    cannot hide under the tolerance. Norm scales are 1 + N(0, 0.1) and the embedding N(0, 1).
    """
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(abstract_variables(model))["params"]

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        elif "embedding" in name:
            value = rng.normal(size=leaf.shape)
        else:
            value = std * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def fast_jit(fn, **kw):
    """`jax.jit` with cheap XLA:CPU compilation (same semantics, ~5x faster compile).

    The tests run tiny shapes, so compile time dominates: the legacy elemental emitter and
    backend optimisation level 0 cut a 5-layer MoE train step from ~8 s to ~1.5 s of compile.
    """
    if jax.default_backend() == "cpu":
        kw["compiler_options"] = {
            "xla_backend_optimization_level": 0,
            "xla_cpu_use_fusion_emitters": False,
        }
    return jax.jit(fn, **kw)


def tree_size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
