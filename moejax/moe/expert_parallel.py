"""Expert-parallel and FSSDP dispatch: one `shard_map` plan, EP being FSSDP with no replicas.

Expert parallelism (GShard, Lepikhin et al., 2020): the E experts are split over the P
devices of the `expert` mesh axis (device p owns experts [p E/P, (p+1) E/P)); tokens are
split over the batch axes (data, fsdp, expert). On each device, inside `jax.shard_map`:

1. loads: every device counts its assignments per expert; an all_gather over `expert` gives
   the group's counts [P, E] (the same on every device of the group);
2. placement (FSSDP only, `moejax.moe.placement`): S = `moe.fssdp_slots` replica slots per
   device, filled greedily from this step's loads (not a sliding-window prediction: the
   current loads are exact and cost one [P, E] all_gather); the holders of each expert split
   its assignments by global rank, so holders get equal shares;
3. SparseAllGather (FSSDP only), by `moe.ep_exchange` like the tokens:
   - "ragged" (GPU/TPU; Hecate's spAG): one `jax.lax.ragged_all_to_all` moves only the
     filled slots. Each owner packs the experts it sends into a send buffer of R rows
     (R = `moe.fssdp_max_sends`, which the placement respects), ordered by (receiver,
     slot); receiver r's slots are sorted by expert, so owner o's share of them is one
     contiguous chunk, written at its first slot. Compiled bounds per device and weight:
     S rows received (the output), R rows in the send buffer; no term in P. Under
     `jax.grad` JAX's transpose is the SparseReduceScatter: a ragged_all_to_all of the
     slots' gradients back into each owner's R-row buffer (distinct rows per (receiver,
     slot), so nothing overwrites), then the gather's transpose sums them into the owner's
     experts;
   - "padded" (CPU, which has no ragged lowering): an all_to_all of slot buffers [P, S,
     ...]: device o fills entry (p, s) with its expert in p's slot s, zeros otherwise, and
     the receiver sums over sources. Each device sends and receives P*S expert weight
     sets, S of them non-zero; the transpose all_to_alls the replicas' gradients back.
   A schedule of `collective_permute`s is not used: the placement is decided inside the
   step, so a static schedule must reserve S slots on every (owner, receiver) pair of every
   round, (P-1) S sets per device, the padded volume again;
4. token exchange: each device packs its assignments into per-destination buffers of B rows
   [P, B, d] (sorted by destination, then by the destination's local group) and all_to_alls
   them with their group ids. B = T_local * k by default, the bound that never overflows
   (dropless); `moe.ep_capacity_factor` = c > 0 sets B = ceil(c T_local k / P) and drops, and
   counts (`dropped_fraction`), what overflows a buffer (last groups of a destination first).
   `moe.ep_exchange`: "padded" moves the whole [P, B] buffers with `all_to_all`; "ragged"
   moves only each buffer's filled rows with `jax.lax.ragged_all_to_all` into the same
   [P, B] layout on the receiver (same memory, less traffic); "auto" is ragged on GPU/TPU
   and padded on CPU, whose XLA has no lowering for it ("HLO opcode 'ragged-all-to-all' is
   not supported"). The ragged path is checked on CPU only against an emulation of the
   documented `ragged_all_to_all` semantics (tests/moe/test_expert_parallel.py);
5. local compute: the received rows are sorted by group (E/P owned experts, then the S
   slots) and run through the grouped matmul (`moejax.moe.grouped_matmul.gmm`) on
   [own experts; replicas]; padding rows cost no FLOPs (the tile loop stops at the last group);
6. return exchange: the reverse all_to_all; each source gathers its rows and combines them
   with the routing weights.

Metrics (over every device of the mesh): `device_tokens_max`, `device_tokens_mean` and
`device_tokens_max_over_mean` of the rows each device computes after the exchange (what
shows the straggler of EP under skew and FSSDP's balance), `dropped_fraction`, and for
FSSDP `replica_slots_used` (fraction of the slots filled).

`moe.fssdp_remat`: the gather and the local expert compute run under `jax.checkpoint`, so
the gathered replicas are not kept for the backward pass; backward gathers them again.

Hecate's heterogeneous sharding (which experts a device owns, re-chosen from the loads every
`moe.fssdp_reshard_every` steps) needs nothing here: the experts are stored in physical rows
and the MoE layer hands this plan row ids and `num_experts` = the R rows
(`moejax.moe.expert_layout`), so "device p owns rows [p R/P, (p + 1) R/P)" owns whichever
experts the trainer's re-layout put there, empty rows being experts with no tokens
(`moejax.train.expert_relayout`). The placement takes any owner layout
(`greedy_placement(..., owner=)`) for `experiments/fssdp_sim.py`, which also models devices
owning unequal counts.

Expert weights enter the shard_map split only along `expert` (`P("expert")`): shards of their
other dimensions (`embed` over fsdp, `mlp` over tensor) are all-gathered at the boundary, FSDP
style, and their gradients reduce-scattered back; tensor parallelism inside an expert is not
combined with this plan.

Mesh: read from the context (`jax.sharding.get_abstract_mesh()`, set by `jax.set_mesh`;
the trainer sets it around its compiled steps). With no mesh, no `expert` axis, or a token
count the token axes do not divide (e.g. a model's init on a dummy batch), the same plan runs
locally with P = 1 and no collectives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.config import MoEConfig
from moejax.moe.experts import ExpertFn
from moejax.moe.grouped_matmul import gmm
from moejax.moe.one_hot import count_ids
from moejax.moe.permute import permute, sort_by_expert, unpermute
from moejax.moe.placement import greedy_placement, holders, owners, replica_slot, slot_chunks
from moejax.moe.routing import Routing
from pallas_kernels.backend import platform, shard_map_checks_vma
from pallas_kernels.manual_axes import vary_like, varying_axes

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", "expert")  # the mesh axes of the default `batch` rule
EP_EXCHANGES = ("auto", "padded", "ragged")


@dataclasses.dataclass(frozen=True)
class _Group:
    """The expert-parallel group as seen from one device: its axis name (None = no
    collectives), its size P, and the mesh axes the metrics reduce over."""

    axis: str | None
    size: int
    metric_axes: tuple[str, ...]
    ragged: bool = False

    def index(self):
        return jnp.zeros((), jnp.int32) if self.axis is None else jax.lax.axis_index(self.axis)

    def all_gather(self, x):
        return x[None] if self.axis is None else jax.lax.all_gather(x, self.axis)

    def all_to_all(self, x):
        if self.axis is None:
            return x
        return jax.lax.all_to_all(x, self.axis, 0, 0, tiled=True)

    def exchange(self, buf, send_sizes, fill=0):
        """buf[P, B, ...] -> [P, B, ...]: row block p goes to device p, arriving as the
        receiver's block `self.index()`; only the first `send_sizes[p]` rows of each block
        count (the rest arrive as `fill` when ragged, as sent when padded)."""
        if self.axis is None or not self.ragged:
            return self.all_to_all(buf)
        p, b = buf.shape[:2]
        flat = buf.reshape((p * b,) + buf.shape[2:])
        starts = jnp.arange(p, dtype=jnp.int32) * b
        recv_sizes = self.all_to_all(send_sizes.astype(jnp.int32))
        # Every operand varies over the axis like `flat` (shard_map's vma check).
        output, starts, sizes, offsets = (
            vary_like(a, flat)
            for a in (
                jnp.full_like(flat, fill),
                starts,
                send_sizes.astype(jnp.int32),
                jnp.full((p,), self.index() * b, jnp.int32),
            )
        )
        out = jax.lax.ragged_all_to_all(
            flat, output, starts, sizes, offsets, vary_like(recv_sizes, flat), axis_name=self.axis
        )
        return out.reshape(buf.shape)

    def psum(self, x):
        return jax.lax.psum(self._varying(x), self.metric_axes) if self.metric_axes else x

    def pmax(self, x):
        return jax.lax.pmax(self._varying(x), self.metric_axes) if self.metric_axes else x

    def _varying(self, x):
        """psum/pmax under shard_map's vma check take values varying over their axes."""
        missing = tuple(a for a in self.metric_axes if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x


def buffer_rows(tokens: int, k: int, devices: int, capacity_factor: float) -> int:
    """B, the rows of each per-destination buffer: T k (dropless) or ceil(c T k / P)."""
    if capacity_factor <= 0:
        return tokens * k
    return max(1, min(tokens * k, math.ceil(capacity_factor * tokens * k / devices)))


def _sparse_all_gather(weights: Any, slot_expert: jax.Array, grp: _Group, e_local: int):
    """Replica weights [S, ...] of this device's slots, from their owners: the padded
    all_to_all (see the module docstring)."""
    me = grp.index()
    local = slot_expert - me * e_local  # [P, S]: index among my experts of each slot's expert
    mine = (slot_expert >= 0) & (local >= 0) & (local < e_local)
    idx = jnp.clip(local, 0, e_local - 1)

    def one(w):
        send = jnp.where(mine.reshape(mine.shape + (1,) * (w.ndim - 1)), w[idx], 0)
        return jnp.sum(grp.all_to_all(send), axis=0)  # [P sources, S, ...] -> [S, ...]

    return jax.tree.map(one, weights)


def _sparse_all_gather_ragged(
    weights: Any, slot_expert: jax.Array, grp: _Group, e_local: int, max_sends: int
):
    """Replica weights [S, ...] with one ragged_all_to_all per weight that moves only the
    filled slots (see the module docstring); empty slots are zeros."""
    p, s = slot_expert.shape
    me = grp.index()
    sends, first = slot_chunks(slot_expert, p * e_local)  # [P owners, P recv], [P recv, P own]
    mine = sends[me]  # rows I send each receiver
    in_off = jnp.cumsum(mine) - mine  # where each receiver's chunk starts in my send buffer
    # Row of my send buffer for each receiver slot (r, s) that I fill; R (dropped) otherwise.
    local = slot_expert - me * e_local
    is_mine = (slot_expert >= 0) & (local >= 0) & (local < e_local)
    row = in_off[:, None] + jnp.arange(s)[None] - first[:, me][:, None]
    row = jnp.where(is_mine, row, max_sends)
    send_idx = (
        jnp.zeros((max_sends,), jnp.int32)
        .at[row.reshape(-1)]
        .set(jnp.clip(local, 0, e_local - 1).reshape(-1), mode="drop")
    )

    def one(w):
        send = w[send_idx]  # [R, ...]: rows past sum(mine) are never sent
        out, in_off_, sizes, out_off, recv = (
            vary_like(a, send)
            for a in (
                jnp.zeros((s,) + w.shape[1:], w.dtype),
                in_off,
                mine,
                first[:, me],
                sends[:, me],
            )
        )
        return jax.lax.ragged_all_to_all(
            send, out, in_off_, sizes, out_off, recv, axis_name=grp.axis
        )

    return jax.tree.map(one, weights)


def max_sends(cfg: MoEConfig, devices: int, slots: int) -> int:
    """R: the most replicas one owner sends per step (`moe.fssdp_max_sends`, 0 = 2 S),
    at most the (P - 1) S slots of the other devices."""
    r = cfg.fssdp_max_sends or 2 * slots
    return max(1, min(r, (devices - 1) * slots))


def _local_compute(weights, slot_expert, rows, sizes, order, inverse, fn, grp, slots, mm_kw, sends):
    """Runs [own experts; replica slots] on the received rows (sorted by group inside)."""
    e_local = jax.tree.leaves(weights)[0].shape[0]
    if slots and grp.ragged:
        replicas = _sparse_all_gather_ragged(weights, slot_expert, grp, e_local, sends)
        weights = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), weights, replicas)
    elif slots:
        replicas = _sparse_all_gather(weights, slot_expert, grp, e_local)
        weights = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), weights, replicas)
    x_sorted = permute(rows, order, inverse, 1)
    out = fn(weights, x_sorted, lambda lhs, w: gmm(lhs, w, sizes, impl=mm_kw[0], tile=mm_kw[1]))
    return unpermute(out, order, inverse)


