"""Grouped matmul on integer expert weights: `[M, K] x QArray[G, K, N] -> [M, N]`, weight-only
quantization at inference (the serving side of QuantMoE-Bench's expert PTQ, Li et al. 2024,
"Examining Post-Training Quantization for Mixture-of-Experts").

The weights are a `qwix.QArray` (`quantize_experts`: `qvalue [G, K, N]` int2..int8 and
symmetric `scale [G, K / group, N]`, one scale per output channel or per `group` input
rows). Two implementations, as `moejax.moe.grouped_matmul.gmm`'s:

- ``"tile_loop"``: the row-tile loop of `gmm`; each tile reads only its group's integers and
  scales and dequantizes them inside the loop body (`qvalue[g] * scale[g]` broadcast over
  the K groups, in the activations' float type) before its `[tile, K] @ [K, N]` matmul,
  so the float weights of all G experts never exist at once;
- ``"ragged_dot"``: `qwix.ragged_dot`, qwix's quantized `lax.ragged_dot` (native on TPU; XLA
  elsewhere).

Forward only (post-training inference): the integers have no gradient. `ExpertFn`s whose
weights are QArrays run through the `ragged` dispatcher (`moejax.moe.dispatch`), whose
grouped matmul calls this for a QArray right-hand side.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from moejax.moe.grouped_matmul import make_tile_plan, tile_window

if TYPE_CHECKING:
    import qwix

IMPLS = ("tile_loop", "ragged_dot")


def is_qarray(a) -> bool:
    """Whether `a` is a `qwix.QArray` (qwix, about a second to import, is loaded only by the
    code that quantizes: without it loaded nothing can be one)."""
    qwix = sys.modules.get("qwix")
    return qwix is not None and isinstance(a, qwix.QArray)


_QTYPES = {4: jnp.int4, 8: jnp.int8}


def quantize_experts(w: jax.Array, bits: int, group: int = 0) -> qwix.QArray:
    """Expert weights `[G, K, N]` as a QArray of `bits`-bit integers (symmetric absmax), one
    scale per (expert, output channel), or per `group` rows of K as well."""
    if w.ndim != 3:
        raise ValueError(f"expert weights must be [G, K, N]; got {w.shape}.")
    tiled = {1: group} if group and group < w.shape[1] else None
    if tiled and w.shape[1] % group:
        raise ValueError(f"group={group} does not divide K={w.shape[1]}.")
    qtype = _QTYPES.get(bits, f"int{bits}")
    import qwix

    return qwix.quantize(jnp.asarray(w), qtype, channelwise_axes=(0, 2), tiled_axes=tiled)


def dequantize_tile(qvalue: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """One expert's `[K, N]` float weights from its integers and `[K / group, N]` scales."""
    k, n = qvalue.shape
    groups = scale.shape[0]
    w = qvalue.astype(dtype).reshape(groups, k // groups, n) * scale.astype(dtype)[:, None, :]
    return w.reshape(k, n)


def _loop(lhs, qvalue, scale, group_sizes, tile):
    m = lhs.shape[0]
    tile = min(tile, m)
    plan = make_tile_plan(group_sizes, m, tile)
    dtype = lhs.dtype

    def body(t, out):
        lo, mask = tile_window(plan, t, m, tile)
        x = jax.lax.dynamic_slice_in_dim(lhs, lo, tile, axis=0)
        g = plan.group[t]
        q = jax.lax.dynamic_index_in_dim(qvalue, g, axis=0, keepdims=False)
        s = jax.lax.dynamic_index_in_dim(scale, g, axis=0, keepdims=False)
        y = jnp.dot(x, dequantize_tile(q, s, dtype), preferred_element_type=out.dtype)
        old = jax.lax.dynamic_slice_in_dim(out, lo, tile, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(
            out, jnp.where(mask[:, None], y, old), lo, axis=0
        )

    acc = jnp.promote_types(dtype, jnp.float32)
    out = jnp.zeros((m, qvalue.shape[2]), acc)
    return jax.lax.fori_loop(0, plan.count, body, out).astype(lhs.dtype)


def quantized_gmm(
    lhs: jax.Array,
    rhs: qwix.QArray,
    group_sizes: jax.Array,
    *,
    impl: str = "tile_loop",
    tile: int = 256,
) -> jax.Array:
    """`gmm` with a QArray `rhs [G, K, N]` (symmetric; module docstring)."""
    if rhs.zero_point is not None:
        raise ValueError("quantized_gmm takes symmetric QArrays (zero_point None).")
    q, s = rhs.qvalue, rhs.scale
    if lhs.ndim != 2 or q.ndim != 3 or lhs.shape[1] != q.shape[1]:
        raise ValueError(
            f"quantized_gmm expects lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {q.shape}"
        )
    if s.shape[0] != q.shape[0] or s.shape[2] != q.shape[2]:
        raise ValueError(f"scale {s.shape} is not per (expert, output channel) of {q.shape}.")
    group_sizes = group_sizes.astype(jnp.int32)
    if lhs.shape[0] == 0:
        return jnp.zeros((0, q.shape[2]), lhs.dtype)
    if impl == "tile_loop":
        return _loop(lhs, q, s, group_sizes, tile)
    if impl == "ragged_dot":
        import qwix

        return qwix.ragged_dot(lhs, rhs, group_sizes).astype(lhs.dtype)
    raise ValueError(
        f"quantized expert weights run on moe.gmm_impl tile_loop or ragged_dot, not {impl!r}; "
        f"set moe.gmm_impl=tile_loop."
    )
