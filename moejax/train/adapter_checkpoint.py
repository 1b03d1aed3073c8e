"""Base and adapters checkpointed apart: one frozen base serves many adapter runs.

An adapter run (`lora.method != "none"`) saves, at each checkpoint step, the adapters (every
leaf under a `lora_*` module, trainable or not), their optimizer state, the step and any
non-trainable collections of the TrainState, plus `extra["base"]`: where the base comes
from and a fingerprint of its parameters. The base itself is read, never written, from

    lora.base_checkpoint   a moejax run directory: `params` (and `collections`) of its
                           latest checkpoint (a `moejax.train` run or `moejax.train.convert_hf`)
    lora.base_hf           a Hugging Face directory, via `moejax.hf.from_pretrained`
    neither                the run's own initialisation, written once to `{workdir}/base`

Resuming loads the base from the same source and compares its fingerprint with the saved
one, so a base that changed (retrained, another checkpoint step) or went missing is refused
with a message naming it, never silently combined with adapters trained on another base.

The fingerprint, per base leaf: shape, sum, sum of |x| and a sum weighted by a fixed integer
hash of the element index (exact on every platform), computed on device in float32; two
fingerprints match within a relative 1e-5 of sum |x|, which absorbs reduction order across
devices but not a changed weight.

The training loop starts or resumes an adapter run with `restore_adapter_run` (the base,
then the adapters) and saves `saved_state(state)`; `load_adapted` reads a finished run back
as `(model, variables)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config.validation import Sections, validate
from moejax.config_section import ConfigError
from moejax.hf import from_pretrained
from moejax.lora import trainable as trainable_lib
from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.lora.targets import is_adapter_path
from moejax.models.transformer import Transformer, scanned_abstract, unscan_params
from moejax.nn.collections import ADAPTER_COLLECTIONS, EXPERT_LAYOUT, NON_TRAINABLE
from moejax.nn.trees import join_trees, split_tree
from moejax.paths import as_path, join, resolve
from moejax.train.checkpoint import Checkpointer, CheckpointError, CheckpointMismatchError
from moejax.train.expert_relayout import logical_view
from moejax.train.state_layouts import COLLECTIONS
from moejax.train.step import TrainState

BASE_DIR = "base"
FINGERPRINT_RTOL = 1e-5


class BaseModelError(CheckpointError):
    """The base of an adapter run is missing, of another shape, or not the one it was
    trained on."""


def base_source(lora: LoRAConfig, workdir: str) -> dict[str, str]:
    """{"kind": "moejax" | "hf" | "own", "path": ...} of the run's base model."""
    if lora.base_checkpoint:
        return {"kind": "moejax", "path": resolve(lora.base_checkpoint)}
    if lora.base_hf:
        return {"kind": "hf", "path": resolve(lora.base_hf)}
    return {"kind": "own", "path": join(workdir, BASE_DIR)}


def _field(source: dict) -> str:
    return {"moejax": "lora.base_checkpoint", "hf": "lora.base_hf"}.get(
        source["kind"], "the run's own base"
    )


# ----------------------------------------------------------------------------------------
# Fingerprint.


def _leaf_stats(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32).reshape(-1)
    i = jnp.arange(x.size, dtype=jnp.uint32)
    h = (i * jnp.uint32(2654435761)) >> jnp.uint32(16)  # Knuth's multiplicative hash
    w = h.astype(jnp.float32) / 65536.0 - 0.5
    return jnp.stack([jnp.sum(x), jnp.sum(jnp.abs(x)), jnp.sum(x * w)])


def fingerprint(base_params: Any) -> dict[str, list]:
    """{"path/to/leaf": [shape, [sum, sum |x|, hashed sum]]} of the base params."""
    flat = traverse_util.flatten_dict(base_params, sep="/")
    stats = jax.device_get(jax.jit(lambda t: {k: _leaf_stats(v) for k, v in t.items()})(flat))
    return {k: [list(np.shape(flat[k])), [float(s) for s in stats[k]]] for k in sorted(flat)}


