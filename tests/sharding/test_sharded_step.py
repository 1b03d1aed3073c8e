"""Sharded == unsharded: on a simulated 8-device pod, every sharding strategy of
`moejax.sharding.strategies` (data, FSDP, FSDP+TP, and the expert-parallel / FSSDP
dispatchers once registered) trains 3 steps with the losses of one device, and a checkpoint
saved on the FSDP mesh restores onto a 4-device data-parallel mesh with identical
parameters. Runs in a subprocess so the XLA flag that creates 8 CPU devices is set before
JAX starts."""

import json

import numpy as np
import pytest
from testing_utils import run_pod_script

from moejax.sharding.strategies import available

SCRIPT = r"""
import json, sys, tempfile
import jax, numpy as np
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN, load_config_module
from moejax.config.validation import validate
from moejax.data import make_batches
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import shard_batch
from moejax.sharding.strategies import apply_strategy
from moejax.train.checkpoint import Checkpointer
from moejax.train.experiment import build_experiment

config_name, data_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
layouts = json.loads(sys.argv[4])  # name -> [strategy or null, {axis: size}]
config = load_config_module(config_name).get_config()
config.model.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=2,
                    vocab_size=264)
if config.model.moe_every:
    config.moe.update(num_experts=8, top_k=2, d_expert=16, gmm_tile=16, gru_dim=8)
config.data.update(data_dir=data_dir, max_bytes_per_domain=TEST_CORPUS_BYTES_PER_DOMAIN,
                   seq_len=32, global_batch_size=8)
batches = make_batches(validate(config, num_devices=1, num_processes=1).data, "train")
raw = [next(batches) for _ in range(steps)]


def experiment(strategy, sizes):
    c = config.copy_and_resolve_references()
    c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    if strategy:
        apply_strategy(c, strategy, **sizes)
    else:
        c.mesh.update(**sizes)
    sizes = [c.mesh[a] for a in ("data", "fsdp", "expert", "tensor")]
    n = 8 if -1 in sizes else int(np.prod(sizes))
    s = validate(c, num_devices=n, num_processes=1)
    mesh = make_mesh(s.mesh, devices=jax.devices()[:n])
    return s, mesh, build_experiment(s, mesh)


out = {}
for name, (strategy, sizes) in layouts.items():
    s, mesh, exp = experiment(strategy, sizes)
    state = exp.init_fn(jax.random.PRNGKey(0))
    losses = []
    for b in raw:
        state, metrics = exp.step_fn(state, shard_batch(b, mesh, s.mesh.rules))
        losses.append(float(metrics["loss"]))
    out[name] = losses + [float(metrics["grad_norm"])]
    if name == "fsdp":  # restore onto another mesh shape: 4 devices, data-parallel
        with tempfile.TemporaryDirectory() as d:
            ckpt = Checkpointer(d, async_save=False)
            ckpt.save(steps, state, force=True)
            _, mesh4, exp4 = experiment(None, dict(data=4))
            restored, _, _ = ckpt.restore(target=exp4.abstract_state)
            ckpt.close()
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            jax.device_get(state.params), jax.device_get(restored.params))
        leaf = jax.tree.leaves(restored.params)[0]
        out["restore"] = {"identical": all(jax.tree.leaves(same)),
                          "mesh": dict(leaf.sharding.mesh.shape),
                          "devices": len(leaf.sharding.device_set)}
if "fsdp" in layouts:  # 8-way tensor parallelism of 4 heads: an error before compiling
    try:
        experiment(None, dict(tensor=8))
    except Exception as e:
        out["tensor8_error"] = f"{type(e).__name__}: {e}"
print("RESULT" + json.dumps(out))
"""

MOE_LAYOUTS = {
    "single": [None, {"data": 1}],
    "expert2_fsdp2": [None, {"data": 2, "fsdp": 2, "expert": 2}],
}
# Every registered strategy; the expert-parallel ones with data=2, expert=4.
MOE_LAYOUTS.update(
    {name: [name, {"data": 2} if name in ("ep", "fssdp") else {}] for name in available()}
)


def _run(config_name, data_dir, steps, layouts):
    return run_pod_script(
        SCRIPT, config_name, data_dir, str(steps), json.dumps(layouts), timeout=600
    )


# Every case here is slow (`make test-slow`, tests/slow_tests.py): expert parallelism's fast
# representative is tests/moe/test_expert_parallel.py, data parallelism's
# tests/train/test_multihost.py, a restore onto another mesh tests/train/test_checkpoint.py.
# FAST_LAYOUTS share one subprocess with the restore and the non-dividing mesh; each group
# is one subprocess with its own one-device reference.
FAST_LAYOUTS = ("fsdp",)


@pytest.fixture(scope="module")
def moe_results(tiny_corpus_dir):
    """`results(fast)`: the layouts of that group and "single", run once per module."""
    cache = {}

    def results(fast: bool) -> dict:
        if fast not in cache:
            names = [n for n in MOE_LAYOUTS if n == "single" or (n in FAST_LAYOUTS) == fast]
            layouts = {n: MOE_LAYOUTS[n] for n in names}
            cache[fast] = _run("deepseekmoe", tiny_corpus_dir, 3, layouts)
        return cache[fast]

    return results


@pytest.fixture(scope="module")
def moe_result(moe_results):
    return moe_results(True)


@pytest.mark.parametrize(
    "layout",
    [
        n if n in FAST_LAYOUTS else pytest.param(n, marks=pytest.mark.slow)
        for n in MOE_LAYOUTS
        if n != "single"
    ],
)
def test_strategy_train_steps_match_one_device(moe_results, layout):
    result = moe_results(layout in FAST_LAYOUTS)
    single = np.array(result["single"])
    assert np.all(np.isfinite(single)) and len(single) == 4  # 3 losses and a grad norm
    np.testing.assert_allclose(result[layout], single, rtol=2e-5, err_msg=layout)


def test_checkpoint_restores_onto_another_mesh_shape(moe_result):
    """Saved from fsdp=8 (8 devices), restored as data=4 (4 devices): the same numbers."""
    restore = moe_result["restore"]
    assert restore["identical"]
    assert restore["devices"] == 4 and restore["mesh"]["data"] == 4


def test_a_parameter_dimension_the_mesh_does_not_divide_is_a_config_error(moe_result):
    error = moe_result["tensor8_error"]
    assert error.startswith("ConfigError: parameter ")
    assert "(size 8) do not divide" in error and "config.mesh" in error


@pytest.mark.slow  # fast representative: the deepseekmoe layouts above
def test_recurrent_router_state_is_layout_independent(tiny_corpus_dir):
    """RMoE's routing state [tokens, h] is split with the batch; the losses do not move."""
    result = _run(
        "rmoe",
        tiny_corpus_dir,
        2,
        {
            "single": [None, {"data": 1}],
            "data8": [None, {"data": 8}],
            "fsdp2_tensor2": [None, {"data": 2, "fsdp": 2, "tensor": 2}],
            "expert2_fsdp2": [None, {"data": 2, "fsdp": 2, "expert": 2}],
        },
    )
    single = np.array(result.pop("single"))
    assert np.all(np.isfinite(single))
    for name, values in result.items():
        np.testing.assert_allclose(values, single, rtol=2e-5, err_msg=name)
