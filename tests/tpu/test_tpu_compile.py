"""Real XLA:TPU compiles on this CPU-only host (libtpu, the `tpu` extra; nothing runs):

- the Mosaic TPU kernels (`gmm`, its gradient with `tgmm`, the permute and unpermute+combine
  kernels with their VJPs) compile for v5p and v6e at several shapes, and the compiled HLO
  holds the Mosaic custom calls;
- the dispatchers that call Pallas kernels compile on 4 and 8 v5p chips, the kernels inside
  their `shard_map` (GSPMD cannot partition a Mosaic kernel: without it the compile fails);
- the expert-parallel `ragged_all_to_all` exchange is counted at its static bound;
- a tiny config's whole train step compiles for v5p:2x2x1 through the collective report,
  with the `pallas` dispatcher, and fits; unrolled, XLA's FLOP count matches the model's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from testing_utils import load_config_module

pytest.importorskip("libtpu", reason="the TPU-compile tests need the `tpu` extra")

import pallas_kernels  # noqa: E402
from moejax.config.validation import validate  # noqa: E402
from moejax.moe.config import MoEConfig  # noqa: E402
from moejax.moe.dispatch import AUTO_PLAN, dispatch  # noqa: E402
from moejax.moe.expert_parallel import buffer_rows  # noqa: E402
from moejax.moe.experts import swiglu_expert_fn  # noqa: E402
from moejax.moe.grouped_matmul import gmm as moe_gmm  # noqa: E402
from moejax.moe.routing import Routing  # noqa: E402
from moejax.sharding.config import MeshConfig  # noqa: E402
from moejax.sharding.hlo_collectives import collective_bytes  # noqa: E402
from moejax.sharding.mesh import make_mesh  # noqa: E402
from moejax.sharding.topology import tpu_devices  # noqa: E402
from moejax.train.collective_report import _extrapolated_cost, collective_report  # noqa: E402

MOSAIC = "tpu_custom_call"


def one_chip(topology):
    return Mesh(np.array(tpu_devices(topology)[:1]), ("data",))


def spec(shape, dtype, mesh, pspec=P()):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))


def compile_on(mesh, fn, *args):
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def test_the_tpu_auto_plan_takes_the_cheapest_grouped_matmul():
    """AUTO_PLAN's TPU gmm is the Mosaic kernel: compiled fwd+bwd at a DeepSeek-like shape it
    costs the dense FLOPs of its rows (3 matmuls of 2 M K N), while XLA:TPU lowers
    `ragged_dot` to a padded dense dot per group (many times more)."""
    assert AUTO_PLAN["tpu"] == ("ragged", "pallas")
    mesh = one_chip("v5p:2x2x1")
    m, k, n, g = 4096, 1024, 512, 32
    args = (
        spec((m, k), jnp.bfloat16, mesh),
        spec((g, k, n), jnp.bfloat16, mesh),
        spec((g,), jnp.int32, mesh),
    )
    flops = {}
    for impl in ("pallas", "ragged_dot"):

        def loss(x, w, sizes, impl=impl):
            return jnp.sum(moe_gmm(x, w, sizes, impl=impl).astype(jnp.float32) ** 2)

        compiled = compile_on(mesh, jax.value_and_grad(loss, argnums=(0, 1)), *args)
        cost = compiled.cost_analysis()
        flops[impl] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    dense = 3 * 2 * m * k * n
    assert dense <= flops["pallas"] < 1.1 * dense
    assert flops["ragged_dot"] > 5 * flops["pallas"]


@pytest.mark.parametrize(
    "topology, dtype, m, k, n, g",
    [
        ("v5p:2x2x1", jnp.bfloat16, 1024, 512, 256, 8),
        ("v6e:2x2", jnp.bfloat16, 2048, 768, 512, 16),
        pytest.param("v5p:2x2x1", jnp.float32, 384, 256, 384, 4, marks=pytest.mark.slow),
        pytest.param("v6e:2x2", jnp.bfloat16, 4096, 2048, 1408, 64, marks=pytest.mark.slow),
    ],
)
def test_gmm_and_its_gradient_compile_to_mosaic(topology, dtype, m, k, n, g):
    mesh = one_chip(topology)

    def loss(x, w, sizes):
        y = pallas_kernels.gmm(x, w, sizes, backend="auto", interpret=None)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    args = (spec((m, k), dtype, mesh), spec((g, k, n), dtype, mesh), spec((g,), jnp.int32, mesh))
    compiled = compile_on(mesh, jax.value_and_grad(loss, argnums=(0, 1)), *args)
    # gmm forward, gmm for d lhs (the transposed-rhs kernel), tgmm for d rhs.
    assert compiled.as_text().count(MOSAIC) >= 3
    assert compiled.cost_analysis()["flops"] >= 3 * 2 * m * k * n


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_permute_and_combine_with_vjps_compile_to_mosaic(topology):
    mesh = one_chip(topology)
    t, kk, d, e = 256, 2, 512, 8

    def loss(x, w, ids):
        from moejax.moe.permute import sort_by_expert

        order, inverse, _ = sort_by_expert(ids, e)
        rows = pallas_kernels.permute(x, order, inverse, kk, backend="auto", interpret=None)
        y = pallas_kernels.unpermute_combine(
            rows * 2.0, order, inverse, w, backend="auto", interpret=None
        )
        return jnp.sum(y.astype(jnp.float32) ** 2)

    args = (
        spec((t, d), jnp.bfloat16, mesh),
        spec((t, kk), jnp.float32, mesh),
        spec((t, kk), jnp.int32, mesh),
    )
    compiled = compile_on(mesh, jax.value_and_grad(loss, argnums=(0, 1)), *args)
    # permute, combine; their VJPs: combine (for permute) and gather (for combine).
    assert compiled.as_text().count(MOSAIC) >= 4


E, K, D, F, T = 8, 2, 256, 512, 1024


def compile_dispatch(topology, mesh_sizes, dispatcher, extra):
    """The HLO of dispatch's value and gradients on `topology`'s chips under `mesh_sizes`."""
    devices = tpu_devices(topology)
    sizes = dict(data=1, fsdp=1, expert=1, tensor=1) | mesh_sizes
    mesh = make_mesh(MeshConfig(**sizes), devices=devices)
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=F, dispatcher=dispatcher, **extra)
    tokens = P(("data", "fsdp", "expert"))

    def loss(x, wg, wu, wd, ids, w):
        y, _ = dispatch(x, Routing(ids, w, {}, {}), swiglu_expert_fn(wg, wu, wd), cfg)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    experts = P("expert") if "expert" in mesh_sizes else P()
    args = (
        spec((T, D), jnp.bfloat16, mesh, tokens),
        spec((E, D, F), jnp.bfloat16, mesh, experts),
        spec((E, D, F), jnp.bfloat16, mesh, experts),
        spec((E, F, D), jnp.bfloat16, mesh, experts),
        spec((T, K), jnp.int32, mesh, tokens),
        spec((T, K), jnp.float32, mesh, tokens),
    )
    compiled = compile_on(mesh, jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 5)), *args)
    return compiled.as_text()


@pytest.mark.parametrize(
    "topology, mesh_sizes, dispatcher, extra",
    [
        ("v5p:2x2x1", dict(data=2, fsdp=2), "pallas", {}),
        ("v5p:2x2x1", dict(fsdp=2, expert=2), "expert_parallel", dict(gmm_impl="pallas")),
        ("v5p:2x2x2", dict(fsdp=2, expert=4), "fssdp", dict(gmm_impl="pallas", fssdp_slots=1)),
        pytest.param("v5p:2x2x2", dict(data=2, fsdp=4), "pallas", {}, marks=pytest.mark.slow),
        pytest.param(
            "v5p:2x2x2",
            dict(fsdp=2, expert=4),
            "expert_parallel",
            dict(gmm_impl="pallas"),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "v5p:2x2x2", dict(data=8), "ragged", dict(gmm_impl="pallas"), marks=pytest.mark.slow
        ),
    ],
)
def test_kernel_dispatchers_compile_on_several_chips(topology, mesh_sizes, dispatcher, extra):
    hlo = compile_dispatch(topology, mesh_sizes, dispatcher, extra)
    assert hlo.count(MOSAIC) >= 9  # 3 grouped matmuls, each with 2 backward kernels
    if dispatcher in ("expert_parallel", "fssdp"):
        assert "all-to-all" in hlo


def test_ragged_exchange_is_counted_at_its_static_bound():
    """EP with `ep_exchange=ragged` on 4 v5p chips: the report's parser counts the
    `ragged-all-to-all`s (out and back, forward and backward) at their buffer size."""
    hlo = compile_dispatch(
        "v5p:2x2x1", dict(fsdp=2, expert=2), "expert_parallel", dict(ep_exchange="ragged")
    )
    out = collective_bytes(hlo)["ragged-all-to-all"]
    # Dropless buffers: each of the P = 2 destinations can take all T_local k rows.
    t_local, p = T // 4, 2
    rows = p * buffer_rows(t_local, K, p, 0.0)
    assert out["count"] >= 4
    assert out["bytes"] >= 4 * rows * D * 2  # at least the four bf16 activation exchanges
    assert out["wire_bytes"] == pytest.approx(out["bytes"] / 2, rel=1e-6)  # (n-1)/n, n = 2


def test_tiny_config_train_step_compiles_and_fits_on_v5p(tiny_corpus_dir):
    config = load_config_module("deepseekmoe").get_config()
    config.moe.dispatcher = "pallas"
    config.data.data_dir = tiny_corpus_dir
    report = collective_report(config, topology="v5p:2x2x1", unroll_layers=True)
    assert report["platform"] == "tpu" and report["devices"] == 4
    assert report["topology"] == {"name": "v5p:2x2x1", "num_slices": 1}
    assert report["dispatch_plan"]["dispatcher"] == "pallas"
    assert report["fits_hbm"] and 0 < report["peak_bytes"] < report["hbm_bytes"]
    # Every layer compiled (no scan): XLA's count covers the model's matmul FLOPs. Attention
    # runs the splash kernel (model.attention_impl="auto" on TPU), a Mosaic custom call
    # without a cost estimate, so the report adds the model's attention FLOPs itself.
    assert report["cost"]["per_step"] and report["cost"]["method"] == "unrolled"
    assert report["cost"]["attention_flops_added"] > 0
    assert report["cost"]["flops"] > 0.9 * report["model_flops_per_chip"] > 0
    assert 0 < report["mfu_bound"] <= 1
    # The default for scanned layers: the step cut to 1 and 2 periods (2 and 3 of its 4
    # layers), extrapolated to 3 periods, gives the unrolled step's count.
    s = validate(config, num_devices=4)
    cost = _extrapolated_cost(config, s, tpu_devices("v5p:2x2x1"))
    assert cost["method"] == "extrapolated" and cost["periods"] == 3
    xla_flops = report["cost"]["flops"] - report["cost"]["attention_flops_added"]
    assert cost["flops"] == pytest.approx(xla_flops, rel=0.01)
    assert cost["bytes_accessed"] == pytest.approx(report["cost"]["bytes_accessed"], rel=0.1)
    # Data parallel on 4 chips: the gradients are all-reduced.
    assert report["collectives"]["all-reduce"]["bytes"] > 0
