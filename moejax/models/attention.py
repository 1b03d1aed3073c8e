"""Causal multi-head attention with grouped-query heads (GQA), RoPE, packed segments, and a
key/value cache for decoding.

GQA (Ainslie et al., 2023): `num_kv_heads` key/value heads shared by groups of
`num_heads / num_kv_heads` query heads. With sequence packing, a token attends only to
earlier tokens of its own segment (`segment_ids` equal); positions restart per segment.
`attention_bias` adds biases to the q/k/v projections (Qwen2, Qwen2-MoE; not to the output).
`qk_norm` RMS-normalises queries and keys before RoPE: per head (`head`, Qwen3-MoE; modules
`q_norm`/`k_norm` with scales `[head_dim]`) or over the whole projection (`full`, OLMoE;
scales `[num_heads * head_dim]`, `[num_kv_heads * head_dim]`).

Decoding (`decode=True`): the module keeps a `cache` collection (keys and values
`[B, S_max, K, D]` and the number of filled slots, `index`). A call writes its L tokens to
slots `index .. index + L - 1` and attends over the filled slots causally, so a prompt can
be prefilled in one call and tokens then appended one at a time. The cache is created with
the length of the input of the first call (`moejax.generate.init_cache`); packing is not
supported while decoding (every row is one sequence starting at slot 0).

Without a cache (training, evaluation, the first call that creates the cache) attention is
`moejax.models.attention_kernels.causal_attention` with `model.attention_impl`: the
materialised-scores XLA path or a blockwise (flash) kernel; with a cache it is the XLA path.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.attention_kernels import attention_mask, causal_attention
from moejax.models.config import ModelConfig
from moejax.nn.adapter_hook import AdapterContext, AdapterHook, add_delta, projection_delta
from moejax.nn.norm import RMSNorm
from moejax.nn.params import dtype_of, logical_param
from moejax.nn.projection import project
from moejax.nn.rotary import rotary_embedding

__all__ = ["Attention", "attention_mask", "cached"]  # attention_mask lives in attention_kernels


def cached(module: nn.Module, entries: dict[str, jax.Array], prefix: str = ""):
    """Appends `entries` (each `[B, L, ...]`) to the module's decoding cache (variables
    `<prefix><name>` and `<prefix>index`: a model that runs its layers twice per call, X-LoRA,
    keeps one cache per pass).

    Returns `(full, mask)`: the whole cache arrays `[B, S_max, ...]` after the write and the
    boolean mask `[1, 1, L, S_max]` (slot s is visible to the i-th new token iff
    s <= index + i). On the call that creates the cache (its shape taken from `entries`),
    nothing is written: `(entries, None)` and the caller uses its ordinary causal mask.
    """
    created = not module.has_variable("cache", prefix + "index")
    slots = {
        name: module.variable("cache", prefix + name, jnp.zeros, a.shape, a.dtype)
        for name, a in entries.items()
    }
    index = module.variable("cache", prefix + "index", lambda: jnp.zeros((), jnp.int32))
    if created:
        return entries, None
    start = index.value
    length = next(iter(entries.values())).shape[1]
    full = {}
    for name, a in entries.items():
        slots[name].value = jax.lax.dynamic_update_slice_in_dim(
            slots[name].value, a.astype(slots[name].value.dtype), start, axis=1
        )
        full[name] = slots[name].value
    index.value = start + length
    size = next(iter(full.values())).shape[1]
    query = start + jnp.arange(length)
    mask = jnp.arange(size)[None, :] <= query[:, None]
    return full, mask[None, None]


def _qk_norm(cfg: ModelConfig, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Queries `[B, L, H, D]` and keys `[B, L, K, D]` RMS-normalised per head (`head`) or over
    all their heads (`full`); must be called inside the attention's compact method."""
    norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if cfg.qk_norm == "head":
        return RMSNorm(**norm, name="q_norm")(q), RMSNorm(**norm, name="k_norm")(k)
    q_n = RMSNorm(**norm, name="q_norm")(q.reshape(q.shape[:2] + (-1,)))
    k_n = RMSNorm(**norm, name="k_norm")(k.reshape(k.shape[:2] + (-1,)))
    return q_n.reshape(q.shape), k_n.reshape(k.shape)


class Attention(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    adapters: AdapterHook | None = None  # low-rank deltas on the projections (moejax.nn)

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        adapter_context: AdapterContext | None = None,
    ) -> jax.Array:
        cfg = self.cfg
        d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        wq = logical_param(self, "wq", (d, h, hd), ("embed", "heads", "kv"), cfg.init_std, pdt)
        wk = logical_param(self, "wk", (d, kvh, hd), ("embed", "heads", "kv"), cfg.init_std, pdt)
        wv = logical_param(self, "wv", (d, kvh, hd), ("embed", "heads", "kv"), cfg.init_std, pdt)
        wo = logical_param(self, "wo", (h, hd, d), ("heads", "kv", "embed"), out_std, pdt)
        x = x_BxLxD.astype(dt)

        def delta(param, inputs, out_shape):
            return projection_delta(
                self,
                self.adapters,
                param,
                inputs,
                out_shape,
                adapter_context,
                cfg.dtype,
                cfg.param_dtype,
            )

        q = add_delta(
            project(x, wq.astype(dt)),
            delta("wq", x, (h, hd)),
        )
        k = add_delta(
            project(x, wk.astype(dt)),
            delta("wk", x, (kvh, hd)),
        )
        v = add_delta(
            project(x, wv.astype(dt)),
            delta("wv", x, (kvh, hd)),
        )
        if cfg.attention_bias:  # Qwen2: q/k/v biases, zero-initialised
            init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))
            q = q + self.param("bq", init, (h, hd), pdt).astype(dt)
            k = k + self.param("bk", init, (kvh, hd), pdt).astype(dt)
            v = v + self.param("bv", init, (kvh, hd), pdt).astype(dt)
        if cfg.qk_norm != "none":
            q, k = _qk_norm(cfg, q, k)
        q = rotary_embedding(q, positions_BxL, cfg.rope_theta)
        k = rotary_embedding(k, positions_BxL, cfg.rope_theta)
        mask = None
        if self.decode:
            prefix = "" if adapter_context is None else adapter_context.cache_prefix
            kv, mask = cached(self, {"k": k, "v": v}, prefix)
            k, v = kv["k"], kv["v"]
        if mask is None:  # no cache to read: causal within packed segments
            out = causal_attention(q, k, v, segment_ids_BxL, cfg.attention_impl)
        else:  # GQA: kv heads are repeated
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        y = project(out, wo.astype(dt), contract=2)
        flat = out.reshape(out.shape[:2] + (h * hd,))
        return add_delta(y, delta("wo", flat, (d,)))
