"""Sharded vs unsharded `moejax.hf.from_pretrained` on a synthetic Qwen3-MoE checkpoint:
seconds and peak host RSS of each, in its own process on 8 simulated CPU devices.

    python -m experiments.benchmarks.hf_sharded_load --dir /tmp/synth --gb 2
    python -m experiments.benchmarks.hf_sharded_load --dir /tmp/synth --gb 2 --save /tmp/out

The checkpoint (transformers 5.x fused experts, random float32, several safetensors shards
with an index) is written once with NumPy only. Each load runs in a fresh subprocess
(`--load unsharded|sharded`) so its `ru_maxrss` is its own; the sharded load uses the mesh
fsdp=2 x expert=4 and the default rules. Simulated devices keep their buffers in host
memory, so besides the peak RSS it reports the devices' bytes and the host overhead: peak
minus the RSS before loading minus the device buffers (what the loader itself held).

`--save DIR`: each process then writes what it loaded with `save_pretrained` (256 MiB shards,
one layer slice gathered at a time) and reports the seconds and the peak RSS above the RSS
before saving (the peak is reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from etils import epath

SAVE_SHARD = 256 << 20  # save_pretrained's shard bound here: an eighth of the model


def write_checkpoint(path: epath.Path, gb: float) -> dict:
    """A Qwen3-MoE config of about `gb` GB (float32) and its tensors, shard by shard."""
    from safetensors.numpy import save_file

    d, e, inter, vocab, heads, kv, hd = 1024, 32, 512, 32000, 8, 4, 128
    per_layer = 4 * (3 * e * inter * d + (2 * heads + 2 * kv) * hd * d + e * d)
    layers = max(1, round((gb * 1e9 - 2 * 4 * vocab * d) / per_layer))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": 2 * inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_experts": e,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": inter,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(np.float32)

    weight_map, shard = {}, 0
    top = {
        "model.embed_tokens.weight": rand(vocab, d),
        "lm_head.weight": rand(vocab, d),
        "model.norm.weight": np.ones(d, np.float32),
    }
    shards = [top]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "input_layernorm.weight": np.ones(d, np.float32),
                p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                p + "self_attn.q_proj.weight": rand(heads * hd, d),
                p + "self_attn.k_proj.weight": rand(kv * hd, d),
                p + "self_attn.v_proj.weight": rand(kv * hd, d),
                p + "self_attn.o_proj.weight": rand(d, heads * hd),
                p + "self_attn.q_norm.weight": np.ones(hd, np.float32),
                p + "self_attn.k_norm.weight": np.ones(hd, np.float32),
                p + "mlp.gate.weight": rand(e, d),
                p + "mlp.experts.gate_up_proj": rand(e, 2 * inter, d),
                p + "mlp.experts.down_proj": rand(e, d, inter),
            }
        )
    for tensors in shards:
        shard += 1
        name = f"model-{shard:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    total = sum(v.nbytes for s in shards for v in s.values())
    return {"layers": layers, "bytes": total}


def load(path: str, how: str, save_to: str | None = None) -> dict:
    import jax

    import moejax.hf as mhf
    from moejax.sharding.config import MeshConfig
    from moejax.sharding.mesh import make_mesh

    baseline = _rss_gb()
    start = time.perf_counter()
    if how == "sharded":
        mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=4, tensor=1))
        model, variables = mhf.from_pretrained(path, mesh=mesh)
    else:
        model, variables = mhf.from_pretrained(path)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB
    # Simulated devices keep their buffers in host memory (a leaf replicated over 4 devices
    # is there 4 times): what the load itself holds is the peak minus those and the baseline.
    device = sum(s.data.nbytes for a in jax.tree.leaves(variables) for s in a.addressable_shards)
    out = {
        "load": how,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak, 2),
        "baseline_rss_gb": round(baseline, 2),
        "device_buffers_gb": round(device / 1e9, 2),
        "host_overhead_gb": round(peak - baseline - device / 1e9, 2),
    }
    if save_to:  # save_pretrained of what was loaded; the peak RSS is reset first
        (before,) = _status_gb("VmRSS")
        epath.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        mhf.save_pretrained(model, variables, f"{save_to}/{how}", max_shard_bytes=SAVE_SHARD)
        (save_peak,) = _status_gb("VmHWM")
        out["save_seconds"] = round(time.perf_counter() - start, 1)
        out["save_peak_over_rss_gb"] = round(save_peak - before, 2)  # what saving held
    return out


def _rss_gb() -> float:
    return _status_gb("VmRSS")[0]


def _status_gb(*fields: str) -> tuple[float, ...]:
    """Fields of /proc/self/status (kB) in GB."""
    values = {}
    for line in epath.Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) / 1e6 if rest.strip().endswith("kB") else 0.0
    return tuple(values.get(f, 0.0) for f in fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--load", choices=("unsharded", "sharded"))
    parser.add_argument("--save", default="", help="also save_pretrained into SAVE/<load>")
    args = parser.parse_args()
    if args.load:
        print("RESULT" + json.dumps(load(args.dir, args.load, args.save or None)))
        return
    path = epath.Path(args.dir)
    info = write_checkpoint(path, args.gb)
    print(json.dumps({"checkpoint_gb": round(info["bytes"] / 1e9, 2), "layers": info["layers"]}))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    for how in ("unsharded", "sharded"):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.benchmarks.hf_sharded_load"]
            + ["--dir", args.dir, "--load", how]
            + (["--save", args.save] if args.save else []),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
        print(line[len("RESULT") :])


if __name__ == "__main__":
    main()