def check_fingerprint(saved: dict, current: dict, source: dict, step: int) -> None:
    """Raises BaseModelError naming the first base leaf that differs from the saved one."""
    problem = None
    for key in sorted(set(saved) | set(current)):
        if key not in current or key not in saved:
            problem = f"'{key}' is {'missing from' if key not in current else 'new in'} it"
        elif list(saved[key][0]) != list(current[key][0]):
            problem = f"'{key}' has shape {current[key][0]} instead of {saved[key][0]}"
        else:
            a, b = np.asarray(saved[key][1]), np.asarray(current[key][1])
            if np.any(np.abs(a - b) > FINGERPRINT_RTOL * (abs(a[1]) + 1e-30)):
                problem = (
                    f"'{key}' holds other values (fingerprint {b.tolist()}, saved {a.tolist()})"
                )
        if problem:
            break
    if problem:
        raise BaseModelError(
            f"The base model at {_field(source)}={source['path']!r} is not the one this "
            f"adapter run was trained on (checkpoint step {step}): {problem}. Resume with the "
            f"original base, or pass a new --workdir to train adapters on this base."
        )


# ----------------------------------------------------------------------------------------
# Loading the base.


def _check_shapes(abstract: Any, loaded: Any, source: dict) -> None:
    want = traverse_util.flatten_dict(abstract, sep="/")
    got = traverse_util.flatten_dict(loaded, sep="/")
    for key in sorted(set(want) | set(got)):
        if key not in got or key not in want:
            where = "the model has" if key not in got else "the base has"
            other = "the base does not" if key not in got else "the model does not"
            raise BaseModelError(
                f"{_field(source)}={source['path']!r} does not match the model config: "
                f"{where} 'params/{key}' but {other}. Use the model section the base was "
                f"trained with."
            )
        if tuple(np.shape(want[key])) != tuple(np.shape(got[key])):
            raise BaseModelError(
                f"{_field(source)}={source['path']!r} does not match the model config: "
                f"'params/{key}' has shape {tuple(np.shape(got[key]))} in the base but "
                f"{tuple(np.shape(want[key]))} in the model. Use the model section the base "
                f"was trained with."
            )


# Model fields that change the function without changing any parameter shape.
SAME_FUNCTION_FIELDS = (
    "rope_theta",
    "norm_eps",
    "attention",
    "attention_bias",
    "tie_embeddings",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)


def _check_run_config(source: dict, model_cfg) -> None:
    """A base run's `config.json` (when present) must agree on the fields shapes miss."""
    path = as_path(source["path"]) / "config.json"
    if model_cfg is None or not path.is_file():
        return
    saved = json.loads(path.read_text()).get("model", {})
    for name in SAME_FUNCTION_FIELDS:
        if name in saved and saved[name] != getattr(model_cfg, name):
            raise BaseModelError(
                f"{_field(source)}={source['path']!r} was trained with model.{name}="
                f"{saved[name]!r} but this config has model.{name}="
                f"{getattr(model_cfg, name)!r}; set --config.model.{name}={saved[name]!r}."
            )


def _load_moejax(source: dict, abstract_base: Any, abstract_cols: Any, model_cfg=None) -> dict:
    path = source["path"]
    _check_run_config(source, model_cfg)
    ckpt = Checkpointer(path, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise BaseModelError(
                f"{_field(source)}={path!r} holds no checkpoint (looked in {ckpt.directory}). "
                f"Point it at a finished moejax run directory (or a moejax.train.convert_hf one)."
            )
        extra = ckpt.read_extra(step) or {}
        if "base" in extra:
            raise BaseModelError(
                f"{_field(source)}={path!r} is an adapter run: its checkpoints hold adapters "
                f"only. Point it at the run that trained the base ({extra['base']['path']})."
            )
        # A base trained with re-sharded FSSDP stores its experts in rows: read its layout
        # too and put them back in id order (the adapter model keeps no layout).
        layout = None
        if EXPERT_LAYOUT not in (abstract_cols or {}):
            sharding = jax.tree.leaves(abstract_base)[0].sharding
            if isinstance(sharding, NamedSharding):
                sharding = NamedSharding(sharding.mesh, P())
            layout = ckpt.saved_collection(EXPERT_LAYOUT, step, sharding)
        cols = abstract_cols if layout is None else {**(abstract_cols or {}), EXPERT_LAYOUT: layout}
        try:
            out = ckpt.restore_subtrees({"params": abstract_base, COLLECTIONS: cols}, step)
        except CheckpointMismatchError as e:
            if model_cfg is None or model_cfg.scan_layers:
                raise BaseModelError(
                    f"{_field(source)}={path!r} does not match the model config: {e} Use the "
                    f"model section the base was trained with."
                ) from e
            out = _restore_unrolled(ckpt, step, abstract_base, cols, source, e)
        if layout is not None:
            out["params"], cols = logical_view(out["params"], out[COLLECTIONS])[:2]
            out[COLLECTIONS] = {k: v for k, v in cols.items() if k != EXPERT_LAYOUT} or None
        out["step"] = step
        return out
    finally:
        ckpt.close()


def _restore_unrolled(
    ckpt: Checkpointer,
    step: int,
    abstract_base: Any,
    abstract_cols: Any,
    source: dict,
    error: Exception,
) -> dict:
    """A base trained with scanned layers, for a model with unrolled ones (MoLA): restored in
    the scanned layout, unscanned, and placed like `abstract_base`."""
    try:
        out = ckpt.restore_subtrees(
            {"params": scanned_abstract(abstract_base), COLLECTIONS: abstract_cols}, step
        )
    except CheckpointMismatchError:
        raise BaseModelError(
            f"{_field(source)}={source['path']!r} does not match the model config: {error} "
            f"Use the model section the base was trained with."
        ) from error
    # In id order first (a re-sharded FSSDP base's layout is stacked like its params).
    out["params"], out[COLLECTIONS] = logical_view(out["params"], out[COLLECTIONS])[:2]
    params = unscan_params(out["params"])
    out["params"] = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract_base)
    return out


