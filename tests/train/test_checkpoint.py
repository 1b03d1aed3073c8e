"""Checkpointer: round trips, keep/save_every policies, async saves, resharding, errors."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from testing_utils import device_env

from moejax.train.checkpoint import Checkpointer, CheckpointError
from moejax.train.faults import CHECKPOINT_CORRUPTIONS


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def run_script(code: str, devices: int = 1) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh CPU-only Python, with `devices` fake host devices.

    A subprocess because XLA reads the device count once, when jax first initialises.
    """
    return subprocess.run(
        [sys.executable, "-c", code],
        env=device_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )


def make_state(seed: int = 0) -> TrainState:
    """A small train state with a real (non-zero) adamw state after one update."""
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
        "layers": [jnp.asarray(rng.normal(size=(3,)), jnp.float32)],
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return TrainState(step=jnp.int32(seed), params=params, opt_state=opt_state)


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def step_dirs(workdir) -> list[int]:
    """Committed step directories on disk (not orbax's temporary ones)."""
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def test_round_trip_keeps_values_dtypes_and_pytree_types(tmp_path):
    state = make_state(seed=3)
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        assert ckpt.save(
            5,
            state,
            data_state={"position": np.int64(17), "epoch": 2},
            extra={"model": {"d_model": 8, "name": "tiny"}},
        )
        restored, data_state, extra = ckpt.restore(target=abstract(state))
        # Concrete arrays also work as a target.
        from_concrete, _, _ = ckpt.restore(5, target=make_state(seed=9))

    assert type(restored) is TrainState
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # ScaleByAdamState
    assert_trees_equal(restored, state)
    assert_trees_equal(from_concrete, state)
    assert data_state == {"position": 17, "epoch": 2}
    assert extra == {"model": {"d_model": 8, "name": "tiny"}}


def test_optional_items_restore_as_none(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        _, data_state, extra = ckpt.restore(target=abstract(state))
    assert data_state is None and extra is None


def test_keep_n_keeps_exactly_the_latest_n(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep=2, save_every=1, async_save=False) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        assert ckpt.all_steps() == [4, 5]
    assert step_dirs(tmp_path) == [4, 5]


def test_save_every_is_respected_unless_forced(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep=5, save_every=10, async_save=False) as ckpt:
        saved = [step for step in range(1, 26) if ckpt.save(step, state)]
        assert saved == [10, 20]
        assert ckpt.save(25, state, force=True)
        assert ckpt.all_steps() == [10, 20, 25]
        assert ckpt.latest_step() == 25


def test_force_never_overwrites_or_interleaves(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=10, async_save=False) as ckpt:
        ckpt.save(20, state)
        with pytest.raises(CheckpointError, match="already exists"):
            ckpt.save(20, make_state(seed=1), force=True)
        with pytest.raises(CheckpointError, match="older than step 20"):
            ckpt.save(10, state, force=True)
        assert not ckpt.save(10, state)  # Not newer than the latest: skipped silently.
        restored, _, _ = ckpt.restore(target=abstract(state))
    assert_trees_equal(restored, state)
    assert step_dirs(tmp_path) == [20]


def test_async_save_then_restore_after_wait(tmp_path):
    first, second = make_state(seed=1), make_state(seed=2)
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=True)
    assert ckpt.save(1, first, data_state={"position": 1})
    assert ckpt.save(2, second, data_state={"position": 2})
    ckpt.wait()
    assert step_dirs(tmp_path) == [1, 2]
    ckpt.close()

    # A new Checkpointer (as after a restart) sees both steps on disk.
    with Checkpointer(tmp_path) as reopened:
        assert reopened.all_steps() == [1, 2]
        restored, data_state, _ = reopened.restore(target=abstract(first))
        older, _, _ = reopened.restore(1, target=abstract(first))
    assert_trees_equal(restored, second)
    assert data_state == {"position": 2}
    assert_trees_equal(older, first)


def test_failed_sync_save_raises_a_checkpoint_error(tmp_path):
    (tmp_path / "not_a_dir").write_text("")  # Nothing can be created below a file.
    ckpt = Checkpointer(tmp_path / "not_a_dir" / "run", save_every=1, async_save=False)
    with pytest.raises(CheckpointError, match="Saving step 1 .* failed.*writable"):
        ckpt.save(1, make_state())
    assert ckpt.all_steps() == []
    ckpt.close()


