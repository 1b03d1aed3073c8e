"""Decoder-only Transformer LM whose FFN layers are dense SwiGLU or MoE, chosen per layer.

    embed -> [Block] x L -> RMSNorm -> logits
    Block: x += Attention(norm(x)); x += FFN(norm(x)),  FFN = DenseMLP | MoELayer

Layers are stacked with `nn.scan` (parameters get a leading `layers` axis) so compile time
does not grow with depth: one scan over the `first_k_dense` dense layers, then one scan over
the MoE part, whose unit is a single MoE block (`moe_every=1`) or a period of
`moe_every - 1` dense blocks (an inner scan) followed by one MoE block. The scan carry is
`(x, router_state)` so a recurrent router (RMoE) can pass its state from layer to layer;
model-level router parameters (RMoE's shared GRU cell) are broadcast to every layer with the
context. Optional rematerialisation (`model.remat`) wraps each block. `model.scan_layers=False`
unrolls the same stacks into a Python loop (layers named `<stack>_<i>`; `unscan_params`
converts scanned parameters to that layout), computing the same function. Attention is GQA
or DeepSeek's MLA (`model.attention`); `decode=True` gives every attention layer a key/value
cache in the `cache` collection (`moejax.generate`).

`apply(variables, inputs[B, L], segment_ids, positions)` takes `variables = {"params": ...}`,
plus `"router_bias": ...` (stacked per-expert biases [layers, E]) for DeepSeek-V3's
`sigmoid_bias` routing, and returns float32 logits [B, L, V] and
`extras`: `aux_loss` (scalar, already weighted), `aux_losses` (name -> scalar summed over
layers; LoRA expert routers' as `lora_<name>`), `moe_metrics` (name -> array with a leading
MoE-layer axis), `routing` (per-token decisions `[num_moe_layers, B, L]`: `top1_expert`,
`experts_per_token`), `lora_metrics` (name -> scalar, the adapter routers' statistics
averaged over adapters and layers) and `lora_load` (bias path -> load, for the sign rule
of `moejax.lora.balance`). Adapters report these through `moejax.lora.collect`, which every
block opens around its body. With `lora.method="xlora"` the stacks run twice: once without
adapters (X-LoRA's scaling pass), then with the classifier's scalings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora import collect
from moejax.lora.config import LoRAConfig
from moejax.lora.xlora import XLoRAClassifier
from moejax.models.attention import Attention
from moejax.models.config import ModelConfig
from moejax.models.layers import DenseMLP, RMSNorm, dtype_of, logical_param
from moejax.models.mla import MLAttention
from moejax.moe.config import MoEConfig
from moejax.moe.layer import MoELayer
from moejax.moe.routers import initial_router_state, shared_router_params

ACTIVATION_AXES = ("batch", "length", "act_embed")  # logical names of the residual stream
SCANNED_STACKS = ("dense_layers", "moe_layers", "moe_periods", "dense")
ATTENTION = {"gqa": Attention, "mla": MLAttention}

REMAT = {
    "full": None,  # save nothing; recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    model: ModelConfig
    moe: MoEConfig | None = None  # None: dense FFN
    decode: bool = False  # attention keeps a key/value cache (moejax.generate)
    lora: LoRAConfig | None = None  # adapters on the targeted projections (moejax.lora)

    def __call__(self, carry, ctx):
        with collect.block_scope(xlora_scalings=ctx[3], token_mask=ctx[0] > 0) as adapters:
            carry, outputs = self._body(carry, ctx)
        return carry, outputs + (collect.block_outputs(adapters),)

    @nn.compact
    def _body(self, carry, ctx):
        x, router_state = carry
        # The residual stream is split over the batch axes only: FSDP then gathers weights
        # rather than partial products (a no-op outside moejax.sharding.activation_rules).
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        segment_ids, positions, shared_router, _ = ctx
        m = self.model
        norm = dict(eps=m.norm_eps, dtype=m.dtype, param_dtype=m.param_dtype)
        attn = ATTENTION[m.attention](m, self.decode, self.lora, name="attn")
        h = attn(RMSNorm(**norm, name="attn_norm")(x), segment_ids, positions)
        x = x + h.astype(x.dtype)
        h = RMSNorm(**norm, name="ffn_norm")(x)
        if self.moe is None:
            out_std = m.init_std / (2 * m.num_layers) ** 0.5
            y = DenseMLP(
                m.d_ff, m.init_std, out_std, m.dtype, m.param_dtype, self.lora, name="mlp"
            )(h)
            outputs = ({}, {}, {})
        else:
            y, router_state, aux, metrics, per_token = MoELayer(self.moe, m, self.lora, name="moe")(
                h, router_state, segment_ids > 0, shared_router
            )
            outputs = (aux, metrics, per_token)
        return (x + y.astype(x.dtype), router_state), outputs


def _block_cls(model: ModelConfig):
    if model.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT[model.remat], prevent_cse=False)


def _scan(cls, length: int):
    # Every collection (params, a router's non-trainable state, the decoding cache) is
    # stacked along the layer axis.
    return nn.scan(
        cls,
        variable_axes={True: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def _stack(
    cls,
    length: int,
    model: ModelConfig,
    moe: MoEConfig | None,
    name: str,
    decode: bool = False,
    lora: LoRAConfig | None = None,
    first_layer: int = 0,
):
    """`length` blocks as one scanned module `name`, or (`scan_layers=False`) a loop over
    modules `name_0 .. name_{length-1}`; either way `(carry, ctx) -> (carry, stacked outputs)`.
    Must be called inside a compact method (the loop's modules bind to the caller).
    Unrolled blocks get their layer's LoRA config (MoLA's per-layer expert counts;
    `first_layer` is the model layer of block 0), and their adapter loads (keyed by their
    own paths) are merged rather than stacked."""
    if model.scan_layers:
        return _scan(cls, length)(model, moe, decode, lora, name=name)
    blocks = [
        cls(
            model,
            moe,
            decode,
            lora if lora is None else lora.for_layer(first_layer + i, model.num_layers),
            name=f"{name}_{i}",
        )
        for i in range(length)
    ]

    def run(carry, ctx):
        outputs, loads = [], {}
        for block in blocks:
            carry, out = block(carry, ctx)
            loads.update(out[-1]["load"])
            outputs.append(out[:-1] + ({**out[-1], "load": {}},))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
        return carry, stacked[:-1] + ({**stacked[-1], "load": loads},)

    return run


def unscan_params(params: Any) -> Any:
    """Scanned parameters (stacks with a leading layer axis) -> the `scan_layers=False`
    layout (one entry `<stack>_<i>` per layer), recursively for nested stacks."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key in SCANNED_STACKS and isinstance(value, dict):
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"{key}_{i}"] = unscan_params(jax.tree.map(lambda a, i=i: a[i], value))
        else:
            out[key] = unscan_params(value)
    return out


