"""Decoder-only Transformer LM whose FFN layers are dense SwiGLU or MoE, chosen per layer.

    embed -> [Block] x L -> RMSNorm -> logits
    Block: x += Attention(norm(x)); x += FFN(norm(x)),  FFN = DenseMLP | MoELayer

Layers are stacked with `nn.scan` (parameters get a leading `layers` axis) so compile time
does not grow with depth: one scan over the `first_k_dense` dense layers, then one scan over
the MoE part, whose unit is a single MoE block (`moe_every=1`) or a period of
`moe_every - 1` dense blocks (an inner scan) followed by one MoE block. A per-layer layout
(`model.layer_kinds`) that is not of that form is stacked as its runs of identical
consecutive layers (`ModelConfig.layer_runs`), run r one scan `runs_<r>`; its MoE layers
may differ in expert count E_l and top-k k_l (`moejax.models.config.layer_moe_config`).
The routing outputs of the MoE runs are concatenated along the MoE-layer axis; where runs
differ in shape (per-token `expert_ids` / `combine_weights` [.., k_l], per-expert metrics
[.., E_l]) each is zero-padded at the end of every axis to the largest, so a padded slot
has combine weight 0 (unused, as in the routers' own output) and a padded expert has
zero load. The scan carry is
`(x, router_state)` so a recurrent router (RMoE) can pass its state from layer to layer;
the per-call inputs every block reads (segment ids, positions, model-level router
parameters such as RMoE's shared GRU cell, adapter scalings) travel as one `BlockContext`,
and each block returns a `BlockOutput` (aux losses, metrics, per-token routing), stacked
over layers by the scan. Optional rematerialisation (`model.remat`) wraps each block.
`model.scan_layers=False` unrolls the same stacks into a Python loop (layers named
`<stack>_<i>`; `unscan_params` converts scanned parameters to that layout), computing the
same function. Attention is GQA or DeepSeek's MLA (`model.attention`); `decode=True` gives
every attention layer a key/value cache in the `cache` collection (`moejax.generate`).

`apply(variables, inputs[B, L], segment_ids, positions)` takes `variables = {"params": ...}`
plus the model's non-trainable collections (`moejax.nn.collections`: DeepSeek-V3's
`router_bias`, the adapters' `lora_bias` / `lora_frozen`), and returns float32 logits
[B, L, V] (with `return_hidden=True` instead the final normed hidden states and the output
projection, which `moejax.train.chunked_loss` projects a chunk of tokens at a time) and
`extras`: `aux_loss` (scalar, already weighted), `aux_losses` (name -> scalar
summed over layers), `moe_metrics` (name -> array with a leading MoE-layer axis) and
`routing` (per-token decisions with a leading MoE-layer axis: `top1_expert`,
`experts_per_token`, `router_entropy` `[num_moe_layers, B, L]`, `expert_ids`,
`combine_weights` `[num_moe_layers, B, L, k]`; `moejax.moe.layer.MoEOutput`). Adapters
(`adapters`, a `moejax.nn.adapter_hook.AdapterHook`) sow their losses, metrics and loads;
`moejax.models.side_outputs.apply_model` applies the model with those collections mutable
and adds them to `extras`. With X-LoRA the hook runs the
stacks once more to compute its scalings; decoding, that pass keeps its own key/value cache
(variables prefixed `scaling_`), so X-LoRA decodes with the cache too.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax.models.attention import Attention
from moejax.models.config import ModelConfig, layer_moe_config
from moejax.models.mla import MLAttention
from moejax.moe.config import MoEConfig
from moejax.moe.layer import MoELayer
from moejax.moe.routers import initial_router_state, shared_router_params
from moejax.nn.adapter_hook import AdapterContext, AdapterHook
from moejax.nn.mlp import DenseMLP
from moejax.nn.norm import RMSNorm
from moejax.nn.params import dtype_of, logical_param
from moejax.nn.projection import project

ACTIVATION_AXES = ("batch", "length", "act_embed")  # logical names of the residual stream
SCANNED_STACKS = ("dense_layers", "moe_layers", "moe_periods", "dense")
RUN_STACK = re.compile(r"runs_\d+")  # the stacks of a per-layer layout (`layer_runs`)
SCALING_PASS_CACHE = "scaling_"  # the decoding cache of X-LoRA's no-adapter pass


def is_stack(name: str) -> bool:
    """Whether `name` is a scanned stack of blocks (a key with a leading layer axis)."""
    return name in SCANNED_STACKS or RUN_STACK.fullmatch(name) is not None


ATTENTION = {"gqa": Attention, "mla": MLAttention}

REMAT = {
    "full": None,  # save nothing; recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class BlockContext:
    """What every block of one forward pass reads (broadcast to the scanned layers).

    segment_ids, positions: int32[B, L]; shared_router: model-level router parameters
    (RMoE's shared GRU cell) or None; scalings: the adapters' per-token scalings [B, L, E]
    (X-LoRA) or None; cache_prefix: the decoding-cache variables of this pass
    (`AdapterContext.cache_prefix`).
    """

    segment_ids: jax.Array
    positions: jax.Array
    shared_router: Any = None
    scalings: jax.Array | None = None
    cache_prefix: str = flax.struct.field(pytree_node=False, default="")


@flax.struct.dataclass
class BlockOutput:
    """What a block returns besides its carry; stacked over layers by the scan. Empty for
    dense blocks. aux_losses: name -> weighted scalar; metrics: name -> array; per_token:
    `top1_expert`, `experts_per_token` int32[B, L]."""

    aux_losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    per_token: dict[str, jax.Array]


class Block(nn.Module):
    model: ModelConfig
    moe: MoEConfig | None = None  # None: dense FFN
    decode: bool = False  # attention keeps a key/value cache (moejax.generate)
    adapters: AdapterHook | None = None  # low-rank adapters (moejax.nn.adapter_hook)

    @nn.compact
    def __call__(self, carry, ctx: BlockContext):
        x, router_state = carry
        # The residual stream is split over the batch axes only: FSDP then gathers weights
        # rather than partial products (a no-op outside moejax.sharding.activation_rules).
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        adapter_ctx = AdapterContext(ctx.segment_ids > 0, ctx.scalings, ctx.cache_prefix)
        m = self.model
        norm = dict(eps=m.norm_eps, dtype=m.dtype, param_dtype=m.param_dtype)
        attn = ATTENTION[m.attention](m, self.decode, self.adapters, name="attn")
        h = attn(RMSNorm(**norm, name="attn_norm")(x), ctx.segment_ids, ctx.positions, adapter_ctx)
        x = x + h.astype(x.dtype)
        h = RMSNorm(**norm, name="ffn_norm")(x)
        if self.moe is None:
            out_std = m.init_std / (2 * m.num_layers) ** 0.5
            y = DenseMLP(
                m.d_ff, m.init_std, out_std, m.dtype, m.param_dtype, self.adapters, name="mlp"
            )(h, adapter_ctx)
            output = BlockOutput({}, {}, {})
        else:
            moe = MoELayer(self.moe, m, self.adapters, name="moe")(
                h, router_state, ctx.segment_ids > 0, ctx.shared_router, adapter_ctx
            )
            y, router_state = moe.y, moe.router_state
            output = BlockOutput(moe.aux_losses, moe.metrics, moe.per_token)
        return (x + y.astype(x.dtype), router_state), output


def _block_cls(model: ModelConfig):
    if model.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT[model.remat], prevent_cse=False)


# The logical axis of a stack of blocks, and of the dense blocks stacked inside each MoE
# period (`moe_every > 1`): a parameter of those has both, so they need different names.
LAYERS = "layers"
PERIOD_LAYERS = "period_layers"


def _scan(cls, length: int, axis: str = LAYERS):
    # Every collection (params, non-trainable state, sown side outputs, the decoding cache)
    # is stacked along the layer axis, named `axis` for the sharding rules.
    return nn.scan(
        cls,
        variable_axes={True: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,),
        length=length,
        metadata_params={nn.PARTITION_NAME: axis},
    )


def _stack(
    cls,
    length: int,
    model: ModelConfig,
    moe: MoEConfig | None,
    name: str,
    decode: bool = False,
    adapters: AdapterHook | None = None,
    first_layer: int = 0,
    axis: str = LAYERS,
):
    """`length` blocks as one scanned module `name`, or (`scan_layers=False`) a loop over
    modules `name_0 .. name_{length-1}`; either way `(carry, ctx) -> (carry, stacked outputs)`.
    Must be called inside a compact method (the loop's modules bind to the caller).
    Unrolled blocks get their layer's adapter hook (MoLA's per-layer expert counts;
    `first_layer` is the model layer of block 0). `axis` names the stacked axis."""
    if model.scan_layers:
        return _scan(cls, length, axis)(model, moe, decode, adapters, name=name)
    blocks = [
        cls(
            model,
            moe,
            decode,
            None if adapters is None else adapters.for_layer(first_layer + i, model.num_layers),
            name=f"{name}_{i}",
        )
        for i in range(length)
    ]

    def run(carry, ctx):
        outputs = []
        for block in blocks:
            carry, out = block(carry, ctx)
            outputs.append(out)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)

    return run


def unscan_params(params: Any) -> Any:
    """Scanned parameters (stacks with a leading layer axis) -> the `scan_layers=False`
    layout (one entry `<stack>_<i>` per layer), recursively for nested stacks."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if is_stack(key) and isinstance(value, dict):
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
        if is_stack(stack) and index.isdigit():
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
    adapters: AdapterHook | None = None

    @nn.compact
    def __call__(self, carry, ctx: BlockContext):
        block = _block_cls(self.model)
        carry, _ = _stack(
            block,
            self.model.periodic[1] - 1,
            self.model,
            None,
            "dense",
            self.decode,
            self.adapters,
            axis=PERIOD_LAYERS,  # inside the period scan's `layers` axis
        )(carry, ctx)  # dense blocks return empty outputs
        return block(self.model, self.moe, self.decode, self.adapters, name="moe_block")(carry, ctx)


def _stacks(block, m: ModelConfig, moe: MoEConfig, decode: bool, adapters):
    """The model's stacks in layer order, each `(stack, whether its blocks are MoE)`; must be
    called inside the Transformer's compact method."""
    stacks = []
    if m.periodic is None:  # a per-layer layout: one scan per run of identical layers
        for r, (kind, start, length) in enumerate(m.layer_runs):
            cfg = layer_moe_config(kind, moe) if kind.moe else None
            run = _stack(block, length, m, cfg, f"runs_{r}", decode, adapters, first_layer=start)
            stacks.append((run, kind.moe))
        return stacks
    first_k, every = m.periodic
    num_dense_prefix = m.num_layers if every == 0 else first_k
    if num_dense_prefix:
        stacks.append(
            (_stack(block, num_dense_prefix, m, None, "dense_layers", decode, adapters), False)
        )
    if m.num_moe_layers:
        if every == 1:
            moe_stack = _stack(
                block, m.num_moe_layers, m, moe, "moe_layers", decode, adapters, first_k
            )
        else:
            moe_stack = _stack(MoEPeriod, m.num_moe_layers, m, moe, "moe_periods", decode, adapters)
        stacks.append((moe_stack, True))
    return stacks


def _concat_layers(outputs: list[BlockOutput]) -> BlockOutput:
    """The stacked outputs of several MoE stacks as one, concatenated along the leading
    MoE-layer axis; arrays that differ in shape between stacks are zero-padded at the end of
    each axis to the largest (see the module docstring)."""
    if len(outputs) == 1:
        return outputs[0]

    def cat(*xs):
        shape = tuple(max(sizes) for sizes in zip(*(x.shape for x in xs)))
        padded = [
            jnp.pad(x, [(0, 0)] + [(0, t - n) for t, n in zip(shape[1:], x.shape[1:])]) for x in xs
        ]
        return jnp.concatenate(padded, axis=0)

    return jax.tree.map(cat, *outputs)


class Transformer(nn.Module):
    model: ModelConfig
    moe: MoEConfig
    decode: bool = False  # keep a key/value cache in the `cache` collection (moejax.generate)
    # Low-rank adapters (moejax.lora.hook.adapters_for(config.lora)); None: none.
    adapters: AdapterHook | None = None

    @nn.compact
    def __call__(
        self,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """`(logits, extras)`, or with `return_hidden` `((hidden, head), extras)`: the final
        normed hidden states [B, L, d] and the output projection [d, V] (the embedding
        transposed when tied, else `lm_head`), both in the compute dtype, for a loss that
        projects them itself (`moejax.train.chunked_loss`); the logits are then never formed.
        """
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
        stacks = _stacks(block, m, self.moe, self.decode, self.adapters)
        final_norm = RMSNorm(m.norm_eps, m.dtype, m.param_dtype, name="final_norm")

        def run(scalings, cache_prefix=""):
            ctx = BlockContext(
                segment_ids_BxL, positions_BxL, shared_router, scalings, cache_prefix
            )
            carry = (x, router_state)
            moe_outs = []
            for stack, is_moe in stacks:
                carry, out = stack(carry, ctx)
                if is_moe:
                    moe_outs.append(out)
            moe_out = _concat_layers(moe_outs) if moe_outs else BlockOutput({}, {}, {})
            hidden = final_norm(nn.with_logical_constraint(carry[0], ACTIVATION_AXES))
            return hidden, moe_out

        scalings = None
        if self.adapters is not None:  # X-LoRA: a pass without adapters feeds its classifier
            scalings = self.adapters.scalings(
                self, lambda s: run(s, SCALING_PASS_CACHE)[0], (b, length)
            )
        h, moe_out = run(scalings)
        if m.tie_embeddings:
            head = embedding.astype(dt).T
        else:
            head = logical_param(
                self, "lm_head", (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std, pdt
            ).astype(dt)
        aux_losses = {name: jnp.sum(v) for name, v in moe_out.aux_losses.items()}
        aux_loss = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
        extras = {
            "aux_loss": aux_loss,
            "aux_losses": aux_losses,
            "moe_metrics": moe_out.metrics,
            "routing": moe_out.per_token,
        }
        if return_hidden:
            return (h, head), extras
        return project(h, head).astype(jnp.float32), extras
