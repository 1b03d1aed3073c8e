"""FSSDP's greedy replica placement and the holders' token split, against hand-worked cases."""

import jax.numpy as jnp
import numpy as np

from moejax.moe.placement import greedy_placement, holders, owners, replica_slot


def device_loads(load, slot_expert, p):
    """Tokens per device when each expert's load is split evenly over its holders."""
    e = len(load)
    hold = np.zeros((p, e), bool)
    hold[np.asarray(owners(e, p)), np.arange(e)] = True
    for d, s in zip(*np.nonzero(slot_expert >= 0)):
        hold[d, slot_expert[d, s]] = True
    return (hold * (np.asarray(load) / hold.sum(0))).sum(1)


def test_hot_expert_is_replicated_onto_the_least_loaded_devices():
    # 4 devices own experts {0,1}, {2,3}, {4,5}, {6,7}; expert 0 takes 100 of 170 tokens.
    # Worked by hand: e0 -> d1 (20 + 50 < 110), e0 -> d2 (20 + 33.3 < 70), e0 -> d3
    # (20 + 25 < 53.3); then e0 has no eligible device and e2 (per-holder 10, first of the
    # ties) goes to d0, the only free slot (35 + 5 < 45).
    load = jnp.asarray([100, 10, 10, 10, 10, 10, 10, 10], jnp.float32)
    slot_expert = np.asarray(greedy_placement(load, 4, 1))
    np.testing.assert_array_equal(slot_expert, [[2], [0], [0], [0]])
    np.testing.assert_allclose(device_loads(load, slot_expert, 4), [40, 40, 45, 45])
    order, count = holders(jnp.asarray(slot_expert), 8)
    assert int(count[0]) == 4 and list(np.asarray(order[0])) == [0, 1, 2, 3]  # owner first
    assert int(count[2]) == 2 and list(np.asarray(order[2])[:2]) == [1, 0]
    slot_of = np.asarray(replica_slot(jnp.asarray(slot_expert), 8))
    assert slot_of[1, 0] == 0 and slot_of[0, 2] == 0


def test_balanced_loads_leave_slots_empty():
    # Replicating anything would make its new holder the straggler: nothing moves.
    load = jnp.full((8,), 10.0)
    np.testing.assert_array_equal(greedy_placement(load, 4, 2), -np.ones((4, 2)))


def test_no_slots_or_one_device_is_plain_expert_parallelism():
    load = jnp.asarray([5.0, 1.0, 1.0, 1.0])
    assert greedy_placement(load, 2, 0).shape == (2, 0)
    np.testing.assert_array_equal(greedy_placement(load, 1, 3), -np.ones((1, 3)))