def scanned_abstract(abstract: Any) -> Any:
    """The scanned-layer layout of an unrolled (`model.scan_layers=False`) abstract tree:
    entries `<stack>_<i>` stacked back into `<stack>` with a leading layer axis (the inverse of
    `unscan_params`, on shapes only: to restore a scanned checkpoint for unrolled layers)."""
    if not isinstance(abstract, dict):
        return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype)
    out, groups = {}, {}
    for key, value in abstract.items():
        stack, _, index = key.rpartition("_")
        if stack in SCANNED_STACKS and index.isdigit():
            groups.setdefault(stack, {})[int(index)] = scanned_abstract(value)
        else:
            out[key] = scanned_abstract(value)
    for stack, layers in groups.items():
        ordered = [layers[i] for i in range(len(layers))]
        out[stack] = jax.tree.map(
            lambda *xs: jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype), *ordered
        )
    return out


class MoEPeriod(nn.Module):
    """`moe_every - 1` dense blocks followed by one MoE block: the unit of the MoE scan."""

    model: ModelConfig
    moe: MoEConfig
    decode: bool = False
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, carry, ctx):
        block = _block_cls(self.model)
        carry, dense_out = _stack(
            block, self.model.moe_every - 1, self.model, None, "dense", self.decode, self.lora
        )(carry, ctx)
        carry, out = block(self.model, self.moe, self.decode, self.lora, name="moe_block")(
            carry, ctx
        )
        # The dense blocks' adapter losses and metrics join the MoE block's.
        inner, lora_out = dense_out[-1], out[-1]
        lora_out = {
            "aux": {
                k: lora_out["aux"].get(k, 0.0) + jnp.sum(inner["aux"].get(k, 0.0))
                for k in set(lora_out["aux"]) | set(inner["aux"])
            },
            "metrics": {
                k: (v + jnp.sum(inner["metrics"][k])) / (1 + inner["metrics"][k].size)
                if k in inner["metrics"]
                else v
                for k, v in lora_out["metrics"].items()
            },
            "load": {**inner["load"], **lora_out["load"]},
        }
        return carry, out[:-1] + (lora_out,)


