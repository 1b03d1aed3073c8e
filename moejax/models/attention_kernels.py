"""Causal self-attention over packed segments without the materialised score matrix.

`causal_attention(q, k, v, segment_ids, impl)` is the training / prefill attention of both
GQA (`moejax.models.attention`) and MLA (`moejax.models.mla`): query i attends to keys
j <= i of its own packed segment (`segment_ids` equal), with softmax scale 1/sqrt(d_qk).
`q` is `[B, L, H, Dqk]`, `k` `[B, L, K, Dqk]` and `v` `[B, L, K, Dv]` with K dividing H
(grouped-query heads) and Dv free to differ from Dqk (MLA); the result is `[B, L, H, Dv]`.

`model.attention_impl` chooses the implementation (`resolve_impl`):

- ``"xla"``: `jax.nn.dot_product_attention` with the boolean `[B, 1, L, L]` mask
  (`attention_mask`); XLA materialises the `[B, H, L, L]` scores (and probabilities) and
  keeps them for the backward pass. This is what the model always did, and what "auto"
  resolves to on CPU.
- ``"flash"``: online-softmax attention in blocks (FlashAttention, Dao et al. 2022,
  arXiv:2205.14135; the backward recomputes the probabilities from the saved row
  log-sum-exp, FlashAttention-2, Dao 2023), so memory is linear in L:
    - on TPU the Pallas splash attention kernel (`jax.experimental.pallas.ops.tpu.
      splash_attention`, "SPLASH: sparse flash attention"), with a causal mask, the segment
      ids, and grouped heads natively (its MHA form maps query head h to key head
      h // (H / K)). Head dims are padded with zeros to multiples of 128 (zero q/k columns add
      nothing to the scores; zero v columns are sliced off the output), the length to a
      multiple of 128 (padded keys lie after every real query, so causality hides them).
      GSPMD cannot partition a Mosaic kernel, so under a mesh it runs inside `jax.shard_map`
      over the mesh axes that split the batch (and the `heads` logical axis when that is
      sharded and divides both head counts);
    - on NVIDIA GPUs cuDNN's fused attention (`jax.nn.dot_product_attention(...,
      implementation="cudnn")`, causal, the segment mask passed as `mask`) for 16-bit
      operands and head dims it accepts, else the `"xla"` path;
    - on CPU `blockwise_attention`, the same algorithm in plain JAX (a `lax.scan` over key
      blocks, a custom VJP that rescans them); equal to `"xla"` to float tolerance.
- ``"auto"``: ``"flash"`` on TPU and GPU, ``"xla"`` on CPU.

The platform is the one the step is compiled for (`pallas_kernels.backend.platform()`: the
context mesh's devices), so an ahead-of-time compile for a TPU topology from a CPU host gets
the splash kernel. Decoding with a key/value cache keeps the `"xla"` path in the modules.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_kernels.backend
from moejax.moe.expert_parallel import token_split

ATTENTION_IMPLS = ("auto", "xla", "flash")  # model.attention_impl
KERNELS = ("xla", "splash", "cudnn", "blockwise")  # what those resolve to
LANES = 128  # TPU vector lanes: splash tiles head dims and lengths in 128s
BLOCK = 512  # the splash / blockwise tile along the sequence (or the length, if shorter)


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """Boolean [B, 1, L, L]: causal and within the same packed segment."""
    length = segment_ids_BxL.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (causal[None] & same)[:, None]


def resolve_impl(impl: str) -> str:
    """`model.attention_impl` (or a kernel name, as tests pass) -> one of `KERNELS`, for the
    platform compiled for."""
    if impl in KERNELS:
        return impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; choose one of {ATTENTION_IMPLS}")
    if impl == "xla":
        return "xla"
    plat = pallas_kernels.backend.platform()
    if plat == "tpu":
        return "splash"
    if plat in ("gpu", "cuda"):
        return "cudnn"
    return "xla" if impl == "auto" else "blockwise"


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str = "xla"
) -> jax.Array:
    """Causal attention within packed segments; see the module docstring for shapes."""
    kernel = resolve_impl(impl)
    if kernel == "splash":
        return splash_attention(q, k, v, segment_ids)
    if kernel == "cudnn":
        out = _cudnn_attention(q, k, v, segment_ids)
        if out is not None:
            return out
        kernel = "xla"
    if kernel == "blockwise":
        return blockwise_attention(q, k, v, segment_ids)
    return _xla_attention(q, k, v, segment_ids)


def _xla_attention(q, k, v, segment_ids):
    mask = attention_mask(segment_ids)
    if v.shape[-1] == q.shape[-1]:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)  # GQA: kv heads repeated
    scale = q.shape[-1] ** -0.5  # MLA: the value dim differs from the query/key dim
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(q.dtype)
    return jnp.einsum("bhls,bshd->blhd", probs, v)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


# --- TPU: splash attention ---------------------------------------------------------------


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    interpret: bool | None = None,
) -> jax.Array:
    """The splash kernel, per shard of the context mesh (batch, and heads where sharded).
    `interpret=None`: Pallas interpret mode exactly on CPU (how the tests run it)."""
    interpret = pallas_kernels.backend.resolve_interpret(interpret)
    body = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return body(q, k, v, segment_ids)
    split = token_split(q.shape[0])
    batch = split[1][0] if split is not None else None
    heads = _head_axes(mesh, q.shape[2], k.shape[2])
    qkv = P(batch, None, heads, None)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, P(batch, None)),
        out_specs=qkv,
        check_vma=False,  # the kernel's out_shape carries no varying-axes annotation
    )(q, k, v, segment_ids)


def _head_axes(mesh, num_heads: int, num_kv_heads: int):
    """The mesh axes of the `heads` logical axis (the context's flax rules) when they split
    the mesh and divide both head counts, else None (heads whole on every device)."""
    rule = nn.logical_to_mesh_axes(("heads",))[0]
    if rule is None:
        return None
    names = (rule,) if isinstance(rule, str) else tuple(rule)
    names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in names)
    if not names or num_heads % size or num_kv_heads % size:
        return None
    return names


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, length, h, dqk = q.shape
    dv = v.shape[-1]
    scale = dqk**-0.5  # of the true head dim: the zero padding below adds nothing
    padded = _round_up(length, LANES)
    block = next(s for s in (BLOCK, 256, LANES) if padded % s == 0)
    dqk_p, dv_p = _round_up(dqk, LANES), _round_up(dv, LANES)

    def layout(x, d):  # [B, L, N, D] -> [B, N, Lp, Dp]
        return _pad_axis(_pad_axis(x, 1, padded), 3, d).transpose(0, 2, 1, 3)

    q = layout((q.astype(jnp.float32) * scale).astype(q.dtype), dqk_p)
    k, v = layout(k, dqk_p), layout(v, dv_p)
    seg = _pad_axis(segment_ids.astype(jnp.int32), 1, padded, mode="edge")
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * h)
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    out = jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(seg, seg))
    return out.transpose(0, 2, 1, 3)[:, :length, :, :dv]


# --- NVIDIA GPU: cuDNN fused attention ------------------------------------------------------


def _cudnn_attention(q, k, v, segment_ids):
    """cuDNN flash attention, or None where its constraints rule it out (the caller then
    takes the "xla" path): 16-bit operands, head dims that are multiples of 8 up to 128 (256
    on Hopper), lengths in multiples of 128. The public API takes value heads as wide as the
    keys: MLA's narrower values are zero-padded and sliced off. Packed segments go in as the
    boolean mask (cuDNN adds it as a `[B, 1, L, L]` bias; causality is its own)."""
    dqk, dv = q.shape[-1], v.shape[-1]
    cap = pallas_kernels.backend.compute_capability()
    limit = 256 if cap and int(cap.split(".")[0]) >= 9 else 128
    fits = (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and dqk % 8 == 0
        and dv <= dqk <= limit
        and q.shape[1] % LANES == 0
    )
    if not fits:
        return None
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    try:
        out = jax.nn.dot_product_attention(
            q,
            k,
            _pad_axis(v, 3, dqk),
            mask=same[:, None],
            is_causal=True,
            implementation="cudnn",
        )
    except (NotImplementedError, ValueError, RuntimeError):  # cuDNN version / shape refused
        return None
    return out[..., :dv]


# --- CPU: blockwise attention in plain JAX ----------------------------------------------------


def blockwise_attention(q, k, v, segment_ids, block: int = BLOCK):
    """FlashAttention's algorithm in plain JAX: a `lax.scan` over key blocks with the online
    softmax (running max and denominator per query), float32 accumulation, and a custom VJP
    that recomputes each block's probabilities from the saved log-sum-exp. Memory: the
    `[B, H, L, block]` scores of one block, not `[B, H, L, L]`."""
    b, length, h, dqk = q.shape
    kvh = k.shape[2]
    block = min(block, length)
    padded = _round_up(length, block)

    def heads_major(x):  # [B, L, N, D] -> [B, N, Lp, D]
        return _pad_axis(x, 1, padded).transpose(0, 2, 1, 3)

    q = heads_major(q).reshape(b, kvh, h // kvh, padded, dqk)  # query groups per kv head
    seg = _pad_axis(segment_ids.astype(jnp.int32), 1, padded, mode="edge")
    out = _blockwise(q, heads_major(k), heads_major(v), seg, block)
    out = out.reshape(b, h, padded, -1).transpose(0, 2, 1, 3)
    return out[:, :length]


def _block_scores(q, k_blk, seg, j, block):
    """Scaled scores of all queries against key block j, and the visibility mask."""
    s = jnp.einsum("bkgld,bksd->bkgls", q, k_blk, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5
    kpos = j * block + jnp.arange(block)
    seg_k = jax.lax.dynamic_slice_in_dim(seg, j * block, block, axis=1)
    visible = (jnp.arange(q.shape[3])[:, None] >= kpos[None, :]) & (
        seg[:, :, None] == seg_k[:, None, :]
    )
    return s, visible[:, None, None]


def _blocks(x, block):  # [B, K, Lp, D] -> [Lp/block, B, K, block, D]
    b, kvh, length, d = x.shape
    return x.reshape(b, kvh, length // block, block, d).transpose(2, 0, 1, 3, 4)


def _unblocks(x):  # inverse of _blocks
    n, b, kvh, block, d = x.shape
    return x.transpose(1, 2, 0, 3, 4).reshape(b, kvh, n * block, d)


def _blockwise_fwd_impl(q, k, v, seg, block):
    b, kvh, g, length, _ = q.shape
    dv = v.shape[-1]

    def step(carry, xs):
        acc, m, den = carry
        j, k_blk, v_blk = xs
        s, visible = _block_scores(q, k_blk, seg, j, block)
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        den = den * alpha + p.sum(-1)
        pv = jnp.einsum("bkgls,bksd->bkgld", p, v_blk.astype(jnp.float32))
        return (acc * alpha[..., None] + pv, m_new, den), None

    # Finite start (not -inf): a row with nothing visible yet keeps exp(m - m_new) = 1.
    init = (
        jnp.zeros((b, kvh, g, length, dv), jnp.float32),
        jnp.full((b, kvh, g, length), -1e30, jnp.float32),
        jnp.zeros((b, kvh, g, length), jnp.float32),
    )
    n = length // block
    (acc, m, den), _ = jax.lax.scan(
        step, init, (jnp.arange(n), _blocks(k, block), _blocks(v, block))
    )
    out = acc / den[..., None]  # every row sees at least itself: den > 0
    return out.astype(q.dtype), m + jnp.log(den)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q, k, v, seg, block):
    return _blockwise_fwd_impl(q, k, v, seg, block)[0]


def _blockwise_fwd(q, k, v, seg, block):
    out, lse = _blockwise_fwd_impl(q, k, v, seg, block)
    return out, (q, k, v, seg, out, lse)


def _blockwise_bwd(block, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # rowsum(dO * O)

    def step(dq, xs):
        j, k_blk, v_blk = xs
        s, visible = _block_scores(q, k_blk, seg, j, block)
        p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgls,bkgld->bksd", p, d_out)
        dp = jnp.einsum("bkgld,bksd->bkgls", d_out, v_blk.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgls,bksd->bkgld", ds, k_blk.astype(jnp.float32))
        dk = jnp.einsum("bkgls,bkgld->bksd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    n = k.shape[2] // block
    dq, (dk, dv) = jax.lax.scan(
        step,
        jnp.zeros(q.shape, jnp.float32),
        (jnp.arange(n), _blocks(k, block), _blocks(v, block)),
    )
    return dq.astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
