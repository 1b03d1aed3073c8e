"""Everything compiled for one config on one mesh: the model, optimizer and learning-rate
schedule, the sharded state's shardings and abstract shapes (the checkpoint restore target),
and the jit-compiled init, train and eval steps.

`build_experiment(sections, mesh)` is what the training loop (`loop.py`), the collective
report (`moejax.train.collective_report`), benchmarks and tests compile; the state itself comes
from `init_fn` or from a checkpoint restored onto `abstract_state`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from moejax.config.validation import Sections
from moejax.data import domain_names
from moejax.lora.hook import adapters_for
from moejax.models.transformer import Transformer
from moejax.nn.collections import NON_TRAINABLE
from moejax.sharding.context import InMesh
from moejax.sharding.partitioning import (
    batch_sharding,
    check_divisible,
    logical_shardings,
    under_rules,
)
from moejax.train.optimizer import drop_masked_boxes, learning_rate_schedule, make_optimizer
from moejax.train.step import TrainState, eval_step, train_step


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything compiled for one config on one mesh (also handy in notebooks and tests)."""

    model: Transformer
    tx: Any
    schedule: Any
    mesh: Any
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the checkpoint restore target
    init_fn: Any  # rng -> TrainState, placed by state_shardings
    step_fn: Any  # (state, batch) -> (state, metrics); donates the state
    # (params, batch, previous_top1, collections=None) -> (sums, top1); donates previous_top1
    eval_fn: Any


def build_experiment(s: Sections, mesh, schedule_start: int = 0) -> Experiment:
    """The model, optimizer, state shardings and compiled steps of config `s` on `mesh`.
    `schedule_start` > 0: the step where a resumed run's `train.resume_lr` curve starts
    (`moejax/train/config_history.py`)."""
    adapters_only = s.lora.method != "none"
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora) if adapters_only else None)
    tx = make_optimizer(s.train, adapters=model.adapters, schedule_start=schedule_start)
    schedule = learning_rate_schedule(s.train, schedule_start)
    dummy = jnp.zeros((1, s.data.seq_len), jnp.int32)

    def init_boxed(rng):
        variables = model.init(rng, dummy)
        params = variables["params"]
        collections = {k: variables[k] for k in NON_TRAINABLE if k in variables}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=drop_masked_boxes(tx.init(params)),
            collections=collections or None,
        )

    # Sharding: abstract boxed state -> logical specs -> NamedShardings -> jit(init).
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    check_divisible(abstract_boxed, mesh, s.mesh.rules)
    state_shardings = logical_shardings(abstract_boxed, mesh, s.mesh.rules)
    abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        nn.unbox(abstract_boxed),
        state_shardings,
    )
    init_fn = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=state_shardings)
    # The steps run under the activation rules and with `mesh` as the context mesh: the
    # expert_parallel and fssdp dispatchers shard_map over it (init runs without: the dummy
    # batch is one row).
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        grad_accum=s.train.grad_accum,
        schedule=schedule,
        skip_non_finite=s.train.skip_non_finite,
        adapters_only=adapters_only,
        loss_chunk=s.train.loss_chunk,
    )
    step_fn = InMesh(
        jax.jit(
            under_rules(step, mesh, s.mesh.rules),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        ),
        mesh,
    )
    # The sums come back replicated (every process reads them); the per-token top-1 experts
    # stay split over the batch axes like the batch, and the previous evaluation's, which
    # they replace, are donated (moejax.train.routing_stability).
    evaluate_ = functools.partial(
        eval_step,
        model=model,
        num_domains=len(domain_names(s.data)),
        loss_chunk=s.train.loss_chunk,
    )
    top1_sharding = (
        batch_sharding(mesh, s.mesh.rules, lead=1) if model.model.num_moe_layers else None
    )
    eval_fn = InMesh(
        jax.jit(
            under_rules(evaluate_, mesh, s.mesh.rules),
            out_shardings=(NamedSharding(mesh, PartitionSpec()), top1_sharding),
            donate_argnums=(2,),
        ),
        mesh,
    )
    return Experiment(
        model, tx, schedule, mesh, state_shardings, abstract_state, init_fn, step_fn, eval_fn
    )
