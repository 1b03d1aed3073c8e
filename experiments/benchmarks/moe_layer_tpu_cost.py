"""The MoE layer on TPU, from XLA:TPU's compile-time cost analysis: FLOPs and bytes per
forward+backward of one `MoELayer` per dispatcher, against the dense SwiGLU of the same
active width (the baseline of `moe_layer.py`).

Compiles for one chip of an abstract TPU topology (`jax.experimental.topologies`, libtpu from
the `tpu` extra): the real XLA:TPU and Mosaic compilers run on this host and nothing
executes, so the figures are XLA's static counts, not timings. A Mosaic kernel counts what
its `pl.CostEstimate` declares (`pallas_kernels`). `auto` compiles the TPU plan
(`AUTO_PLAN["tpu"]`: `ragged` with the Mosaic grouped matmul).

    python experiments/benchmarks/moe_layer_tpu_cost.py --json               # default shape
    python experiments/benchmarks/moe_layer_tpu_cost.py --topology v6e:2x2 --dtype float32

`results[name]`: `flops`, `bytes_accessed` (XLA's, per chip), `flops_ratio` and
`bytes_ratio` to the dense SwiGLU, and `compile_s`. The shape flags are `moe_layer.py`'s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments.benchmarks import moe_layer  # noqa: E402
from experiments.benchmarks.timing import sig  # noqa: E402
from moejax.moe.layer import MoELayer  # noqa: E402
from moejax.nn.mlp import DenseMLP  # noqa: E402
from moejax.sharding.topology import tpu_devices  # noqa: E402

TPU_DISPATCHERS = ("auto", "pallas", "capacity_einsum", "dense_reference")


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


def run(shape: moe_layer.Shape, topology: str, dispatchers) -> dict:
    mesh = Mesh(np.array(tpu_devices(topology)[:1]), ("data",))
    rep = NamedSharding(mesh, P())
    model = moe_layer.model_config(shape)
    x = jax.ShapeDtypeStruct((shape.batch, shape.seq_len, shape.d_model), shape.dtype, sharding=rep)
    key = jax.random.PRNGKey(0)
    mlp = DenseMLP(
        shape.dense_width, model.init_std, model.init_std, model.dtype, model.param_dtype
    )
    cases = {"dense_mlp": (moe_layer.dense_loss(mlp), jax.eval_shape(mlp.init, key, x))}
    for name in dispatchers:
        layer = MoELayer(moe_layer.moe_config(shape, name), model)
        cases[name] = (moe_layer.moe_loss(layer), jax.eval_shape(layer.init, key, x))
    results = {}
    for name, (loss, variables) in cases.items():
        params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
            nn.unbox(variables)["params"],
        )
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(moe_layer.fwd_bwd(loss)).lower(params, x).compile()
        results[name] = {**_cost(compiled), "compile_s": round(time.perf_counter() - t0, 2)}
        moe_layer.log(f"{name}: {results[name]}")
    dense = results["dense_mlp"]
    for name in dispatchers:
        r = results[name]
        r["flops_ratio"] = sig(r["flops"] / dense["flops"])
        r["bytes_ratio"] = sig(r["bytes_accessed"] / dense["bytes_accessed"])
    return {
        "topology": topology,
        "device_kind": mesh.devices.flat[0].device_kind,
        "jax": jax.__version__,
        "shape": shape.as_dict(),
        "results": results,
    }


def main(argv=None) -> dict:
    parser = moe_layer.arg_parser()
    parser.add_argument("--topology", default="v5p:2x2x1", help="TPU topology (one chip used)")
    parser.set_defaults(dispatchers=",".join(TPU_DISPATCHERS), dtype="bfloat16")
    args = parser.parse_args(argv)
    report = run(
        moe_layer.shape_from_args(args),
        args.topology,
        [n for n in args.dispatchers.split(",") if n and n not in args.skip.split(",")],
    )
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
