"""Reading a run back: `load_run(workdir, step=None) -> (model, variables, config, tokenizer)`.

    model, variables, config, tokenizer = moejax.load_run("runs/deepseekmoe")
    logits, extras = model.apply(variables, tokens_BxL)

`workdir` is a directory the trainer wrote (`python -m moejax.train`, or
`python -m moejax.train.convert_hf`), local or any `etils.epath` path. `step` is a checkpoint
step (`checkpoint_steps(workdir)` lists them; None: the latest). The config is the one saved
with that step (the trainer stores it in every checkpoint), else the run's `config.json`,
read through `moejax.config.renames` like any old config and validated for one device: the
returned `config` is the `Sections` of `moejax.config.validation` with a one-device mesh
(the parameters are placed on the first local device whatever mesh trained them).
`variables` holds `params` and the model's non-trainable collections (DeepSeek-V3's
`router_bias`, the adapters' state), its routed experts in expert-id order (a re-sharded
FSSDP run's rows are put back, `moejax.train.expert_relayout.logical_view`, its spare rows
dropped and the returned config's `moe.fssdp_spare_rows` set to 0); an adapter
run (`lora.method != "none"`) comes back with its base joined to its adapters
(`moejax.train.adapter_checkpoint.load_adapted`, which checks the base's fingerprint).
`tokenizer` is the run's `data.tokenizer` (`moejax.data.open_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from moejax.config.renames import apply_renames
from moejax.config.validation import Sections, validate
from moejax.config_section import ConfigError
from moejax.data import Tokenizer, open_tokenizer
from moejax.lora.hook import adapters_for
from moejax.models.transformer import Transformer
from moejax.nn.collections import NON_TRAINABLE
from moejax.train.adapter_checkpoint import load_adapted
from moejax.train.checkpoint import Checkpointer, CheckpointError
from moejax.train.expert_relayout import logical_view
from moejax.train.state_layouts import COLLECTIONS

ONE_DEVICE_MESH = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1, "topology": ""}


class LoadedRun(NamedTuple):
    """What `load_run` returns (a tuple: `model, variables, config, tokenizer = ...`)."""

    model: Transformer
    variables: dict[str, Any]
    config: Sections
    tokenizer: Tokenizer


def checkpoint_steps(workdir: str | epath.Path) -> list[int]:
    """The complete checkpoint steps of a run, ascending ([] when there is none)."""
    with Checkpointer(str(workdir), async_save=False) as ckpt:
        return ckpt.all_steps()


def resolve_step(workdir: str | epath.Path, step: int | None = None) -> int:
    """`step` if the run has a checkpoint there, the latest one for None; CheckpointError
    naming the available steps otherwise."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise CheckpointError(
            f"{workdir} holds no checkpoint (looked in {epath.Path(workdir) / 'checkpoints'}); "
            f"pass the workdir of a run that saved at least one step."
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{workdir} has no checkpoint of step {step}; its steps are {steps}.")
    return step


def run_config(workdir: str | epath.Path, step: int | None = None) -> dict[str, Any]:
    """The config (plain dict of sections, new spellings) that wrote checkpoint `step` of
    the run: the one saved with the checkpoint, else the run's `config.json`."""
    saved = None
    if step is not None:
        with Checkpointer(str(workdir), async_save=False) as ckpt:
            saved = (ckpt.read_extra(step) or {}).get("config")
    if saved is None:
        path = epath.Path(workdir) / "config.json"
        if not path.exists():
            raise CheckpointError(
                f"{workdir} has no config.json and its checkpoint no config: not a moejax run "
                f"directory (python -m moejax.train --workdir=... writes both)."
            )
        saved = json.loads(path.read_text())
    return apply_renames(saved)


def one_device_sections(config: dict[str, Any]) -> Sections:
    """`config` validated on one device: the mesh reset to a single data axis."""
    config = {**config, "mesh": {**config.get("mesh", {}), **ONE_DEVICE_MESH}}
    try:
        return validate(config, num_devices=1, num_processes=1)
    except ConfigError as e:
        raise ConfigError(f"the run's saved config does not validate: {e}") from None


def _placed(abstract: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def load_run(workdir: str | epath.Path, step: int | None = None) -> LoadedRun:
    """`(model, variables, config, tokenizer)` of checkpoint `step` (None: the latest) of the
    run in `workdir` (module docstring)."""
    workdir = str(workdir)
    step = resolve_step(workdir, step)
    s = one_device_sections(run_config(workdir, step))
    if s.lora.method != "none":
        model, variables = load_adapted(workdir, step)
        return LoadedRun(model, variables, s, open_tokenizer(s.data))
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    abstract = _placed(
        nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    )
    abstract_cols = {k: abstract[k] for k in NON_TRAINABLE if k in abstract} or None
    with Checkpointer(workdir, async_save=False) as ckpt:
        got = ckpt.restore_subtrees(
            {"params": abstract["params"], COLLECTIONS: abstract_cols}, step
        )
    # Experts in id order whatever layout trained them (expert_relayout.logical_view): E
    # rows, so the config and model returned store no spare rows.
    params, collections = logical_view(got["params"], got[COLLECTIONS])
    variables = {"params": params, **(collections or {})}
    if s.moe.fssdp_spare_rows:
        s = dataclasses.replace(s, moe=dataclasses.replace(s.moe, fssdp_spare_rows=0))
        model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    return LoadedRun(model, variables, s, open_tokenizer(s.data))
