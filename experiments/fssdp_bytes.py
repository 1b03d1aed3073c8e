"""Compiled bytes of FSSDP's sparse all-gather on v5p topologies (Hecate, arXiv 2502.02581).

`python -m experiments.fssdp_bytes [--chips 8,32,128] [--out FILE]` compiles, for the
compile-only devices of a v5p slice with P chips on the `expert` axis (libtpu's topology
description; nothing runs), the forward and backward of ONE MoE layer's dispatch (the
`fssdp` and `expert_parallel` dispatchers on the same routing, E = 2P experts) and reads the
bytes of every collective from the compiled HLO (`moejax.sharding.hlo_collectives`;
ragged-all-to-all at its static bound, its output buffer: what the compiled program can
move at most).

FSSDP's weight traffic is what FSSDP adds to expert parallelism (same token exchange,
same loads): `fssdp - expert_parallel` bytes, per device per step. For each P it is
compared with Hecate's closed form for the sparse exchange, (S + R) expert weight sets
(S slots received forward; the R-row send buffer an owner receives the slots' gradients
into backward; R = `moe.fssdp_max_sends`), and with the padded all_to_all's 2 P S sets
(`ep_exchange=padded`, compiled in the same run). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from moejax.moe.config import MoEConfig
from moejax.moe.dispatch import dispatch
from moejax.moe.expert_parallel import max_sends as sends_bound
from moejax.moe.experts import swiglu_expert_fn
from moejax.moe.routing import Routing
from moejax.sharding.config import MeshConfig
from moejax.sharding.hlo_collectives import KINDS, collective_bytes
from moejax.sharding.mesh import make_mesh
from moejax.sharding.topology import tpu_devices

TOPOLOGIES = {
    4: "v5p:2x2x1",
    8: "v5p:2x2x2",
    16: "v5p:2x2x4",
    32: "v5p:2x4x4",
    64: "v5p:4x4x4",
    128: "v5p:4x4x8",
}
D, F, K = 256, 512, 2  # model dim, expert hidden dim, top-k
TOKENS_PER_DEVICE = 64


def compiled_bytes(
    mesh, p: int, dispatcher: str, exchange: str, slots: int, max_sends: int, d: int, f: int
):
    """{kind: bytes} of one layer's dispatch, forward + backward, compiled for `mesh`."""
    e, t = 2 * p, TOKENS_PER_DEVICE * p
    cfg = MoEConfig(
        num_experts=e,
        top_k=K,
        d_expert=F,
        dispatcher=dispatcher,
        fssdp_slots=slots,
        fssdp_max_sends=max_sends,
        ep_exchange=exchange,
        gmm_impl="ragged_dot",
    )
    tok = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    exp = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    args = (
        jax.ShapeDtypeStruct((t, d), jnp.bfloat16, sharding=tok),
        jax.ShapeDtypeStruct((t, K), jnp.int32, sharding=tok),
        jax.ShapeDtypeStruct((t, K), jnp.float32, sharding=tok),
        tuple(jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=exp) for s in shapes),
    )

    def loss(x, ids, w, params):
        y, _ = dispatch(x, Routing(ids, w, {}, {}), swiglu_expert_fn(*params), cfg)
        return jnp.sum(y.astype(jnp.float32))

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 3))).lower(*args).compile().as_text()
    out = collective_bytes(hlo)
    return {k: out[k]["bytes"] for k in KINDS if out[k]["bytes"]}


def measure(
    p: int, slots: int, max_sends: int, exchanges=("ragged", "padded"), d: int = D, f: int = F
) -> dict:
    """One row: per exchange, the compiled bytes of EP and FSSDP and FSSDP's weight traffic
    (the growth of the collective that carries the weights: ragged-all-to-all / all-to-all),
    next to the closed forms (S + R) and 2 P S expert weight sets."""
    devices = tpu_devices(TOPOLOGIES[p])
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, expert=p, tensor=1), devices=devices)
    expert_set = 3 * d * f * 2  # bytes of one expert's weights (bf16)
    r = sends_bound(MoEConfig(num_experts=2 * p, fssdp_max_sends=max_sends), p, slots)
    row = {"P": p, "S": slots, "R": r, "expert_set_bytes": expert_set}
    closed = {"ragged": slots + r, "padded": 2 * p * slots}
    for exchange in exchanges:
        kind = "ragged-all-to-all" if exchange == "ragged" else "all-to-all"
        ep = compiled_bytes(mesh, p, "expert_parallel", exchange, 0, 0, d, f)
        fs = compiled_bytes(mesh, p, "fssdp", exchange, slots, max_sends, d, f)
        weight = fs.get(kind, 0) - ep.get(kind, 0)
        row[exchange] = {
            "ep_bytes": ep,
            "fssdp_bytes": fs,
            "weight_bytes": weight,
            "weight_sets": weight / expert_set,
            "closed_form_sets": closed[exchange],
            "other_extra_bytes": sum(fs.values()) - sum(ep.values()) - weight,
        }
    if len(exchanges) == 2:
        row["padded_over_ragged"] = row["padded"]["weight_bytes"] / row["ragged"]["weight_bytes"]
    return row


def main(argv) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", default="8,32,128")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--max_sends", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = [measure(int(p), args.slots, args.max_sends) for p in args.chips.split(",")]
    text = json.dumps({"rows": rows}, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