def _load_hf(source: dict, abstract_base: Any, model_cfg) -> dict:
    path = source["path"]
    if not (as_path(path) / "config.json").is_file():
        raise BaseModelError(
            f"lora.base_hf={path!r} has no config.json; point it at a Hugging Face model directory."
        )
    hf_model, variables = from_pretrained(
        path, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype
    )
    for name in (
        "attention",
        "num_heads",
        "num_kv_heads",
        "resolved_head_dim",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
        "attention_bias",
    ):
        a, b = getattr(hf_model.model, name), getattr(model_cfg, name)
        if a != b:
            raise BaseModelError(
                f"lora.base_hf={path!r} has {name}={a!r} but the config has "
                f"model.{name.replace('resolved_', '')}={b!r}; set it to "
                f"{a!r}."
            )
    _check_shapes(abstract_base, variables["params"], source)
    return {"params": variables["params"], COLLECTIONS: base_collections(variables), "step": 0}


def load_base(
    lora: LoRAConfig, workdir: str, abstract_params: Any, abstract_cols: Any, model_cfg
) -> tuple[dict, dict]:
    """`(base, source)`: base = {"params", "collections", "step"}, the base params (and its
    non-trainable collections, `base_collections` of the model's) placed like the
    adapter-free part of the abstract params, which carry shardings."""
    abstract_cols = base_collections(abstract_cols)
    source = base_source(lora, workdir)
    _, abstract_base = split_tree(abstract_params, is_adapter_path)
    if source["kind"] == "hf":
        base = _load_hf(source, abstract_base, model_cfg)
        shard = lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding)  # noqa: E731
        base["params"] = jax.tree.map(shard, base["params"], abstract_base)
        if base[COLLECTIONS] is not None and abstract_cols is not None:
            base[COLLECTIONS] = jax.tree.map(shard, base[COLLECTIONS], abstract_cols)
    else:
        if not as_path(source["path"]).is_dir():
            raise BaseModelError(
                f"{_field(source)}={source['path']!r} does not exist. Adapter checkpoints hold "
                f"adapters only and need the base they were trained on: restore that "
                f"directory, or point {_field(source)} at it."
            )
        base = _load_moejax(source, abstract_base, abstract_cols, model_cfg)
    source["step"] = base["step"]
    return base, source


def base_collections(collections: Any) -> Any:
    """The base model's part of the non-trainable collections (the adapters' own removed);
    None when nothing is left."""
    base = {k: v for k, v in (collections or {}).items() if k not in ADAPTER_COLLECTIONS}
    return base or None


def save_own_base(workdir: str, params: Any, collections: Any) -> None:
    """Writes a run's own initial base (no pretrained source) to `{workdir}/base`, once."""
    _, base = split_tree(params, is_adapter_path)
    state = {"params": base}
    own = base_collections(collections)
    if own is not None:
        state[COLLECTIONS] = own
    with Checkpointer(join(workdir, BASE_DIR), async_save=False, save_every=1) as ckpt:
        if ckpt.latest_step() is None:
            ckpt.save(0, state, force=True)


# ----------------------------------------------------------------------------------------
# Adapter states.


def adapter_part(params: Any) -> Any:
    """The leaves an adapter checkpoint stores: every leaf under a `lora_*` module."""
    return split_tree(params, is_adapter_path)[0]


