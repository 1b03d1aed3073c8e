"""FSSDP expert placement: which devices hold a replica of which expert this step.

After Hecate's placement step (Fully Sharded Sparse Data Parallelism, arXiv 2502.02581):
every expert e has one owner, device `e // (E / P)` of the P devices of an expert-parallel
group, which keeps its parameters and optimizer state. Each step, S replica slots per
device are filled greedily from the step's expert loads `L[E]` (assignments per expert,
summed over the group): with h_e holders the per-holder load of e is L_e / h_e and device
p's load is sum_{e held by p} L_e / h_e. Repeat P*S times: take the expert e* with the
highest per-holder load that some device can still take (a free slot, not yet a holder),
and give a replica to the least-loaded such device d*, as long as that lowers the straggler
(d*'s new load L_e* / (h_e* + 1) + load_d* stays below the current maximum); otherwise
stop and leave the remaining slots empty (-1). With a send cap R (`moe.fssdp_max_sends`),
an owner that already sends R replicas this step gives no more: R is the static size of an
owner's send buffer in the sparse all-gather (and of its receive buffer in the sparse
reduce-scatter), so the compiled traffic is bounded by S + R expert weight sets per device,
independent of P. Each device's slots are finally sorted by expert (empty slots last): the
slots a device receives from one owner are then contiguous, one chunk per (owner,
receiver) pair, the layout `jax.lax.ragged_all_to_all` moves.

Tokens of expert e are split among its holders by their global rank among e's assignments
(ordered by source device, then by position on the source): holder c of the H_e holders
(owner first, then replicas in device order) takes ranks [ceil(c L_e / H_e),
ceil((c + 1) L_e / H_e)), so holders' counts differ by at most one. This ignores locality
(Hecate sends a token to a local copy first where one exists); balance is what it buys.

Everything here is integer/float arithmetic on [P, E] arrays, run identically on every
device of the group (same inputs, same ops), so all devices agree on the placement
without another collective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.grouped_matmul import vary_like


def owners(num_experts: int, num_devices: int) -> jax.Array:
    """owner[E]: the device of the group that owns (stores) each expert."""
    return jnp.arange(num_experts, dtype=jnp.int32) // (num_experts // num_devices)


def greedy_placement(
    load: jax.Array,
    num_devices: int,
    slots: int,
    max_sends: int | None = None,
    owner: jax.Array | None = None,
) -> jax.Array:
    """slot_expert[P, S] int32: the expert replicated in each slot, -1 where empty; each
    row sorted by expert, empty slots last.

    `load[E]`: the step's assignments per expert over the group (any float or int dtype).
    `max_sends`: the most replicas one owner may send per step (None: no cap). `owner[E]`:
    each expert's device, default `owners(E, P)`; any layout (a device may own 0..E
    experts, Hecate's heterogeneous sharding) for `experiments.fssdp_sim`.
    """
    e = load.shape[0]
    p = num_devices
    load = load.astype(jnp.float32)
    owner = owners(e, p) if owner is None else owner
    hold = jax.nn.one_hot(owner, p, dtype=jnp.bool_).T  # [P, E]
    slot_expert = jnp.full((p, slots), -1, jnp.int32)
    if slots == 0 or p == 1:
        return slot_expert
    cap = p * slots if max_sends is None else max_sends

    def body(_, carry):
        hold, slot_expert, free, sent, done = carry
        per_holder = load / jnp.sum(hold, axis=0)
        dev_load = jnp.sum(jnp.where(hold, per_holder[None], 0.0), axis=1)
        eligible = ~hold & (free > 0)[:, None] & (sent[owner] < cap)[None]
        score = jnp.where(jnp.any(eligible, axis=0), per_holder, -1.0)
        e_star = jnp.argmax(score)
        d_star = jnp.argmin(jnp.where(eligible[:, e_star], dev_load, jnp.inf))
        new_share = load[e_star] / (jnp.sum(hold[:, e_star]) + 1)
        take = ~done & (score[e_star] > 0) & (dev_load[d_star] + new_share < jnp.max(dev_load))
        slot = slots - free[d_star]
        hold = hold.at[d_star, e_star].set(hold[d_star, e_star] | take)
        slot_expert = slot_expert.at[d_star, jnp.minimum(slot, slots - 1)].set(
            jnp.where(take, e_star, slot_expert[d_star, jnp.minimum(slot, slots - 1)])
        )
        free = free.at[d_star].add(-take.astype(jnp.int32))
        sent = sent.at[owner[e_star]].add(take.astype(jnp.int32))
        return hold, slot_expert, free, sent, done | ~take

    zeros = jnp.zeros((p,), jnp.int32)
    carry = (hold, slot_expert, zeros + slots, zeros, jnp.zeros((), jnp.bool_))
    carry = tuple(vary_like(c, load) for c in carry)  # inside shard_map: vary as the loads
    slot_expert = jax.lax.fori_loop(0, p * slots, body, carry)[1]
    return jnp.sort(slot_expert.astype(jnp.uint32), axis=1).astype(jnp.int32)  # -1 last


def slot_chunks(slot_expert: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(sends[P owners, P receivers], first[P receivers, P owners]): how many of receiver
    r's slots owner o fills, and the first of them (r's slots sorted by expert, so those of
    one owner are contiguous). Computed the same on every device."""
    p = slot_expert.shape[0]
    e_local = num_experts // p
    owner = jnp.where(slot_expert >= 0, slot_expert // e_local, p)  # [P, S], p = empty
    per = jnp.sum(owner[:, :, None] == jnp.arange(p)[None, None], axis=1, dtype=jnp.int32)
    return per.T, jnp.cumsum(per, axis=1) - per


def holders(slot_expert: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(holder_order[E, P], num_holders[E]): each expert's holders, owner first then
    replicas in device order; entries past num_holders[e] are meaningless."""
    p = slot_expert.shape[0]
    owner = owners(num_experts, p)
    dev = jnp.arange(p, dtype=jnp.int32)
    replica = jnp.zeros((p, num_experts + 1), jnp.bool_)
    replica = replica.at[dev[:, None], jnp.where(slot_expert < 0, num_experts, slot_expert)].set(
        True
    )[:, :num_experts]
    is_owner = owner[None, :] == dev[:, None]  # [P, E]
    key = jnp.where(is_owner, 0, jnp.where(replica, 1 + dev[:, None], 2 * p + 1))  # [P, E]
    order = jnp.argsort(key.T, axis=1, stable=True).astype(jnp.int32)  # [E, P]
    return order, jnp.sum(is_owner | replica, axis=0).astype(jnp.int32)


def replica_slot(slot_expert: jax.Array, num_experts: int) -> jax.Array:
    """slot_of[P, E]: the slot of device p that holds expert e (0 where it holds none)."""
    p, s = slot_expert.shape
    slot_of = jnp.zeros((p, num_experts + 1), jnp.int32)
    cols = jnp.where(slot_expert < 0, num_experts, slot_expert)
    slot_of = slot_of.at[jnp.arange(p)[:, None], cols].set(jnp.arange(s, dtype=jnp.int32)[None])
    return slot_of[:, :num_experts]
