"""From logical axis names to `NamedSharding`s: one function for every pytree we place.

Parameters are created boxed in `nn.Partitioned` with logical names; `logical_shardings`
maps an abstract (eval_shape) boxed tree through the config's rules to shardings, as in
flax's examples/lm1b. Optimizer states built from boxed params carry the same boxes, so the
same call places them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.config_section import ConfigError
from moejax.sharding.config import batch_mesh_axes


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """While tracing: `nn.with_logical_constraint` in model code resolves through `rules`
    on `mesh` (inside jit, so the abstract mesh; outside this context it is a no-op)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
        yield


def under_rules(fn, mesh: Mesh, rules):
    """`fn` traced inside `activation_rules(mesh, rules)` (wrap before `jax.jit`)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_rules(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def batch_sharding(mesh: Mesh, rules, lead: int = 0) -> NamedSharding:
    """The batch dimension split over the mesh axes of the `batch` rule; `lead` unsplit
    axes before it (e.g. 1 for per-layer, per-token values [layers, B, L])."""
    return NamedSharding(mesh, PartitionSpec(*([None] * lead), batch_mesh_axes(rules)))


def shard_batch(batch: dict, mesh: Mesh, rules) -> dict:
    """Process-local NumPy batch -> global jax.Arrays split over the batch axes."""
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_divisible(abstract_boxed: Any, mesh: Mesh, rules) -> None:
    """Every sharded dimension must divide by its mesh axes; one clear error otherwise.

    Called on the abstract (eval_shape) state, so it fails before anything is compiled.
    """
    specs = logical_shardings(abstract_boxed, mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_boxed))
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(specs)):
        for dim, axes in zip(leaf.shape, sharding.spec):
            if axes is None:
                continue
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            size = 1
            for a in names:
                size *= mesh.shape[a]
            if dim % size:
                where = jax.tree_util.keystr(path)
                raise ConfigError(
                    f"parameter {where} has a dimension of {dim} that the mesh axes {names} "
                    f"(size {size}) do not divide; change the mesh sizes (config.mesh), the "
                    f"model size, or map that logical axis to None in config.mesh.rules."
                )
