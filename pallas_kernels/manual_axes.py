"""Varying manual mesh axes ("vma") inside `jax.shard_map`, for custom VJPs and loops.

`jax.shard_map` checks which manual mesh axes each value varies over. A loop carry built from
constants is invariant while its body makes it vary; a `custom_vjp`'s cotangent of an
operand that was invariant over an axis (expert weights across `data`) comes back varying
and must be summed over that axis: the transpose of the implicit `pcast` to varying. Both
the Pallas kernels' VJPs and the pure-JAX grouped matmul need these. Outside shard_map every
function here is the identity.
"""

from __future__ import annotations

import jax


def varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes `x` varies over inside `jax.shard_map` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax 0.10: ShapedArray.mat.varying; earlier: .vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """`x` marked as varying over every manual mesh axis its `refs` vary over.

    Inside `jax.shard_map` (which checks varying manual axes, "vma") a loop carry built from
    constants is device-invariant while the body makes it vary with the operands; the
    carry's input and output types must match. A no-op outside shard_map.
    """
    want = frozenset().union(*(varying_axes(r) for r in refs))
    missing = tuple(sorted(want - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def sum_to_vma(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the manual axes it varies over and its primal does not.

    The transpose of the implicit `pcast(..., to="varying")` that shard_map inserts when an
    operand invariant over an axis (e.g. expert weights across `data`) meets a varying one;
    a `custom_vjp` must do it itself. A no-op outside shard_map.
    """
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


def vary_together(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Every `x` marked as varying over the union of the manual axes any of them varies over:
    the operands of one kernel call (Pallas's interpreter and some lowerings require operands
    of equal vma). A no-op outside shard_map."""
    return tuple(vary_like(x, *xs) for x in xs)