def with_base(adapters: Any, base_params: Any) -> Any:
    return join_trees(base_params, adapters)


def base_extra(source: dict, fp: dict) -> dict:
    return {
        "kind": source["kind"],
        "path": source["path"],
        "step": source.get("step", 0),
        "fingerprint": fp,
    }


# ----------------------------------------------------------------------------------------
# The training loop's side: what an adapter run saves, and its restore.


def saved_state(state: TrainState, adapter_run: bool) -> TrainState:
    """What a checkpoint holds: the whole state, or for an adapter run its adapters only."""
    return state.replace(params=adapter_part(state.params)) if adapter_run else state


def restore_adapter_run(
    s: Sections,
    workdir: str,
    init_state: Callable[[], TrainState],
    abstract_state: TrainState,
    ckpt: Checkpointer,
    notes: list[str],
) -> tuple[TrainState, Any, int, dict]:
    """Loads the frozen base, then resumes the adapters from the latest checkpoint of `ckpt`
    (checking that the base is the one they were trained on) or initialises them with
    `init_state` (a fresh full state, placed like `abstract_state`). Appends what it did
    to `notes`. Returns (full state, data state, start step, base reference)."""
    source = base_source(s.lora, workdir)
    if source["kind"] == "own" and ckpt.latest_step() is None:
        fresh = init_state()
        save_own_base(workdir, fresh.params, fresh.collections)
        del fresh
    base, source = load_base(
        s.lora, workdir, abstract_state.params, abstract_state.collections, s.model
    )
    fp = fingerprint(base["params"])

    def init():
        fresh = init_state()
        collections = {**(fresh.collections or {}), **(base[COLLECTIONS] or {})} or None
        return fresh.replace(params=adapter_part(fresh.params), collections=collections)

    target = abstract_state.replace(params=adapter_part(abstract_state.params))
    state, data_state, start_step = ckpt.restore_or_init(init, target, log=notes.append)
    if start_step:
        extra = ckpt.read_extra(start_step) or {}
        if "base" not in extra:
            raise BaseModelError(
                f"{ckpt.step_dir(start_step)} has no base reference; it was not written by an "
                f"adapter run. Pass a new --workdir."
            )
        check_fingerprint(extra["base"]["fingerprint"], fp, source, start_step)
    n_train = trainable_lib.count(abstract_state.params)
    n_base = sum(x.size for x in jax.tree.leaves(base["params"]))
    notes.append(
        f"adapters: {n_train} trainable params ({100 * n_train / n_base:.3f}% of the "
        f"{n_base / 1e6:.2f}M frozen base from {source['kind']}: {source['path']})"
    )
    state = state.replace(params=with_base(state.params, base["params"]))
    return state, data_state, start_step, base_extra(source, fp)


# ----------------------------------------------------------------------------------------
# Reading a finished adapter run.


def load_adapted(workdir: str, step: int | None = None):
    """`(model, variables)` of a finished adapter run: its base (from the source its config
    names, fingerprint checked) with the adapters of checkpoint `step` (default: latest)."""
    config = json.loads((as_path(workdir) / "config.json").read_text())
    s = validate(config)
    if s.lora.method == "none":
        raise ConfigError(f"{workdir} is not an adapter run (lora.method='none').")
    model = Transformer(s.model, s.moe, adapters=adapters_for(s.lora))
    abstract = nn.unbox(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ),
        abstract,
    )
    abstract_cols = {k: abstract[k] for k in NON_TRAINABLE if k in abstract} or None
    base, source = load_base(s.lora, workdir, abstract["params"], abstract_cols, s.model)
    with Checkpointer(workdir, async_save=False) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{workdir} holds no checkpoint.")
        extra = ckpt.read_extra(step) or {}
        if "base" not in extra:
            raise CheckpointError(
                f"{workdir} step {step} has no base reference; it was not "
                f"written by an adapter run."
            )
        check_fingerprint(extra["base"]["fingerprint"], fingerprint(base["params"]), source, step)
        # The non-trainable collections (router bias, sign-rule biases, FlyLoRA's frozen A)
        # ride in TrainState.collections.
        got = ckpt.restore_subtrees(
            {"params": adapter_part(abstract["params"]), COLLECTIONS: abstract_cols}, step
        )
    variables = {"params": with_base(got["params"], base["params"])}
    variables.update(got[COLLECTIONS] or {})
    return model, variables