def _plan(
    x, ids, combine, weights, *, fn, cfg: MoEConfig, grp: _Group, slots: int, mm_kw: tuple[str, int]
):
    """The per-device body (see the module docstring); returns (y[T, d], metrics)."""
    t, d = x.shape
    k = ids.shape[1]
    e, p = cfg.num_experts, grp.size
    e_local = e // p
    g = e_local + slots  # local groups: own experts, then replica slots
    me = grp.index()
    used = (combine > 0).reshape(-1)
    flat = ids.reshape(-1)

    # 1. Loads: this device's counts per expert, the group's [P, E].
    _, inverse_e, counts = sort_by_expert(ids, e, combine > 0)
    counts_all = grp.all_gather(counts)  # [P, E]
    load = jnp.sum(counts_all, axis=0)

    # 2. Placement and each assignment's destination (device, local group).
    sends = max_sends(cfg, p, slots)
    slot_expert = greedy_placement(load, p, slots, sends)  # [P, S]
    holder_order, num_holders = holders(slot_expert, e)
    prefix = jnp.cumsum(counts_all, axis=0) - counts_all  # assignments on earlier devices
    starts_e = jnp.cumsum(counts) - counts
    rank = prefix[me, flat] + inverse_e - starts_e[flat]  # global rank among e's assignments
    chunk = rank * num_holders[flat] // jnp.maximum(load[flat], 1)
    dest = holder_order[flat, jnp.minimum(chunk, p - 1)]
    owner = owners(e, p)[flat]
    group = jnp.where(
        dest == owner, flat - owner * e_local, e_local + replica_slot(slot_expert, e)[dest, flat]
    )
    dest = jnp.where(used, dest, p)

    # 4. Pack per-destination buffers [P, B] sorted by (destination, group).
    b = buffer_rows(t, k, p, cfg.ep_capacity_factor)
    key = jnp.where(used, dest * g + group, p * g)
    order_s = jnp.argsort(key, stable=True).astype(jnp.int32)
    pos_sorted = jnp.zeros_like(order_s).at[order_s].set(jnp.arange(t * k, dtype=jnp.int32))
    per_dest = count_ids(dest, p)
    start_d = jnp.cumsum(per_dest) - per_dest
    pos = pos_sorted - start_d[jnp.minimum(dest, p - 1)]
    keep = used & (pos < b)
    slot_b = jnp.arange(b, dtype=jnp.int32)[None]
    valid = slot_b < jnp.minimum(per_dest, b)[:, None]  # [P, B]
    src = order_s[jnp.minimum(start_d[:, None] + slot_b, t * k - 1)]  # [P, B] assignment
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    send_x = x_pad[jnp.where(valid, src // k, t)]  # [P, B, d]
    send_g = jnp.where(valid, key[src] - jnp.arange(p)[:, None] * g, g)

    # 4-6. Exchange, (3.) sparse all-gather and local grouped matmul on own experts +
    # replicas, exchange back.
    sent = jnp.minimum(per_dest, b)  # filled rows of each destination's buffer
    rows = grp.exchange(send_x, sent).reshape(p * b, d)
    gids = grp.exchange(send_g, sent, fill=g).reshape(p * b)
    order_r, inverse_r, sizes = sort_by_expert(gids[:, None], g, gids[:, None] < g)
    compute = _local_compute
    if cfg.fssdp_remat and slots:
        compute = jax.checkpoint(_local_compute, static_argnums=(6, 7, 8, 9, 10))
    out = compute(
        weights, slot_expert, rows, sizes, order_r, inverse_r, fn, grp, slots, mm_kw, sends
    )
    back = grp.exchange(out.reshape(p, b, -1), grp.all_to_all(sent))  # [P, B, d_out]

    # Gather each assignment's output and combine.
    y = back[jnp.minimum(dest, p - 1), jnp.clip(pos, 0, b - 1)].reshape(t, k, -1)
    w = combine * keep.reshape(t, k)
    y = jnp.einsum("tkd,tk->td", y, w.astype(y.dtype))

    n_rows = jnp.sum(sizes).astype(jnp.float32)
    n_dev = grp.psum(jnp.ones((), jnp.float32))
    total = grp.psum(n_rows)
    real = grp.psum(jnp.sum(used).astype(jnp.float32))
    metrics = {
        "device_tokens_max": grp.pmax(n_rows),
        "device_tokens_mean": total / n_dev,
        "device_tokens_max_over_mean": grp.pmax(n_rows) / jnp.maximum(total / n_dev, 1.0),
        "dropped_fraction": (real - total) / jnp.maximum(real, 1.0),
    }
    if slots:
        filled = jnp.mean((slot_expert >= 0).astype(jnp.float32))
        metrics["replica_slots_used"] = grp.psum(filled) / n_dev
    return y.astype(x.dtype), metrics


def _context_mesh(num_tokens: int):
    """The context mesh if the sharded plan applies to it, else None (run locally)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        return None
    shards = math.prod(mesh.shape[a] for a in TOKEN_AXES if a in mesh.axis_names)
    return mesh if num_tokens % shards == 0 else None


def token_split(num_tokens: int):
    """`(mesh, PartitionSpec of the token axis)` when the context mesh splits `num_tokens`
    tokens over more than one device (its `TOKEN_AXES`, dividing evenly), else None: the
    plan then runs on the whole array."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards == 1 or num_tokens % shards:
        return None
    return mesh, P(axes)


def sharded_dispatch(
    x: jax.Array, routing: Routing, expert_fn: ExpertFn, cfg: MoEConfig, slots: int, gmm_impl: str
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The EP/FSSDP plan over the context mesh (locally when there is none)."""
    mm_kw = (gmm_impl, cfg.gmm_tile)  # hashable: a static argument of jax.checkpoint
    mesh = _context_mesh(x.shape[0])
    if mesh is None:
        grp = _Group(None, 1, ())
        return _plan(
            x,
            routing.expert_ids,
            routing.combine_weights,
            expert_fn.weights,
            fn=expert_fn.fn,
            cfg=cfg,
            grp=grp,
            slots=0,
            mm_kw=mm_kw,
        )
    p = mesh.shape[EXPERT_AXIS]
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names)
    ragged = cfg.ep_exchange == "ragged" or (
        cfg.ep_exchange == "auto" and platform() in ("gpu", "tpu")
    )
    grp = _Group(EXPERT_AXIS, p, token_axes, ragged)  # metrics: tensor-axis peers are copies
    slots = slots if p > 1 else 0

    def body(x, ids, combine, weights):
        # Only `expert_fn.fn` is used inside: the weights come in sharded as `weights`.
        return _plan(
            x, ids, combine, weights, fn=expert_fn.fn, cfg=cfg, grp=grp, slots=slots, mm_kw=mm_kw
        )

    tokens = P(token_axes)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, P(EXPERT_AXIS)),
        out_specs=(tokens, P()),
        # Pallas kernels in CPU interpret mode cannot be checked (pallas_kernels.backend).
        check_vma=gmm_impl != "pallas" or shard_map_checks_vma(),
    )
    return fn(x, routing.expert_ids, routing.combine_weights, expert_fn.weights)
