"""The splash attention kernel compiles for TPU (v5p:2x2x1, libtpu, nothing runs) inside the
`jax.shard_map` that `causal_attention` puts around it, and its memory is linear in L.

At L=4096 the compiled attention (value and gradient) per chip must need less temporary
memory than one chip's share of the [B, H, L, L] float32 scores that the "xla" path
materialises (about 785 MiB of temporaries for GQA there, 19 MiB here).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("libtpu", reason="the TPU-compile tests need the `tpu` extra")

from moejax.models.attention_kernels import causal_attention, resolve_impl  # noqa: E402
from moejax.sharding.config import MeshConfig  # noqa: E402
from moejax.sharding.mesh import make_mesh  # noqa: E402
from moejax.sharding.topology import tpu_devices  # noqa: E402

MOSAIC = "tpu_custom_call"
B, L, H = 4, 4096, 8


@pytest.mark.parametrize(
    "name, kv_heads, d_qk, d_v, data, tensor",
    [
        ("gqa", 2, 128, 128, 4, 1),  # batch over 4 chips
        ("mla", H, 192, 128, 4, 1),  # q/k 192 padded to 256; v 128
        ("gqa_heads_sharded", 2, 128, 128, 2, 2),  # batch over 2, heads over 2
    ],
)
def test_splash_attention_compiles_for_tpu_in_linear_memory(
    name, kv_heads, d_qk, d_v, data, tensor
):
    mesh = make_mesh(MeshConfig(data=data, tensor=tensor), devices=tpu_devices("v5p:2x2x1"))

    def loss(q, k, v, seg):
        with nn.logical_axis_rules([("heads", "tensor")]):
            assert resolve_impl("auto") == "splash"  # the TPU mesh's platform, not the host's
            out = causal_attention(q, k, v, seg, "flash")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    def spec(shape, dtype, pspec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))

    heads = P("data", None, "tensor", None)
    args = (
        spec((B, L, H, d_qk), jnp.bfloat16, heads),
        spec((B, L, kv_heads, d_qk), jnp.bfloat16, heads),
        spec((B, L, kv_heads, d_v), jnp.bfloat16, heads),
        spec((B, L), jnp.int32, P("data")),
    )
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    # the forward kernel, and the backward's dq and dkv kernels
    assert compiled.as_text().count(MOSAIC) >= 3
    scores_per_chip = (B // data) * (H // tensor) * L * L * 4  # 512 MiB
    assert compiled.memory_analysis().temp_size_in_bytes < scores_per_chip / 4
