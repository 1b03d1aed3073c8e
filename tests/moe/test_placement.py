"""FSSDP's greedy replica placement (with and without a send cap), the holders' token split
and the sparse all-gather's chunk layout, against hand-worked cases."""

import jax.numpy as jnp
import numpy as np

from moejax.moe.placement import greedy_placement, holders, owners, replica_slot, slot_chunks


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


def test_send_cap_stops_an_owner_at_r_replicas():
    # The case above with R = 2: device 0 sends e0 to d1 (20 + 50 < 110) and d2 (20 + 33.3
    # < 70) and is then capped (e0, e1 closed). Device loads d0..d3: 43.3, 53.3, 53.3, 20.
    # e2 (per-holder 10, owner d1) -> d3, the least loaded (20 + 5 < 53.3); then e3 (10,
    # owner d1, 1 send so far) -> d0, the last free slot (43.3 + 5 < 53.3).
    load = jnp.asarray([100, 10, 10, 10, 10, 10, 10, 10], jnp.float32)
    slot_expert = np.asarray(greedy_placement(load, 4, 1, max_sends=2))
    np.testing.assert_array_equal(slot_expert, [[3], [0], [0], [2]])
    np.testing.assert_allclose(device_loads(load, slot_expert, 4), [48.33, 43.33, 53.33, 25], 1e-3)
    sends, _ = slot_chunks(jnp.asarray(slot_expert), 8)
    assert list(np.asarray(sends).sum(1)) == [2, 2, 0, 0]  # replicas each owner sends


def test_slots_are_sorted_by_expert_so_each_owner_fills_one_chunk():
    # 8 experts on 4 devices (owner = e // 2), S = 3, R = 4 (never binding here).
    load = jnp.asarray([90, 80, 10, 10, 10, 10, 10, 10], jnp.float32)
    slot_expert = np.asarray(greedy_placement(load, 4, 3, max_sends=4))
    for row in slot_expert:
        filled = row[row >= 0]
        assert list(filled) == sorted(filled) and np.all(row[len(filled) :] == -1)
    assert np.any(slot_expert >= 0)


def test_slot_chunks_count_and_locate_each_owners_share():
    # Receiver 0 holds e2 (owner 1) and e5 (owner 2); receiver 1 holds e0, e1 (owner 0, one
    # chunk of 2 rows); receiver 2 holds e0 and e6 (owners 0, 3); receiver 3 nothing.
    slot_expert = jnp.asarray([[2, 5], [0, 1], [0, 6], [-1, -1]], jnp.int32)
    sends, first = slot_chunks(slot_expert, 8)
    np.testing.assert_array_equal(sends, [[0, 2, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]])
    # first[r, o]: the slot of r where owner o's chunk starts (its slots of lower owners).
    np.testing.assert_array_equal(first[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(first[1], [0, 2, 2, 2])
    np.testing.assert_array_equal(first[2], [0, 1, 1, 1])


def test_any_owner_layout_heterogeneous_sharding():
    # Device 0 owns only e0 (100), device 1 owns e1..e3 (30), d2 and d3 two each (20).
    # e0 -> d2 (first least loaded: 20 + 50 < 100), e0 -> d3 (20 + 33.3 < 70); then
    # e0 -> d1 would make it 30 + 25 = 55 > 53.3: stop.
    load = jnp.asarray([100, 10, 10, 10, 10, 10, 10, 10], jnp.float32)
    owner = jnp.asarray([0, 1, 1, 1, 2, 2, 3, 3], jnp.int32)
    slot_expert = np.asarray(greedy_placement(load, 4, 1, owner=owner))
    np.testing.assert_array_equal(slot_expert, [[-1], [-1], [0], [0]])
