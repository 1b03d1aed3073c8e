"""`TrainConfig`: the `config.train` section (optimisation, logging, evaluation, checkpoints)."""

from __future__ import annotations

import dataclasses

from moejax.config_section import section_from_mapping

# The learning rate of a run resumed with other schedule settings (train.learning_rate,
# warmup_steps, steps, min_lr_ratio or resume_lr itself), from the step it resumed at:
#   schedule  the warmup + cosine of the new settings at the global step (raising
#             train.steps stretches the cosine, so the rate can sit well below the peak)
#   constant  train.learning_rate, held
#   rewarm    a new warmup over train.warmup_steps, then cosine to train.steps
# moejax/train/config_history.py finds that step; moejax/train/optimizer.py builds it.
RESUME_LR = ("schedule", "constant", "rewarm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    learning_rate: float = 3e-3  # peak of the warmup + cosine schedule
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    resume_lr: str = "schedule"  # after a resume that changed the schedule: RESUME_LR
    weight_decay: float = 0.1  # AdamW, not applied to norm scales
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per step (global_batch_size must divide)
    # Tokens per chunk of the cross-entropy (moejax/train/chunked_loss.py): the logits of
    # that many tokens of a micro-batch at a time, recomputed in the backward pass, instead
    # of all [tokens, vocab] float32 at once. 0 = off (the whole logits).
    loss_chunk: int = 0
    seed: int = 0  # parameter initialisation
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation
    eval_batches: int = 8  # 0 = the whole validation split
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = from the table (or measured on CPU)
    # Numerical faults (moejax/train/faults.py). A step whose loss or gradients are not
    # finite leaves params and optimizer state unchanged (skip_non_finite); abort_on_nan stops
    # the run after max_bad_steps consecutive such steps (at the first one without skipping).
    abort_on_nan: bool = True
    skip_non_finite: bool = True
    max_bad_steps: int = 5
    # Router health warnings at log steps (moejax/train/router_health.py).
    dead_expert_logs: int = 3  # an expert with no tokens for this many logged intervals; 0 = off
    max_dropped_fraction: float = 0.2  # of expert assignments dropped (capacity dispatch)
    max_load_cv: float = 1.0  # coefficient of variation of the expert loads

    @classmethod
    def from_mapping(cls, mapping) -> "TrainConfig":
        return section_from_mapping(cls, mapping, "train")