_FAILED_ASYNC_SAVE_SCRIPT = textwrap.dedent(
    """
    import os
    import jax.numpy as jnp
    from moejax.train.checkpoint import Checkpointer, CheckpointError

    ckpt = Checkpointer(WORKDIR, save_every=1)  # async
    assert ckpt.save(1, {"a": jnp.ones(3)})  # The directory is created in the background.
    try:
        ckpt.wait()
    except CheckpointError as e:
        print("CAUGHT", e, "| steps:", ckpt.all_steps(), flush=True)
    # After a failed async save, orbax threads wait out their coordination timeout
    # (300 s) on a signal that never comes, which would delay a normal exit.
    os._exit(0)
    """
)


def test_failed_async_save_raises_on_wait(tmp_path):
    (tmp_path / "not_a_dir").write_text("")  # Nothing can be created below a file.
    workdir = str(tmp_path / "not_a_dir" / "run")
    result = run_script(f"WORKDIR = {workdir!r}\n" + _FAILED_ASYNC_SAVE_SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "CAUGHT Saving step 1 to" in result.stdout
    assert "writable" in result.stdout and "steps: []" in result.stdout


def test_restore_or_init_starts_fresh_then_resumes(tmp_path):
    state = make_state(seed=4)
    with Checkpointer(tmp_path, save_every=10, async_save=False) as ckpt:
        fresh, data_state, start = ckpt.restore_or_init(lambda: state, abstract(state))
        assert (data_state, start) == (None, 0)
        assert fresh is state
        ckpt.save(10, state, data_state={"position": 40})

        def must_not_init():
            raise AssertionError("init_fn called although a checkpoint exists")

        resumed, data_state, start = ckpt.restore_or_init(must_not_init, abstract(state))
    assert start == 10 and data_state == {"position": 40}
    assert_trees_equal(resumed, state)


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    workdir = tmp_path / "run"
    ckpt = Checkpointer(workdir)
    with pytest.raises(CheckpointError, match="No checkpoint found") as info:
        ckpt.restore(target=abstract(make_state()))
    assert os.path.join(str(workdir), "checkpoints") in str(info.value)
    assert not workdir.exists()  # Restoring created nothing.
    ckpt.close()


def test_restore_missing_step_lists_available_steps(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
        with pytest.raises(CheckpointError, match=r"step 7.*\[1, 2\]"):
            ckpt.restore(7, target=abstract(state))


# Orbax leaves read coroutines of the failed restore behind; their "Event loop is closed"
# noise is reported by pytest as unraisable exceptions, not by our code.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", list(CHECKPOINT_CORRUPTIONS))
def test_corrupt_checkpoint_raises_and_earlier_steps_still_restore(tmp_path, corruption):
    states = {step: make_state(seed=step) for step in (1, 2, 3)}
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, data_state={"position": step})
        step_dir = ckpt.step_dir(3)
        CHECKPOINT_CORRUPTIONS[corruption](step_dir)

        with pytest.raises(CheckpointError) as info:
            ckpt.restore(target=abstract(states[1]))
        message = str(info.value)
        assert step_dir in message
        assert "delete" in message and "restore(step=2)" in message

        restored, data_state, _ = ckpt.restore(2, target=abstract(states[1]))
    assert_trees_equal(restored, states[2])
    assert data_state == {"position": 2}
    assert step_dirs(tmp_path) == [1, 2, 3]  # Nothing was deleted.


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        wrong = abstract(state).replace(
            params={**abstract(state.params), "w": jax.ShapeDtypeStruct((5, 8), jnp.float32)}
        )
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(target=wrong)
    message = str(info.value)
    assert "params/w" in message and "(4, 8)" in message and "(5, 8)" in message
    assert ckpt.step_dir(1) in message


def test_structure_mismatch_names_the_key(tmp_path):
    state = {"a": jnp.ones(3), "b": jnp.zeros(2)}
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        with pytest.raises(CheckpointError, match="target has 'c' but the checkpoint does not"):
            ckpt.restore(target={**abstract(state), "c": jax.ShapeDtypeStruct((1,), jnp.float32)})
        with pytest.raises(CheckpointError, match="checkpoint has 'b' but the target does not"):
            ckpt.restore(target={"a": abstract(state)["a"]})


def test_non_json_metadata_is_rejected_before_writing(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", save_every=1, async_save=False)
    with pytest.raises(TypeError, match=r"extra\['config'\]\['fn'\]"):
        ckpt.save(1, make_state(), extra={"config": {"fn": object()}})
    with pytest.raises(TypeError, match="nan"):
        ckpt.save(1, make_state(), data_state={"loss": float("nan")})
    assert not (tmp_path / "run").exists()
    ckpt.close()


def test_invalid_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)


_RESHARD_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
    from moejax.train.checkpoint import Checkpointer

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    w = jnp.arange(128.0).reshape(8, 16)
    e = jnp.arange(64, dtype=jnp.int32).reshape(4, 16)
    params = {
        "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
        "e": jax.device_put(e, NamedSharding(mesh, P(None, "data"))),
    }
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params)}
    with Checkpointer(WORKDIR, save_every=1) as ckpt:  # async
        ckpt.save(1, state)

    other = jax.make_mesh((2, 4), ("a", "b"))
    layouts = {
        "other mesh": NamedSharding(other, P(None, "b")),
        "single device": SingleDeviceSharding(jax.devices()[5]),
    }
    with Checkpointer(WORKDIR) as ckpt:
        for label, sharding in layouts.items():
            # Scalars (adam's count) are replicated; arrays take the new layout.
            place = lambda x: sharding if x.ndim >= 2 else NamedSharding(other, P())
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place(x)), state
            )
            restored, _, _ = ckpt.restore(target=target)
            for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
                assert got.sharding.is_equivalent_to(place(want), got.ndim), got.sharding
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            print("RESTORED", label, float(restored["params"]["w"].sum()))
    """
)


def test_restore_onto_another_mesh_and_one_device(tmp_path):
    result = run_script(f"WORKDIR = {str(tmp_path)!r}\n" + _RESHARD_SCRIPT, devices=8)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = float(np.arange(128.0).sum())
    assert f"RESTORED other mesh {expected}" in result.stdout
    assert f"RESTORED single device {expected}" in result.stdout


def test_checkpoint_from_before_a_new_optional_state_field_still_restores(tmp_path):
    """TrainState gained `collections` (None for most models); older checkpoints lack it."""
    from moejax.train.step import TrainState

    @struct.dataclass
    class OldTrainState:  # TrainState as written by earlier versions
        step: jax.Array
        params: dict
        opt_state: tuple

    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    opt_state = optax.adam(1e-3).init(params)
    old = OldTrainState(step=jnp.array(4, jnp.int32), params=params, opt_state=opt_state)
    ckpt = Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(4, old, force=True)
    target = TrainState(
        step=jnp.array(0, jnp.int32),
        params={"w": jnp.zeros((2, 3))},
        opt_state=optax.adam(1e-3).init({"w": jnp.zeros((2, 3))}),
    )
    state, _, _ = ckpt.restore(4, target=target)
    assert isinstance(state, TrainState) and state.collections is None
    assert int(state.step) == 4
    np.testing.assert_array_equal(state.params["w"], params["w"])
    ckpt.close()


@pytest.mark.parametrize("with_adapters", [False, True])
def test_a_v0_state_restores_into_collections(tmp_path, with_adapters):
    """Layout v0 (TrainState.router_bias / lora_state, moejax.train.state_layouts) restores
    into TrainState.collections leaf for leaf, whole or as subtrees."""
    from moejax.train.step import TrainState

    @struct.dataclass
    class V0TrainState:
        step: jax.Array
        params: dict
        opt_state: tuple
        router_bias: dict = None
        lora_state: dict = None

    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    bias = {"moe": {"router": {"bias": jnp.array([0.5, -0.25, 0.125])}}}
    lora = {"lora_bias": {"m": {"bias": jnp.array([1.0, 2.0])}}} if with_adapters else None
    old = V0TrainState(jnp.array(7, jnp.int32), params, optax.sgd(0.1).init(params), bias, lora)
    with Checkpointer(str(tmp_path), save_every=1, async_save=False) as ckpt:
        ckpt.save(7, old, force=True)
        want = {"router_bias": bias, **(lora or {})}
        target = TrainState(
            step=jnp.array(0, jnp.int32),
            params=jax.tree.map(jnp.zeros_like, params),
            opt_state=optax.sgd(0.1).init(params),
            collections=jax.tree.map(jnp.zeros_like, want),
        )
        state, _, _ = ckpt.restore(7, target=target)
        got = ckpt.restore_subtrees({"params": params, "collections": want}, 7)
    assert isinstance(state, TrainState) and int(state.step) == 7
    for tree in (state.collections, got["collections"]):
        assert jax.tree.structure(tree) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, tree, want)
    np.testing.assert_array_equal(state.params["w"], params["w"])
