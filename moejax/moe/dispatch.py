"""Dispatchers: `(x[T, d], Routing, expert_fn) -> (y[T, d], metrics)`, chosen by name.

y_t = sum_j combine_weights[t, j] * Expert_{expert_ids[t, j]}(x_t). Every plan computes this
same y (up to float error and, for `capacity_einsum` only, dropped assignments):

- `dense_reference`: every expert on every token (`[E, T, d]`), masked by the gate; E/k times
  the FLOPs. The ground truth the tests compare against.
- `capacity_einsum`: GShard (Lepikhin et al., 2020) fixed-capacity buffers `[E, C, d]`,
  C = ceil(capacity_factor * T * k / E), one batched einsum per projection. Assignments are
  admitted in choice-major order (every token's first choice before any second choice) and
  the ones past capacity are dropped and counted (`dropped_fraction`). Tokens are moved into
  the buffers by index gathers rather than GShard's one-hot [T, E, C] einsums, which would
  need T*E*C memory.
- `ragged`: dropless. Sort the T*k assignments by expert, grouped matmul over the sorted rows
  (`moejax.moe.grouped_matmul`), unsort, combine (MegaBlocks, Gale et al., 2022). Slots of
  zero weight are sorted past the last group and cost no FLOPs.
- `hybrid`: dropless, for XLA:CPU (`moejax.moe.hybrid`): each expert's first
  C = ceil(hybrid_capacity_factor * T * k / E) assignments as capacity buffers (batched
  matmuls, which XLA:CPU runs on every core), the overflow past C through a tile loop that
  runs the whole expert function per tile and costs what the overflow costs.
- `pallas`: the `ragged` plan on the kernels of `pallas_kernels/`: a fused permute (gather in
  expert order with the top-k duplication), the Pallas grouped matmul `pallas_kernels.gmm`,
  and a fused unpermute + combine (gather-reduce with the combine weights), each with its own
  VJP. Backend from `cfg.kernel_backend` (Mosaic TPU, Pallas GPU, or jax-triton for the
  combine); on CPU the kernels run in Pallas interpret mode (slow: for testing).
- `auto`: the fastest dropless plan for the platform (`AUTO_PLAN`).
- `expert_parallel`: experts split over the `expert` mesh axis, tokens exchanged with
  all_to_all to the devices owning their experts, a local grouped matmul, and the return
  exchange, inside `jax.shard_map` over the context mesh (`moejax.moe.expert_parallel`).
  Dropless unless `moe.ep_capacity_factor` > 0 bounds the exchange buffers.
- `fssdp`: the same plan with `moe.fssdp_slots` replica slots per device (Hecate's Fully
  Sharded Sparse Data Parallelism, arXiv 2502.02581): each step the hot experts are
  replicated onto the least-loaded devices by a sparse all-gather, their tokens split among
  the holders, and the replicas' gradients summed back to the owners by its transpose.
  `expert_parallel` is `fssdp` with no slots.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_kernels
from moejax.config_section import ConfigError
from moejax.moe.config import MoEConfig
from moejax.moe.expert_parallel import sharded_dispatch, token_split
from moejax.moe.experts import ExpertFn
from moejax.moe.grouped_matmul import gmm
from moejax.moe.hybrid import head_capacity, hybrid_plan
from moejax.moe.permute import permute, sort_by_expert, unpermute
from moejax.moe.quantized_gmm import IMPLS as QUANTIZED_IMPLS
from moejax.moe.quantized_gmm import is_qarray, quantized_gmm
from moejax.moe.routing import Routing

Metrics = dict[str, jax.Array]

# platform -> (dispatcher, grouped-matmul impl). CPU measured (experiments/benchmarks/
# moe_layer.py, 2 cores, default shape, fwd+bwd against the dense SwiGLU of the same active
# width): `hybrid` 1.26x, `ragged` with the tile loop 2.3x (XLA:CPU runs a matmul inside a
# loop on one core), `capacity_einsum` 1.42x (and it drops); ragged_dot is 56-90x slower
# than the tile loop. The impl is what `ragged` would use (the hybrid overflow loops
# itself). TPU (XLA:TPU compile, cost analysis; tests/tpu/test_tpu_compile.py): the
# Mosaic TPU grouped matmul (impl "pallas", as MaxText's megablox) costs 1.0x the dense FLOPs
# of the same rows, ragged_dot 22x (lowered to a padded dense dot per group, fwd+bwd, 64
# groups). GPU (H200, bf16, experiments/gpu/results/h200_2026-12-04): the Mosaic GPU grouped
# matmul ("pallas") is the only fast one (XLA rewrites ragged_dot to a padded dense batched
# dot, 63x a dense matmul at the DeepSeek-like gmm shape, the tile loop 17x); around it the
# permutation and combine as XLA gather fusions took 0.063 ms of device time a layer fwd+bwd
# where the `pallas` dispatcher's row kernels (Pallas's deprecated Triton lowering) took 0.094
# ms (`moe_layer.py --profile`), so `ragged` on the Pallas grouped matmul is the GPU plan, and
# the plans that take a gmm_impl (expert_parallel, fssdp) use that kernel there too.
AUTO_PLAN = {
    "cpu": ("hybrid", "tile_loop"),
    "gpu": ("ragged", "pallas"),
    "tpu": ("ragged", "pallas"),
}


def _combine(y_TxKxD: jax.Array, weights_TxK: jax.Array) -> jax.Array:
    return jnp.einsum("tkd,tk->td", y_TxKxD, weights_TxK.astype(y_TxKxD.dtype))


def _combine_choice_major(y_KxTxD: jax.Array, weights_TxK: jax.Array) -> jax.Array:
    return jnp.einsum("ktd,tk->td", y_KxTxD, weights_TxK.astype(y_KxTxD.dtype))


def dense_reference(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig
) -> tuple[jax.Array, Metrics]:
    t = x.shape[0]
    gates = jnp.zeros((t, cfg.num_experts), routing.combine_weights.dtype)
    gates = gates.at[jnp.arange(t)[:, None], routing.expert_ids].add(routing.combine_weights)
    x_all = jnp.broadcast_to(x[None], (cfg.num_experts,) + x.shape)
    y_all = expert_fn(x_all, lambda lhs, w: jnp.einsum("etk,ekn->etn", lhs, w))
    return jnp.einsum("etd,te->td", y_all, gates.astype(y_all.dtype)), {}


def capacity(num_tokens: int, cfg: MoEConfig, slots: int | None = None) -> int:
    """C = ceil(capacity_factor * T * k / E); k = the routing's slots (default `top_k`)."""
    k = cfg.top_k if slots is None else slots
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * k / cfg.num_experts))


