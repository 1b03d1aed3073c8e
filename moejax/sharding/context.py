"""`InMesh(fn, mesh)`: a jitted function that runs, traces and lowers with `mesh` as the
context mesh (`jax.set_mesh`).

Sharded dispatchers (`expert_parallel`, `fssdp`) build their `jax.shard_map` over the mesh
they find in the context (`jax.sharding.get_abstract_mesh()` at trace time), so model code
never receives a mesh. `jax.set_mesh` may only be entered outside `jax.jit`, so the trainer
wraps its compiled steps with this instead of setting the mesh inside them.
"""

from __future__ import annotations

import jax


class InMesh:
    """Calls (and `.trace`/`.lower`s) the jitted `fn` under `jax.set_mesh(mesh)`."""

    def __init__(self, fn, mesh):
        self.fn = fn
        self.mesh = mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.trace(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)
