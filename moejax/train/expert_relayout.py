"""Heterogeneous re-sharding of the routed experts: a new owner layout from the loads of the
last window, and the one transfer that moves parameters and optimizer state to it.

Hecate (Qing et al., 2025, arXiv 2502.02581, section 4, heterogeneous sharding) re-shards the
MoE parameters every ~100 iterations so that each device owns experts whose summed load is
near the mean; the per-step replicas of FSSDP (`moejax.moe.placement`) then have less to
fix. Here every MoE layer stores its experts in R physical rows (`moejax.moe.expert_layout`;
R = E + `moe.fssdp_spare_rows`), device p of the P devices of the `expert` axis owning rows
`[p C, (p + 1) C)`, C = R / P, and every `moe.fssdp_reshard_every` steps the trainer calls
`Relayout(shardings)(state, P)`:

1. **Plan** (`plan_rows`, on the host, per layer): from `window_load[E]`, the longest
   processing time rule with a count bound: experts in decreasing load (ties by id) each go
   to the device with the least owned load among those owning fewer than C. With no spare
   rows (C = E / P) every device ends with E / P experts, and a hot expert shares its device
   with the coldest ones; with spare rows a device may end with fewer, down to the hot
   expert alone, and its other rows empty (Hecate's devices owning 0..E experts, within the
   memory bound of C rows). The new groups are then matched to the devices that already
   hold most of their experts (greedy on the overlap), so that experts that need not move
   keep their rows. A layer keeps its layout when the plan does not lower its largest owned
   load (`max_over_mean` of the owners' loads), so a balanced layer moves nothing.
2. **Move** (`apply_layout`, one jitted function, `Relayout`): every routed-expert leaf of the
   parameters, and each optimizer-state leaf that mirrors one (Adam's moments), is gathered
   into the new row order (empty rows zero) with the state's own shardings as
   `out_shardings`; the layout's `row_expert` is set and its `window_load` reset. The state
   is donated.

Because rows are only relabelled and the routers keep choosing logical experts, the model
computes the same function after a re-layout (up to the order of float sums in the sharded
dispatch), and the logical view (`logical_view`: E rows in id order, what `moejax.load_run`
returns) is bit for bit the same. The plan depends only on the state, so a resumed run
re-lays out at the same steps to the same layouts: bit-identical to an uninterrupted one.
Checkpoints store the rows as they are with the layout beside them
(`TrainState.collections`), so they restore onto any mesh whose expert axis divides R: the
next re-layout adapts the rows to the new P.

The move is one gather of the whole expert shard: XLA's collective for a resharded gather
moves every device's shard whatever fraction of the rows changed owner (measured in
experiments/README.md), which every ~100 steps costs about one step's expert all-gather.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax.moe.expert_layout import (
    EMPTY,
    EXPERTS,
    ROW_EXPERT,
    WINDOW_LOAD,
    initial_layout,
    initial_row_expert,
    logical_layout,
    row_of,
    uses_layout,
)
from moejax.nn.collections import EXPERT_LAYOUT, LAYOUT_LOAD


def owned_loads(load: np.ndarray, row_expert: np.ndarray, devices: int) -> np.ndarray:
    """Each device's owned load `[P]`: the loads of the experts stored in its rows (empty
    rows, -1, add nothing)."""
    padded = np.append(np.asarray(load, np.float64), 0.0)
    return padded[row_expert].reshape(devices, -1).sum(axis=1)


def max_over_mean(loads: np.ndarray) -> float:
    mean = float(np.mean(loads))
    return float(np.max(loads)) / mean if mean > 0 else 1.0


def balanced_groups(load: np.ndarray, devices: int, capacity: int) -> list[list[int]]:
    """The longest processing time rule with a count bound: experts in decreasing `load`
    (ties by id) each to the device with the least summed load among those holding fewer
    than `capacity` (ties by device); the experts of each device. With `capacity` > E / P
    (spare rows; `experiments.fssdp_sim`'s memory slack) a device may end with fewer than
    E / P, or none."""
    groups: list[list[int]] = [[] for _ in range(devices)]
    totals = np.zeros(devices)
    for x in np.argsort(-load, kind="stable"):
        d = min((i for i in range(devices) if len(groups[i]) < capacity), key=totals.__getitem__)
        groups[d].append(int(x))
        totals[d] += load[x]
    return groups


def plan_rows(load: np.ndarray, row_expert: np.ndarray, devices: int) -> np.ndarray:
    """The new `row_expert[R]` of one layer from its window `load[E]` (module docstring);
    `row_expert` itself when the plan does not lower the largest owned load."""
    c = row_expert.shape[0] // devices
    groups = balanced_groups(load, devices, c)
    totals = np.array([load[g].sum() for g in groups])
    if np.max(totals) >= np.max(owned_loads(load, row_expert, devices)):
        return row_expert
    # Match the new groups to the devices that already hold most of their experts.
    current = row_expert.reshape(devices, c)
    overlap = np.array([[len(set(g) & set(current[d])) for d in range(devices)] for g in groups])
    placed: list[list[int]] = [[] for _ in range(devices)]
    taken_groups, taken_devices = set(), set()
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        g, d = divmod(int(flat), devices)
        if g not in taken_groups and d not in taken_devices:
            placed[d] = groups[g]
            taken_groups.add(g)
            taken_devices.add(d)
    rows = []
    for d in range(devices):  # experts already on d keep their row; the others fill in
        mine = set(placed[d])
        new = iter(sorted(mine - set(current[d])))
        rows.extend(x if x in mine else next(new, EMPTY) for x in current[d])
    return np.asarray(rows, np.int32)


@dataclasses.dataclass(frozen=True)
class RelayoutReport:
    """What one re-layout did, over every MoE layer: the owners' `max_over_mean` load under
    the old and the new layout (means over layers), and the fraction of experts moved to
    another row."""

    before: float
    after: float
    moved: float
    layers: int

    def metrics(self) -> dict[str, float]:
        return {
            "relayout/owned_max_over_mean_before": self.before,
            "relayout/owned_max_over_mean_after": self.after,
            "relayout/moved_fraction": self.moved,
        }

    def line(self, step: int) -> str:
        return (
            f"step {step}: expert re-layout of {self.layers} MoE layer(s): owned load "
            f"max/mean {self.before:.3f} -> {self.after:.3f}, {100 * self.moved:.1f}% of "
            f"experts moved"
        )


def relayout_due(s: Any, step: int) -> bool:
    """Whether the trainer re-lays out after `step` (config sections `s`)."""
    every = s.moe.fssdp_reshard_every
    return uses_layout(s.moe) and step % every == 0


def _layouts(collections: Any) -> dict[tuple, dict[str, Any]]:
    """scope path -> {"row_expert", "window_load"} of every MoE layer stack with a layout."""
    flat = traverse_util.flatten_dict((collections or {}).get(EXPERT_LAYOUT) or {})
    out: dict[tuple, dict[str, Any]] = {}
    for key, leaf in flat.items():
        out.setdefault(key[:-1], {})[key[-1]] = leaf
    return out


def _on_host(x: Any) -> np.ndarray:
    """A replicated array's value from this process's own copy (every process of a
    multi-host run then plans the same layout, with no collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def plan(collections: Any, devices: int) -> tuple[dict[tuple, np.ndarray], RelayoutReport]:
    """The new rows of every layout (scope -> int32[..., R], on the host) and the report."""
    new_rows, before, after, moved, count = {}, [], [], [], 0
    for scope, layout in _layouts(collections).items():
        rows, loads = _on_host(layout[ROW_EXPERT]), _on_host(layout[WINDOW_LOAD]).astype(np.float64)
        flat_rows, flat_loads = rows.reshape(-1, rows.shape[-1]), loads.reshape(-1, loads.shape[-1])
        planned = np.stack([plan_rows(lo, r, devices) for lo, r in zip(flat_loads, flat_rows)])
        for lo, r, p in zip(flat_loads, flat_rows, planned):
            before.append(max_over_mean(owned_loads(lo, r, devices)))
            after.append(max_over_mean(owned_loads(lo, p, devices)))
            # Each expert is in one row of each layout: it moved iff its new row held
            # another expert (or none) before.
            moved.append(float(np.sum((p >= 0) & (p != r))) / lo.shape[0])
        count += len(planned)
        new_rows[scope] = planned.reshape(rows.shape).astype(np.int32)
    report = RelayoutReport(
        float(np.mean(before)) if before else 1.0,
        float(np.mean(after)) if after else 1.0,
        float(np.mean(moved)) if moved else 0.0,
        count,
    )
    return new_rows, report


def _gather_rows(leaf: jax.Array, src: jax.Array) -> jax.Array:
    """`leaf[..., R_old, ...]` with its row axis (axis `src.ndim - 1`) gathered into the rows
    `src[..., R_new]`, the source row of each new row (out of range: an empty row, zero)."""
    lead = src.shape[:-1]
    n = int(np.prod(lead, dtype=np.int64))
    flat = leaf.reshape((n,) + leaf.shape[len(lead) :])
    take = jax.vmap(lambda x, s: jnp.take(x, s, axis=0, mode="fill", fill_value=0))
    out = take(flat, src.reshape(n, -1))
    return out.reshape(lead + out.shape[1:])


def _sources(collections: Any, new_rows: dict[tuple, jax.Array]) -> dict[tuple, jax.Array]:
    """scope -> src[..., R_new]: the old row that holds each new row's expert (R_old, out of
    range, for an empty new row)."""
    out = {}
    for scope, layout in _layouts(collections).items():
        old, new = layout[ROW_EXPERT], new_rows[scope]
        e, r_old = layout[WINDOW_LOAD].shape[-1], old.shape[-1]
        flat_old, flat_new = old.reshape(-1, r_old), new.reshape(-1, new.shape[-1])
        inverse = jax.vmap(lambda x: row_of(x, e))(flat_old)
        src = jax.vmap(lambda inv, n: jnp.where(n >= 0, inv[jnp.maximum(n, 0)], r_old))(
            inverse, flat_new
        )
        out[scope] = src.reshape(new.shape)
    return out


def _expert_scope(key: tuple, sources: dict[tuple, Any]) -> tuple | None:
    """The layout scope whose routed experts hold the parameter at `key`, if any."""
    for scope in sources:
        n = len(scope)
        if key[:n] == scope and len(key) > n and key[n] == EXPERTS:
            return scope
    return None


def _dict_suffix(path) -> tuple:
    """The trailing dict keys of a pytree path (an optimizer-state leaf's parameter path)."""
    keys: list[str] = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def _permute_tree(tree: Any, sources: dict[tuple, jax.Array], expert_keys: dict) -> Any:
    """Every leaf of `tree` whose path ends with a routed-expert parameter path (and has its
    shape) gathered into the new rows."""

    def one(path, leaf):
        key = _dict_suffix(path)
        for n in range(len(key)):
            scope, shape = expert_keys.get(key[n:], (None, None))
            if scope is not None and getattr(leaf, "shape", None) == shape:
                return _gather_rows(leaf, sources[scope])
        return leaf

    return jax.tree_util.tree_map_with_path(one, tree)


def _expert_keys(params: Any, sources: dict[tuple, Any]) -> dict[tuple, tuple]:
    """param path -> (its layout scope, its shape), for every routed expert leaf."""
    keys = {}
    for key, leaf in traverse_util.flatten_dict(params).items():
        scope = _expert_scope(key, sources)
        if scope is not None:
            keys[key] = (scope, leaf.shape)
    return keys


def _with_layouts(state: Any, new_rows: dict[tuple, Any] | None) -> Any:
    """`state` with every window load reset and, given `new_rows`, the rows set."""
    flat = traverse_util.flatten_dict(state.collections[EXPERT_LAYOUT])
    for key in flat:
        if key[-1] == WINDOW_LOAD:
            flat[key] = jnp.zeros_like(flat[key])
        elif new_rows is not None:
            flat[key] = new_rows[key[:-1]].astype(jnp.int32)
    collections = {**state.collections, EXPERT_LAYOUT: traverse_util.unflatten_dict(flat)}
    return state.replace(collections=collections)


def apply_layout(state: Any, new_rows: dict[tuple, jax.Array]) -> Any:
    """`state` (a TrainState) with its experts, their optimizer state and the layouts moved
    to `new_rows` (scope -> int32[..., E]); window loads reset. Pure: jit it (`Relayout`)."""
    sources = _sources(state.collections, new_rows)
    keys = _expert_keys(state.params, sources)
    params = _permute_tree(state.params, sources, keys)
    opt_state = _permute_tree(state.opt_state, sources, keys)
    return _with_layouts(state.replace(params=params, opt_state=opt_state), new_rows)


class Relayout:
    """The re-layout of one experiment's state, compiled once: `Relayout(shardings)(state,
    devices)` plans for `devices` owners and moves the state (module docstring), keeping
    `shardings` (the state's); when no layer's plan changes it only resets the windows.
    Donates the state; returns `(state, RelayoutReport)`."""

    def __init__(self, shardings: Any = None):
        self._move = jax.jit(apply_layout, out_shardings=shardings, donate_argnums=(0,))
        self._reset = jax.jit(
            lambda state: _with_layouts(state, None), out_shardings=shardings, donate_argnums=(0,)
        )

    def __call__(self, state: Any, devices: int) -> tuple[Any, RelayoutReport]:
        new_rows, report = plan(state.collections, devices)
        if report.moved == 0:
            return self._reset(state), report
        return self._move(state, new_rows), report


def logical_view(params: Any, collections: Any, *mirrors: Any) -> tuple[Any, ...]:
    """`(params, collections, *mirrors)` with every layout back to the identity: E rows of
    experts in id order (spare rows dropped), windows emptied, for everything that reads
    weights by expert id: HF export, compress, analysis. `mirrors`: trees whose leaves mirror
    the params' (an optimizer state)."""
    if not _layouts(collections):
        return (params, collections, *mirrors)
    identity = initial_layout(logical_layout(collections[EXPERT_LAYOUT]))
    targets = _layouts({EXPERT_LAYOUT: identity})
    sources = _sources(collections, {scope: v[ROW_EXPERT] for scope, v in targets.items()})
    keys = _expert_keys(params, sources)
    moved = [_permute_tree(tree, sources, keys) for tree in (params, *mirrors)]
    return (moved[0], {**collections, EXPERT_LAYOUT: identity}, *moved[1:])


def onto_rows(state: Any, target: Any) -> Any:
    """`state` (a TrainState restored with the rows it was saved with) re-laid out onto the
    rows of `target` (its abstract TrainState, with shardings) in their initial layout
    (`moejax.moe.expert_layout.initial_row_expert`), windows reset: a checkpoint read into
    another `moe.fssdp_spare_rows`, or weights in id order into a model with spare rows."""
    new_rows = {}
    for scope, layout in _layouts(target.collections).items():
        rows = layout[ROW_EXPERT].shape
        one = initial_row_expert(layout[WINDOW_LOAD].shape[-1], rows[-1])
        new_rows[scope] = np.broadcast_to(one, rows)
    shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), target)
    return jax.jit(apply_layout, out_shardings=shardings)(state, new_rows)


@dataclasses.dataclass(frozen=True)
class WindowRule:
    """The post-update rule of `expert_layout`: the step's sown loads added to
    `window_load`; the rows move only by `Relayout`."""

    def __call__(self, layouts: Any, side_outputs: dict[str, Any], model: Any) -> Any:
        loads = traverse_util.flatten_dict(side_outputs.get(LAYOUT_LOAD) or {})
        out = {}
        for key, leaf in traverse_util.flatten_dict(layouts).items():
            if key[-1] == WINDOW_LOAD:
                load = loads.get(key)
                if load is None or load.shape != leaf.shape:
                    raise ValueError(
                        f"{EXPERT_LAYOUT} {'/'.join(key)} of shape {leaf.shape} has no "
                        f"sown load of that shape among {sorted('/'.join(k) for k in loads)}."
                    )
                leaf = leaf + jax.lax.stop_gradient(load).astype(leaf.dtype)
            out[key] = leaf
        return traverse_util.unflatten_dict(out)

    def report(self, layouts: Any) -> dict[str, Any]:
        return {}