def capacity_einsum(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig
) -> tuple[jax.Array, Metrics]:
    t, d = x.shape
    e, k = cfg.num_experts, routing.expert_ids.shape[1]
    c = capacity(t, cfg, k)
    ids = routing.expert_ids.T.reshape(-1)  # [k*T], choice-major priority
    # Only real assignments compete for capacity: zero-weight slots (padding tokens, top-p
    # padding) are never admitted and never counted as drops.
    real = (routing.combine_weights > 0).T.reshape(-1)
    onehot = jax.nn.one_hot(ids, e, dtype=jnp.int32) * real[:, None]
    position = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), ids[:, None], axis=1)[:, 0] - 1
    keep = real & (position < c)
    slot = jnp.where(keep, ids * c + position, e * c)  # not admitted -> a dummy slot
    # Which assignment fills each buffer slot (k*T = empty, reads a zero row).
    source = jnp.full((e * c + 1,), k * t, jnp.int32).at[slot].set(jnp.arange(k * t))[:-1]
    token_of = jnp.concatenate([jnp.tile(jnp.arange(t), k), jnp.array([t])])
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    buf = x_pad[token_of[source]].reshape(e, c, d)
    out = expert_fn(buf, lambda lhs, w: jnp.einsum("eck,ekn->ecn", lhs, w))
    out = jnp.concatenate([out.reshape(e * c, -1), jnp.zeros((1, out.shape[-1]), out.dtype)])
    y = out[slot].reshape(k, t, -1).transpose(1, 0, 2)
    weights = routing.combine_weights * keep.reshape(k, t).T
    dropped = jnp.sum(real & ~keep) / jnp.maximum(jnp.sum(real), 1)
    return _combine(y, weights), {"dropped_fraction": dropped.astype(jnp.float32)}


