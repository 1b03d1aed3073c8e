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
stop and leave the remaining slots empty (-1).

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


def greedy_placement(load: jax.Array, num_devices: int, slots: int) -> jax.Array:
    """slot_expert[P, S] int32: the expert replicated in each slot, -1 where empty.

    `load[E]`: the step's assignments per expert over the group (any float or int dtype).
    """
    e = load.shape[0]
    p = num_devices
    load = load.astype(jnp.float32)
    hold = jax.nn.one_hot(owners(e, p), p, dtype=jnp.bool_).T  # [P, E]
    slot_expert = jnp.full((p, slots), -1, jnp.int32)
    if slots == 0 or p == 1:
        return slot_expert

    def body(_, carry):
        hold, slot_expert, free, done = carry
        per_holder = load / jnp.sum(hold, axis=0)
        dev_load = jnp.sum(jnp.where(hold, per_holder[None], 0.0), axis=1)
        eligible = ~hold & (free > 0)[:, None]
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
        return hold, slot_expert, free, done | ~take

    carry = (hold, slot_expert, jnp.full((p,), slots, jnp.int32), jnp.zeros((), jnp.bool_))
    carry = tuple(vary_like(c, load) for c in carry)  # inside shard_map: vary as the loads
    return jax.lax.fori_loop(0, p * slots, body, carry)[1]


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
