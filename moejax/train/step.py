"""Pure train and eval steps: loss = LM cross-entropy + router aux losses.

`train_step(state, batch)` with gradient accumulation over `grad_accum` micro-batches
(a `lax.scan`; each micro-batch's cross-entropy is normalised by the token count of the whole
batch, so accumulated gradients equal the full-batch gradient exactly). Metrics returned:
scalars plus per-MoE-layer arrays under `moe/<name>` (shape [num_moe_layers, ...]).
With `loss_chunk` > 0 (`train.loss_chunk`) both steps take the model's final hidden states
instead of its logits and compute the cross-entropy that many tokens at a time
(`moejax.train.chunked_loss`): the [tokens, vocab] float32 logits are never formed.

With `skip_non_finite`, a step whose loss or gradients are not finite keeps the previous
parameters and optimizer state (a select inside the step, see `moejax.train.faults`) and
reports `nonfinite = 1`. The step uses no randomness: its result depends only on the state
and the batch, which is what makes a resumed run bit-identical to an uninterrupted one.

Adapter runs (`adapters_only=True`, `lora.method != "none"`) differentiate with respect to
the trainable leaves only (`moejax.nn.trees.split_tree` by `moejax.lora.trainable.is_trainable`):
the base parameters enter the
loss as constants, no gradient buffer of their size is formed, and the new params are the
updated adapters joined with the very same base arrays (bit-identical by construction). The
optimizer (`make_optimizer(..., adapters=model.adapters)`) sees full-structure gradients whose
frozen leaves are zeros it maps to zero updates; those zeros are dead code that XLA removes.

The model's non-trainable collections (DeepSeek-V3's `router_bias`, the adapters'
`lora_bias` and `lora_frozen`; `moejax.nn.collections`) ride in one mapping,
`TrainState.collections` (None when the model has none). After the optimizer step every
collection with a rule in `moejax.train.state_rules.RULES` moves by it (the sign rule, from
the loads the routers sow), and the adapters apply their method's own rule to the params
(`AdapterHook.post_update`, e.g. SoRA's proximal step).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from moejax.lora.trainable import is_trainable
from moejax.models.side_outputs import apply_model
from moejax.nn.trees import join_trees, split_tree
from moejax.train import faults
from moejax.train.chunked_loss import chunked_token_cross_entropy, token_cross_entropy
from moejax.train.routing_stability import top1_changes, top1_dtype
from moejax.train.state_rules import RULES

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # The model's non-trainable collections, name -> tree (moejax.nn.collections.NON_TRAINABLE
    # that it has); None when it has none.
    collections: Any = None


def forward(model, params, batch: Batch, collections=None, **kwargs):
    return apply_model(
        model,
        {"params": params, **(collections or {})},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        **kwargs,
    )


def token_losses(
    model, params, batch: Batch, collections=None, loss_chunk: int = 0
) -> tuple[jax.Array, dict]:
    """Per-token cross-entropy float32[B, L] (every token; the caller masks) and the model's
    extras. `loss_chunk` > 0: from the hidden states, that many tokens at a time
    (`moejax.train.chunked_loss`), never forming the [B, L, V] logits."""
    if not loss_chunk:
        logits, extras = forward(model, params, batch, collections)
        return token_cross_entropy(logits, batch["targets"]), extras
    (hidden, head), extras = forward(model, params, batch, collections, return_hidden=True)
    return chunked_token_cross_entropy(hidden, head, batch["targets"], loss_chunk), extras


def _micro_loss(
    params,
    batch: Batch,
    model,
    total_tokens,
    num_micro: int,
    collections=None,
    loss_chunk: int = 0,
):
    ce, extras = token_losses(model, params, batch, collections, loss_chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce_sum = jnp.sum(ce * mask)
    loss = ce_sum / total_tokens + extras["aux_loss"] / num_micro
    extras = {k: v for k, v in extras.items() if k != "routing"}  # per-token: eval only
    return loss, (ce_sum, extras)


def _split(params, adapters_only: bool):
    """(differentiated part, constant part) of the params; the constant part is {} unless
    `adapters_only`."""
    if not adapters_only:
        return params, {}
    return split_tree(params, is_trainable)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    schedule=None,
    skip_non_finite: bool = True,
    adapters_only: bool = False,
    loss_chunk: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    train_p, frozen_p = _split(state.params, adapters_only)

    def loss_of(tp, *args):
        return _micro_loss(join_trees(tp, frozen_p) if adapters_only else tp, *args)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    if grad_accum == 1:
        (loss, (ce_sum, extras)), grads = grad_fn(
            train_p, batch, model, total_tokens, 1, state.collections, loss_chunk
        )
    else:
        micro = jax.tree.map(
            lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch
        )

        def body(acc, mb):
            (loss, (ce_sum, extras)), grads = grad_fn(
                train_p, mb, model, total_tokens, grad_accum, state.collections, loss_chunk
            )
            acc = jax.tree.map(jnp.add, acc, (loss, ce_sum, grads))
            return acc, extras

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, train_p))
        (loss, ce_sum, grads), extras_all = jax.lax.scan(body, zeros, micro)
        extras = jax.tree.map(lambda x: jnp.mean(x, axis=0), extras_all)

    if adapters_only:  # frozen leaves: zero gradients, mapped to zero updates and dropped
        full_grads = join_trees(grads, jax.tree.map(jnp.zeros_like, frozen_p))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        updates = split_tree(updates, is_trainable)[0]
    else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_train_p = optax.apply_updates(train_p, updates)
    if model.adapters is not None:  # the adapter method's own rule (SoRA's proximal step)
        lr = schedule(state.step) if schedule is not None else 1.0
        new_train_p = model.adapters.post_update(new_train_p, lr)
    finite = faults.all_finite(loss, grads)
    if skip_non_finite:
        new_train_p, opt_state = faults.keep_if_finite(
            finite, (new_train_p, opt_state), (train_p, state.opt_state)
        )
    params = join_trees(new_train_p, frozen_p) if adapters_only else new_train_p
    metrics = {
        "loss": loss,
        "ce_loss": ce_sum / total_tokens,
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
        "param_norm": optax.global_norm(params),
        "tokens": total_tokens,
        "aux_loss": extras["aux_loss"],
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    metrics.update({f"aux/{k}": v for k, v in extras["aux_losses"].items()})
    metrics.update({f"moe/{k}": v for k, v in extras["moe_metrics"].items()})
    metrics.update({f"lora/{k}": v for k, v in extras.get("lora_metrics", {}).items()})
    # The non-trainable collections after the step: each with a rule moves by it (a skipped
    # step moves nothing).
    collections = state.collections
    if collections is not None:
        collections = dict(collections)
        for name, tree in collections.items():
            if name in RULES:
                new = RULES[name](tree, extras, model)
                collections[name] = (
                    faults.keep_if_finite(finite, new, tree) if skip_non_finite else new
                )
                metrics.update(RULES[name].report(collections[name]))
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, collections=collections
    )
    return new_state, metrics


def eval_step(
    params,
    batch: Batch,
    previous_top1: jax.Array | None = None,
    *,
    model,
    num_domains: int,
    collections=None,
    loss_chunk: int = 0,
) -> tuple[dict[str, jax.Array], jax.Array | None]:
    """`(sums, top1)`. Sums, so batches add up: cross-entropy and token counts, overall and
    per data domain, and (MoE models) the experts used per token, per MoE layer and domain,
    and routing stability's counts against `previous_top1`.

    The aux loss and the `moe/*` metrics are per-batch values that the caller averages.
    `top1[num_moe_layers, B, L]` (MoE models; None otherwise) is every loss token's
    first-choice expert (-1 for the others) in `previous_top1`'s dtype
    (`moejax.train.routing_stability.top1_dtype`), the previous evaluation's top-1 of this
    batch (all -1 at the first, or None: all -1); `top1_changed` / `top1_compared`
    (int32[num_moe_layers]) count the loss tokens whose top-1 changed and those compared.
    `collections`: the model's non-trainable collections (`TrainState.collections`), if any.
    `loss_chunk`: as in `train_step`.
    """
    ce, extras = token_losses(model, params, batch, collections, loss_chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = ce * mask
    domain_onehot = jax.nn.one_hot(batch["domains"], num_domains, dtype=jnp.float32)
    out = {
        "ce_sum": jnp.sum(ce),
        "tokens": jnp.sum(mask),
        "domain_ce_sum": jnp.einsum("bl,bld->d", ce, domain_onehot),
        "domain_tokens": jnp.einsum("bl,bld->d", mask, domain_onehot),
        "aux_loss_sum": extras["aux_loss"],
        "batches": jnp.ones(()),
    }
    out.update({f"moe/{k}": v for k, v in extras["moe_metrics"].items()})
    routing = extras["routing"]
    top1 = None
    if routing:
        used = routing["experts_per_token"].astype(jnp.float32)
        out["domain_experts_sum"] = jnp.einsum("nbl,bl,bld->nd", used, mask, domain_onehot)
        if previous_top1 is None:
            dtype = top1_dtype(model.moe.num_experts)
            previous_top1 = jnp.full(routing["top1_expert"].shape, -1, dtype)
        top1 = jnp.where(mask[None] > 0, routing["top1_expert"], -1).astype(previous_top1.dtype)
        out["top1_changed"], out["top1_compared"] = top1_changes(previous_top1, top1)
    return out, top1
