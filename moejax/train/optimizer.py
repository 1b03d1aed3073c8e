"""AdamW with linear warmup + cosine decay, global-norm clipping; no decay on norms or biases.

The schedule is a function of the optimizer's global update count: 0 -> `learning_rate`
linearly over `warmup_steps` (so update 1 runs at 0), then cosine to `learning_rate *
min_lr_ratio` at `steps`. A run resumed at step S with other schedule settings
(`moejax/train/config_history.py` finds S, the `schedule_start`) continues by
`train.resume_lr`: `schedule` is the new settings' curve at the global count, `constant`
holds `learning_rate` from S, `rewarm` warms up again from S and decays to `steps`
(`optax.join_schedules` at S; updates before S are never re-run).

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


def _warmup_cosine(cfg: TrainConfig, steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def learning_rate_schedule(cfg: TrainConfig, schedule_start: int = 0) -> optax.Schedule:
    """0 -> peak linearly over `warmup_steps`, then cosine to `peak * min_lr_ratio` at
    `steps`; from update `schedule_start` on (> 0: a resume that changed the schedule), the
    `train.resume_lr` curve (module docstring)."""
    curve = _warmup_cosine(cfg, cfg.steps)
    if schedule_start <= 0 or cfg.resume_lr == "schedule":
        return curve
    if cfg.resume_lr == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:  # rewarm: the same warmup + cosine over the steps that are left
        after = _warmup_cosine(cfg, max(cfg.steps - schedule_start, 1))
    return optax.join_schedules([curve, after], [schedule_start])


def describe_schedule(cfg: TrainConfig, schedule_start: int = 0, next_step: int = 1) -> str:
    """One line: the curve (from `schedule_start`, by `train.resume_lr`) and the rate update
    `next_step` runs at, e.g. `learning rate: warmup 0 -> 0.003 over steps 1-30, cosine to
    0.0003 at step 300; step 1 runs at 0`."""
    lr = float(learning_rate_schedule(cfg, schedule_start)(next_step - 1))
    end = cfg.learning_rate * cfg.min_lr_ratio
    if schedule_start <= 0 or cfg.resume_lr == "schedule":
        warmup = f"warmup 0 -> {cfg.learning_rate:.3g} over steps 1-{cfg.warmup_steps}, "
        curve = (
            warmup if cfg.warmup_steps else f"{cfg.learning_rate:.3g} at step 1, "
        ) + f"cosine to {end:.3g} at step {cfg.steps}"
    elif cfg.resume_lr == "constant":
        curve = f"{cfg.learning_rate:.3g} from step {schedule_start + 1} on"
    else:
        warm = min(cfg.warmup_steps, max(cfg.steps - schedule_start, 1))
        curve = (
            f"warmup again 0 -> {cfg.learning_rate:.3g} over steps {schedule_start + 1}-"
            f"{schedule_start + warm}, cosine to {end:.3g} at step {cfg.steps}"
        )
    mode = (
        f" (train.resume_lr={cfg.resume_lr} since step {schedule_start})" if schedule_start else ""
    )
    return f"learning rate{mode}: {curve}; step {next_step} runs at {lr:.3g}"


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
    cfg: TrainConfig, adapters: AdapterHook | None = None, schedule_start: int = 0
) -> optax.GradientTransformation:
    """AdamW (module docstring); with `adapters` (the model's adapter hook) only the adapters
    train and the base gets zero updates. `schedule_start`: see `learning_rate_schedule`."""
    parts = []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg, schedule_start),
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