def _per_token_shard(plan, x: jax.Array, routing: Routing, weights) -> jax.Array:
    """`plan(x, expert_ids, combine_weights, weights) -> y` on the whole arrays, or, when the
    context mesh splits the tokens, on each device's tokens inside `jax.shard_map` with every
    expert's weights gathered onto each device (as FSDP gathers weights). Plans that call a
    Pallas kernel run this way: GSPMD cannot partition a kernel."""
    args = (x, routing.expert_ids, routing.combine_weights, weights)
    split = token_split(x.shape[0])
    if split is None:
        return plan(*args)
    mesh, tokens = split
    return jax.shard_map(
        plan,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, P()),
        out_specs=tokens,
        check_vma=pallas_kernels.backend.shard_map_checks_vma(),
    )(*args)


def _gmm(lhs, w, sizes, *, impl, tile):
    """`gmm`, or `quantized_gmm` for integer expert weights (a `qwix.QArray`)."""
    if is_qarray(w):
        return quantized_gmm(lhs, w, sizes, impl=impl, tile=tile)
    return gmm(lhs, w, sizes, impl=impl, tile=tile)


def _ragged_plan(x, expert_ids, combine_weights, weights, *, fn, num_experts, impl, tile):
    t, k = expert_ids.shape
    # Unused slots (zero weight) go past the last group: no FLOPs for padding tokens or the
    # empty slots of top-p routing.
    order, inverse, sizes = sort_by_expert(expert_ids.T, num_experts, combine_weights.T > 0)
    x_sorted = permute(x, order, inverse, k)
    out = fn(weights, x_sorted, lambda lhs, w: _gmm(lhs, w, sizes, impl=impl, tile=tile))
    y = unpermute(out, order, inverse).reshape(k, t, -1)
    return _combine_choice_major(y, combine_weights)


def ragged(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig, gmm_impl: str | None = None
) -> tuple[jax.Array, Metrics]:
    impl = gmm_impl or resolve_gmm_impl(cfg.gmm_impl)
    plan = functools.partial(
        _ragged_plan, fn=expert_fn.fn, num_experts=cfg.num_experts, impl=impl, tile=cfg.gmm_tile
    )
    if impl == "pallas":  # a kernel: per token shard
        return _per_token_shard(plan, x, routing, expert_fn.weights), {}
    return plan(x, routing.expert_ids, routing.combine_weights, expert_fn.weights), {}


def hybrid(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig, gmm_impl: str | None = None
) -> tuple[jax.Array, Metrics]:
    del gmm_impl  # the overflow runs its own tile loop (the plan exists for XLA:CPU)
    cap = head_capacity(routing.expert_ids.size, cfg.num_experts, cfg.hybrid_capacity_factor)
    if cap == 0:  # no buffers: every assignment through the tile loop
        return ragged(x, routing, expert_fn, cfg, gmm_impl="tile_loop")
    y = hybrid_plan(
        x,
        routing.expert_ids,
        routing.combine_weights,
        expert_fn,
        num_experts=cfg.num_experts,
        cap=cap,
        tile=cfg.hybrid_tile,
    )
    return y, {}


