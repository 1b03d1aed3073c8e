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

`floor`: two parts of the layer compiled alone: `routed_experts` (the routed SwiGLU on rows
already in expert order, the Mosaic grouped matmuls with their weight casts: no router,
permutation, combine or shared experts; `+fused`, gate and up as one product) and
`shared_experts` (the dense SwiGLU of the shared width). `floor.bytes_ratio` is their sum
over the dense layer: what the plans on the Mosaic grouped matmul (`auto`, `pallas`) cost
before any routing, which fusing the permutations into the kernels could approach but not
go under. (`capacity_einsum` runs XLA's batched matmuls instead, and drops.)
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
from moejax.sharding.topology import tpu_devices  # noqa: E402

TPU_DISPATCHERS = ("auto", "pallas", "capacity_einsum", "dense_reference")


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


def _floor_cases(shape: moe_layer.Shape, experts, x, rep) -> dict:
    """The routed experts alone (rows in expert order) and the shared experts alone."""
    rows = shape.tokens * shape.top_k
    x_sorted = jax.ShapeDtypeStruct((rows, shape.d_model), shape.dtype, sharding=rep)
    sizes = jax.ShapeDtypeStruct((shape.experts,), np.int32, sharding=rep)
    cases = {}
    for fused in (False, True):
        loss = moe_layer.experts_only_loss(shape, "pallas", fused)
        cases["routed_experts" + ("+fused" if fused else "")] = (
            jax.value_and_grad(loss, argnums=(0, 1)),
            (experts, x_sorted, sizes),
        )
    shared = moe_layer.shared_mlp(shape)
    params = jax.eval_shape(shared.init, jax.random.PRNGKey(0), x)["params"]
    cases["shared_experts"] = (moe_layer.fwd_bwd(moe_layer.dense_loss(shared)), (params, x))
    return cases


def run(shape: moe_layer.Shape, topology: str, dispatchers, floor: bool = True) -> dict:
    mesh = Mesh(np.array(tpu_devices(topology)[:1]), ("data",))
    rep = NamedSharding(mesh, P())
    model = moe_layer.model_config(shape)
    x = jax.ShapeDtypeStruct((shape.batch, shape.seq_len, shape.d_model), shape.dtype, sharding=rep)
    key = jax.random.PRNGKey(0)
    mlp = moe_layer.dense_mlp(shape, shape.dense_width)
    # name -> (the fwd+bwd function, its arguments): the dense layer, each dispatcher's
    # layer, then the floor's parts.
    params = lambda module: jax.eval_shape(module.init, key, x)["params"]  # noqa: E731
    cases = {"dense_mlp": (moe_layer.fwd_bwd(moe_layer.dense_loss(mlp)), (params(mlp), x))}
    for name in dispatchers:
        layer = MoELayer(moe_layer.moe_config(shape, name), model)
        cases[name] = (moe_layer.fwd_bwd(moe_layer.moe_loss(layer)), (params(layer), x))
    floor_cases = {}
    if floor:
        experts = params(MoELayer(moe_layer.moe_config(shape, "pallas"), model))["experts"]
        floor_cases = _floor_cases(shape, experts, x, rep)
    results = {}
    for name, (fn, args) in {**cases, **floor_cases}.items():
        args = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), nn.unbox(args)
        )
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
        results[name] = {**_cost(compiled), "compile_s": round(time.perf_counter() - t0, 2)}
        moe_layer.log(f"{name}: {results[name]}")
    dense = results["dense_mlp"]
    for name in [*dispatchers, *floor_cases]:
        r = results[name]
        r["flops_ratio"] = sig(r["flops"] / dense["flops"])
        r["bytes_ratio"] = sig(r["bytes_accessed"] / dense["bytes_accessed"])
    report_floor = {}
    if floor:
        shared = results["shared_experts"]["bytes_accessed"]
        for fused in ("", "+fused"):
            total = results["routed_experts" + fused]["bytes_accessed"] + shared
            report_floor["bytes" + fused] = total
            report_floor["bytes_ratio" + fused] = sig(total / dense["bytes_accessed"])
    return {
        "topology": topology,
        "device_kind": mesh.devices.flat[0].device_kind,
        "jax": jax.__version__,
        "shape": shape.as_dict(),
        "results": results,
        **({"floor": report_floor} if floor else {}),
    }


def main(argv=None) -> dict:
    parser = moe_layer.arg_parser()
    parser.add_argument("--topology", default="v5p:2x2x1", help="TPU topology (one chip used)")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the routed/shared experts compiled alone"
    )
    parser.set_defaults(dispatchers=",".join(TPU_DISPATCHERS), dtype="bfloat16")
    args = parser.parse_args(argv)
    report = run(
        moe_layer.shape_from_args(args),
        args.topology,
        [n for n in args.dispatchers.split(",") if n and n not in args.skip.split(",")],
        floor=not args.no_floor,
    )
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
