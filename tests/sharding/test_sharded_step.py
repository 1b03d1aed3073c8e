"""Sharded == unsharded: three train steps on a simulated 8-device pod give the losses of one
device, for data, FSDP, tensor and expert layouts, and for the expert_parallel and fssdp
dispatchers (expert=4: each device owns one of the 4 experts). Runs in a subprocess so the
XLA flag that creates 8 CPU devices is set before JAX starts."""
import json
import os
import subprocess
import sys

import numpy as np
from testing_utils import REPO

SCRIPT = r"""
import json, sys, time
import jax, numpy as np
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN, load_config_module
from moejax.config import validate
from moejax.data import make_batches
from moejax.sharding.mesh import make_mesh
from moejax.sharding.partitioning import shard_batch
from moejax.train.trainer import build_experiment

config = load_config_module(sys.argv[1]).get_config()
config.model.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=2,
                    vocab_size=264)
if config.model.moe_every:
    config.moe.update(num_experts=4, top_k=2, d_expert=16, gmm_tile=16, gru_dim=8)
config.data.update(data_dir=sys.argv[2], max_bytes_per_domain=TEST_CORPUS_BYTES_PER_DOMAIN,
                   seq_len=32, global_batch_size=8)
batches = make_batches(validate(config, num_devices=1, num_processes=1).data, "train")
raw = [next(batches) for _ in range(3)]
out = {}
layouts = {"single": dict(data=1), "data8": dict(data=8),
           "fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
           "expert2_fsdp2": dict(data=2, fsdp=2, expert=2)}
if sys.argv[3] == "dispatchers":  # + the shard_map dispatchers, each device owning 1 expert
    layouts.update({"expert_parallel": dict(fsdp=2, expert=4, dispatcher="expert_parallel"),
                    "fssdp": dict(fsdp=2, expert=4, dispatcher="fssdp", fssdp_slots=2)})
dispatcher = config.moe.dispatcher
for name, sizes in layouts.items():
    t0 = time.perf_counter()
    sizes = dict(sizes)
    config.moe.update(dispatcher=sizes.pop("dispatcher", dispatcher))
    if "fssdp_slots" in sizes:
        config.moe.update(fssdp_slots=sizes.pop("fssdp_slots"))
    config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    config.mesh.update(**sizes)
    n = int(np.prod(list(sizes.values())))
    s = validate(config, num_devices=n, num_processes=1)
    mesh = make_mesh(s.mesh, devices=jax.devices()[:n])
    exp = build_experiment(s, mesh)
    state = exp.init_fn(jax.random.PRNGKey(0))
    losses = []
    for b in raw:
        state, metrics = exp.step_fn(state, shard_batch(b, mesh, s.mesh.rules))
        losses.append(float(metrics["loss"]))
    out[name] = losses + [float(metrics["grad_norm"])]
    print(name, f"{time.perf_counter() - t0:.1f} s")
    if "moe/device_tokens_max_over_mean" in metrics:
        print(name, "max/mean tokens per device per MoE layer:",
              np.asarray(metrics["moe/device_tokens_max_over_mean"]).round(3).tolist())
print("RESULT" + json.dumps(out))
"""


def _run(config_name, data_dir, layouts="layouts"):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, config_name, data_dir, layouts], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT")))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


def test_moe_train_steps_match_across_layouts(tiny_corpus_dir):
    """Data, FSDP, FSDP+TP, expert layouts, and the expert_parallel and fssdp dispatchers
    (tokens exchanged over an expert axis of 4 with fsdp=2)."""
    result = _run("deepseekmoe", tiny_corpus_dir, "dispatchers")
    assert {"expert_parallel", "fssdp"} <= set(result)
    single = np.array(result.pop("single"))
    assert np.all(np.isfinite(single))
    for name, values in result.items():
        np.testing.assert_allclose(values, single, rtol=2e-5, err_msg=name)


def test_recurrent_router_state_is_layout_independent(tiny_corpus_dir):
    """RMoE's routing state [tokens, h] is split with the batch; the losses do not move."""
    result = _run("rmoe", tiny_corpus_dir)
    single = np.array(result.pop("single"))
    assert np.all(np.isfinite(single))
    for name, values in result.items():
        np.testing.assert_allclose(values, single, rtol=2e-5, err_msg=name)