def _pallas_plan(x, expert_ids, combine_weights, weights, *, fn, num_experts: int, backend):
    k = expert_ids.shape[1]
    kw = {"backend": backend, "interpret": None}  # interpret on CPU only
    order, inverse, sizes = sort_by_expert(expert_ids, num_experts, combine_weights > 0)
    x_sorted = pallas_kernels.permute(x, order, inverse, k, **kw)
    out = fn(weights, x_sorted, lambda lhs, w: pallas_kernels.gmm(lhs, w, sizes, **kw))
    return pallas_kernels.unpermute_combine(out, order, inverse, combine_weights, **kw)


def pallas(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig, gmm_impl: str | None = None
) -> tuple[jax.Array, Metrics]:
    """The `ragged` plan on the Pallas kernels, per token shard on a mesh
    (`_per_token_shard`); `expert_parallel` is the plan that splits the experts instead."""
    del gmm_impl  # the grouped matmul is pallas_kernels.gmm; tiles come from its table
    plan = functools.partial(
        _pallas_plan, fn=expert_fn.fn, num_experts=cfg.num_experts, backend=cfg.kernel_backend
    )
    return _per_token_shard(plan, x, routing, expert_fn.weights), {}


def _platform_plan() -> tuple[str, str]:
    # The platform compiled for (the context mesh's devices), not the host's.
    return AUTO_PLAN.get(pallas_kernels.backend.platform(), AUTO_PLAN["cpu"])


def resolve_gmm_impl(name: str) -> str:
    return _platform_plan()[1] if name == "auto" else name


def expert_parallel(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig, gmm_impl: str | None = None
) -> tuple[jax.Array, Metrics]:
    return sharded_dispatch(
        x, routing, expert_fn, cfg, 0, gmm_impl or resolve_gmm_impl(cfg.gmm_impl)
    )


def fssdp(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig, gmm_impl: str | None = None
) -> tuple[jax.Array, Metrics]:
    return sharded_dispatch(
        x, routing, expert_fn, cfg, cfg.fssdp_slots, gmm_impl or resolve_gmm_impl(cfg.gmm_impl)
    )


def auto(x, routing, expert_fn, cfg):
    plan, impl = _platform_plan()
    return DISPATCHERS[plan](x, routing, expert_fn, cfg, gmm_impl=impl)


DISPATCHERS: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "dense_reference": dense_reference,
    "capacity_einsum": capacity_einsum,
    "ragged": ragged,
    "hybrid": hybrid,
    "pallas": pallas,
    "auto": auto,
    "expert_parallel": expert_parallel,
    "fssdp": fssdp,
}


def quantized_weights(weights) -> bool:
    leaves = jax.tree.leaves(weights, is_leaf=is_qarray)
    return any(is_qarray(a) for a in leaves)


def check_quantized_plan(cfg: MoEConfig) -> None:
    if cfg.dispatcher != "ragged":
        raise ConfigError(
            f"moe.dispatcher={cfg.dispatcher!r} cannot run quantized expert weights; set "
            f"moe.dispatcher=ragged (its grouped matmul dequantizes per tile)."
        )
    impl = resolve_gmm_impl(cfg.gmm_impl)
    if impl not in QUANTIZED_IMPLS:
        raise ConfigError(
            f"moe.gmm_impl={cfg.gmm_impl!r} ({impl}) cannot run quantized expert weights; set "
            f"moe.gmm_impl=tile_loop or ragged_dot."
        )


def dispatch(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig
) -> tuple[jax.Array, Metrics]:
    """Runs the dispatcher named by `cfg.dispatcher`; every plan reports `dropped_fraction`.
    Integer expert weights (`qwix.QArray` leaves, `moejax.moe.quantized_gmm`) run only
    through `ragged` on the `tile_loop` or `ragged_dot` grouped matmul."""
    if quantized_weights(expert_fn.weights):
        check_quantized_plan(cfg)
    y, metrics = DISPATCHERS[cfg.dispatcher](x, routing, expert_fn, cfg)
    metrics.setdefault("dropped_fraction", jnp.zeros((), jnp.float32))
    return y, metrics