class Transformer(nn.Module):
    model: ModelConfig
    moe: MoEConfig
    decode: bool = False  # keep a key/value cache in the `cache` collection (moejax.generate)
    lora: LoRAConfig | None = None  # low-rank adapters (moejax.lora); None or "none": off

    @nn.compact
    def __call__(
        self,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        m = self.model
        b, length = inputs_BxL.shape
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((b, length), jnp.int32)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        pdt, dt = dtype_of(m.param_dtype), dtype_of(m.dtype)
        # Untied: unit-variance rows (the first RMSNorm rescales them anyway). Tied: the table
        # is also the output projection, so it starts at init_std to keep logits O(1).
        embed_std = m.init_std if m.tie_embeddings else 1.0
        embedding = logical_param(
            self, "embedding", (m.vocab_size, m.d_model), ("vocab", "embed"), embed_std, pdt
        )
        x = jnp.take(embedding, inputs_BxL, axis=0).astype(dt)
        router_state, shared_router = None, None
        if m.num_moe_layers:
            router_state = initial_router_state(self.moe, b * length)
            shared_router = shared_router_params(self.moe, m.init_std, m.param_dtype)
        block = _block_cls(m)
        stacks = []  # (stack, whether its blocks are MoE)
        num_dense_prefix = m.num_layers if m.moe_every == 0 else m.first_k_dense
        if num_dense_prefix:
            stacks.append(
                (
                    _stack(
                        block, num_dense_prefix, m, None, "dense_layers", self.decode, self.lora
                    ),
                    False,
                )
            )
        if m.num_moe_layers:
            if m.moe_every == 1:
                stacks.append(
                    (
                        _stack(
                            block,
                            m.num_moe_layers,
                            m,
                            self.moe,
                            "moe_layers",
                            self.decode,
                            self.lora,
                            first_layer=m.first_k_dense,
                        ),
                        True,
                    )
                )
            else:
                stacks.append(
                    (
                        _stack(
                            MoEPeriod,
                            m.num_moe_layers,
                            m,
                            self.moe,
                            "moe_periods",
                            self.decode,
                            self.lora,
                        ),
                        True,
                    )
                )
        final_norm = RMSNorm(m.norm_eps, m.dtype, m.param_dtype, name="final_norm")

        def run(scalings):
            ctx = (segment_ids_BxL, positions_BxL, shared_router, scalings)
            carry = (x, router_state)
            moe_out, lora_outs = ({}, {}, {}), []
            for stack, is_moe in stacks:
                carry, out = stack(carry, ctx)
                lora_outs.append(out[-1])
                if is_moe:
                    moe_out = out[:-1]
            return (
                final_norm(nn.with_logical_constraint(carry[0], ACTIVATION_AXES)),
                moe_out,
                lora_outs,
            )

        xlora = self.lora is not None and self.lora.method == "xlora"
        if xlora and self.decode:
            raise ValueError(
                "lora.method='xlora' runs the model twice per call, which the "
                "decoding cache does not support; merge or drop the adapters "
                "to decode."
            )
        if xlora:  # X-LoRA: a pass without adapters (scalings 0) feeds the classifier
            hidden, _, _ = run(jnp.zeros((b, length, self.lora.num_experts), jnp.float32))
            scalings = XLoRAClassifier(self.lora, m.param_dtype, name="lora_xlora_classifier")(
                jax.lax.stop_gradient(hidden)
            )
        h, (aux, metrics, per_token), lora_outs = run(scalings if xlora else None)
        aux = dict(aux)
        lora_metrics, lora_load = {}, {}
        for out in lora_outs:
            for k, v in out["aux"].items():
                aux[k] = jnp.sum(v) + (jnp.sum(aux[k]) if k in aux else 0.0)
            for k, v in out["metrics"].items():
                lora_metrics.setdefault(k, []).append(jnp.ravel(v))
            lora_load.update(out["load"])
        lora_metrics = {k: jnp.mean(jnp.concatenate(v)) for k, v in lora_metrics.items()}
        if m.tie_embeddings:
            logits = h @ embedding.astype(dt).T
        else:
            head = logical_param(
                self, "lm_head", (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std, pdt
            )
            logits = h @ head.astype(dt)
        aux_losses = {name: jnp.sum(v) for name, v in aux.items()}
        aux_loss = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
        extras = {
            "aux_loss": aux_loss,
            "aux_losses": aux_losses,
            "moe_metrics": metrics,
            "routing": per_token,
            "lora_metrics": lora_metrics,
            "lora_load": lora_load,
        }
        return logits.astype(jnp.float32), extras
