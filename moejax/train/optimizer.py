"""AdamW with linear warmup + cosine decay, global-norm clipping; no decay on norms or biases.

Adapter runs (`lora.method != "none"`: `make_optimizer(cfg, adapters=model.adapters)`)
freeze the base model through the optimizer: `optax.multi_transform` sends the leaves
`moejax.lora.trainable.is_trainable` accepts to AdamW and every other leaf to
`optax.set_to_zero()`, which keeps no state, so the optimizer state holds moments for the
adapters only (clipping sees the adapters' norm only). Which adapter weights get weight decay
is the adapter hook's call (`AdapterHook.decays`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import optax

from moejax.config.train import TrainConfig
from moejax.lora import trainable
from moejax.nn.adapter_hook import AdapterHook


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> peak linearly over `warmup_steps`, then cosine to `peak * min_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params, adapters: AdapterHook | None = None):
    """True for weights that get weight decay: everything but RMSNorm scales, biases (names
    starting with `b_`, e.g. the GRU router's) and the adapter weights their hook excludes
    (`AdapterHook.decays`, e.g. SoRA's rank gates, which have their own proximal step)."""

    def keep(path, _):
        # The last dict key names the weight (boxed params add a trailing `.value` attr).
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if not names:
            return True
        if names[-1] == "scale" or names[-1].startswith("b_"):
            return False
        return adapters is None or adapters.decays(names)

    return jax.tree_util.tree_map_with_path(keep, params)


def drop_masked_boxes(opt_state):
    """Optimizer state initialised from boxed params keeps the logical-axis boxes of frozen
    leaves around optax's empty `MaskedNode`s; drop those boxes (they hold no array)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(
        lambda x: x.value if is_box(x) and isinstance(x.value, optax.MaskedNode) else x,
        opt_state,
        is_leaf=is_box,
    )


def make_optimizer(
    cfg: TrainConfig, adapters: AdapterHook | None = None
) -> optax.GradientTransformation:
    """AdamW (module docstring); with `adapters` (the model's adapter hook) only the adapters
    train and the base gets zero updates."""
    parts = []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=functools.partial(decay_mask, adapters=adapters),
        )
    )
    tx = optax.chain(*parts)
    if adapters is None:
        return tx
    return optax.multi_transform(
        {trainable.TRAINABLE: tx, trainable.FROZEN: optax.set_to_zero()}, trainable.labels
    )
