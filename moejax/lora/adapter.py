"""Low-rank adapters on a frozen projection: LoRA (Hu et al., 2021, arXiv 2106.09685).

    y = x W + s * (x A) B,   A: [d_in, r],  B: [r, d_out],  s = alpha / r

`rslora` scales by `alpha / sqrt(r)` instead (Kalajdzievski, 2023, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA"). A starts uniform in +-1/sqrt(d_in) (peft's
kaiming-uniform with a = sqrt(5)), B at zero, so an untrained adapter leaves the base model
exactly as it was.

Parameter contract (what training, checkpoints, merging and the peft import rely on): the
adapter of projection `<param>` of module `<module>` is the child module `lora_<param>` of
that module, holding `a[E, d_in, r]` and `b[E, r, d_out]` (E = 1 for plain LoRA; d_in and
d_out are the projection's flattened input and output sizes, e.g. `attn.wq[d, H, D]` has
d_in = d and d_out = H * D in (head, dim) order). Every adapter leaf therefore has a path
component starting with `lora_` (`is_adapter_path`), and the base parameters keep exactly
the names and shapes of the model without adapters.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.lora import collect
from moejax.lora.config import LoRAConfig
from moejax.lora.routing import cv_squared_loss, dense_gates, dynmole, flylora, router_config

ADAPTER_PREFIX = "lora_"
BIAS_COLLECTION = "lora_bias"  # non-trainable balancing biases (SMoRA, FlyLoRA)
FROZEN_COLLECTION = "lora_frozen"  # non-trainable adapter weights (FlyLoRA's A)
COLLECTIONS = (BIAS_COLLECTION, FROZEN_COLLECTION)


def target_patterns(cfg: LoRAConfig) -> tuple[str, ...]:
    return tuple(p.strip() for p in cfg.targets.split(",") if p.strip())


def is_target(cfg: LoRAConfig | None, module: str, param: str) -> bool:
    """Whether `<module>.<param>` (e.g. `attn.wq`) matches one of `cfg.targets`."""
    if cfg is None or cfg.method == "none":
        return False
    return any(fnmatch.fnmatchcase(f"{module}.{param}", p) for p in target_patterns(cfg))


def lora_scale(cfg: LoRAConfig) -> float:
    """s = alpha / n, n = r ("rank"), top_k r ("active", SMoRA) or E r ("total", FlyLoRA);
    sqrt(n) with `rslora`."""
    n = {"rank": cfg.rank, "active": cfg.top_k * cfg.rank, "total": cfg.num_experts * cfg.rank}[
        cfg.scaling
    ]
    return cfg.alpha / (math.sqrt(n) if cfg.rslora else n)


def is_adapter_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path (keys or jax key entries) lies inside an adapter module."""
    for entry in path:
        key = getattr(entry, "key", entry)
        if isinstance(key, str) and key.startswith(ADAPTER_PREFIX):
            return True
    return False


def _uniform_fan_in(key, shape, dtype):
    bound = 1.0 / math.sqrt(shape[-2])  # fan-in: the d_in axis of a[E, d_in, r]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def sparse_random_a(key, shape, density: float, dtype=jnp.float32):
    """FlyLoRA's frozen A (`flylora.py`): each of the E*r rank rows (an `a[E, d_in, r]`
    column) has max(1, int(d_in * density)) non-zeros at random inputs, drawn N(0, 1/R^2)
    with R = E r the total rank."""
    e, d_in, r = shape
    k_idx, k_val = jax.random.split(key)
    nnz = max(1, int(d_in * density))
    order = jnp.argsort(jax.random.uniform(k_idx, (e, r, d_in)), axis=-1)
    mask = jnp.argsort(order, axis=-1) < nnz  # the rank of each input in a random order
    values = jax.random.normal(k_val, (e, r, d_in), dtype) / (e * r)
    return jnp.where(mask, values, 0.0).astype(dtype).transpose(0, 2, 1)


class LoRAAdapter(nn.Module):
    """`delta(x[..., d_in], gates) -> [..., d_out]`: the low-rank update of one projection,
    `s * B (expand(g, r) * A x)` with E experts of rank r on the rank axis (module docstring
    of `moejax.lora.config.LoRAConfig`; the variants are `moejax.lora.variants`).

    Children and variables (all under this module, `lora_<param>`): `a[E, d_in, r]`
    (`[1, d_in, r]` with `shared_a`; FlyLoRA: in the non-trainable `lora_frozen`
    collection), `b[E, r, d_out]` (zeros), `router` (a `moejax.moe.routers.LinearRouter`,
    method "moe"; its `sigmoid_bias` bias in the `lora_bias` collection), `bias[E]`
    (FlyLoRA, `lora_bias`), `gate[r]` (SoRA). `gates[T, E]` are X-LoRA's scalings (given by
    the model's classifier); other methods make their own.
    """

    cfg: LoRAConfig
    d_out: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, gates: jax.Array | None = None) -> jax.Array:
        # moejax.moe imports moejax.models.layers, which imports this module: import late.
        from moejax.moe.dispatch import dispatch
        from moejax.moe.experts import ExpertFn
        from moejax.moe.routers import LinearRouter

        cfg, d_in, lead = self.cfg, x.shape[-1], x.shape[:-1]
        e, r = cfg.num_experts, cfg.rank
        pdt, dt = jnp.dtype(self.param_dtype), jnp.dtype(self.dtype)
        shape_a = (1 if cfg.shared_a else e, d_in, r)
        axes_a, axes_b = (
            ("lora_experts", "lora_in", "lora_rank"),
            ("lora_experts", "lora_rank", "lora_out"),
        )
        if cfg.method == "flylora":
            density = cfg.flylora_density or cfg.top_k / (e * r)
            init = nn.with_logical_partitioning(
                lambda: sparse_random_a(self.make_rng("params"), shape_a, density, pdt), axes_a
            )
            a = self.variable(FROZEN_COLLECTION, "a", init).value
        else:
            a = self.param("a", nn.with_logical_partitioning(_uniform_fan_in, axes_a), shape_a, pdt)
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, axes_b),
            (e, r, self.d_out),
            pdt,
        )
        x2 = x.reshape(-1, d_in).astype(dt)
        a, b = a.astype(dt), b.astype(dt)
        # h = A x for every expert: [T, E_a, r] (one matmul over the concatenated ranks).
        h = (x2 @ a.transpose(1, 0, 2).reshape(d_in, -1)).reshape(x2.shape[0], -1, r)
        routing = None
        # Padding tokens (segment id 0) take no part in the routers' losses and statistics.
        mask = collect.context().get("token_mask")
        mask = None if mask is None or mask.size != x2.shape[0] else mask.reshape(-1)
        if cfg.method == "moe":
            routing = LinearRouter(
                router_config(cfg, e),
                param_dtype=self.param_dtype,
                rule=functools.partial(dynmole, lo=cfg) if cfg.router == "dynmole" else None,
                bias_collection=BIAS_COLLECTION,
                expert_axis="lora_experts",
                name="router",
            )(x2, mask_T=mask)
        elif cfg.method == "flylora":
            bias = self.variable(
                BIAS_COLLECTION,
                "bias",
                nn.with_logical_partitioning(jnp.zeros, ("lora_experts",)),
                (e * r,),
                jnp.float32,
            ).value
            routing = flylora(
                jax.lax.stop_gradient(h.reshape(h.shape[0], -1)), bias, cfg.top_k, mask
            )
        if routing is not None:
            gates = dense_gates(routing, e * r if cfg.method == "flylora" else e)
            aux = dict(routing.aux_losses)
            if cfg.cv_coef:
                aux["cv_squared"] = cfg.cv_coef * cv_squared_loss(gates)
            # The load goes where the bias is: the router's scope (moe) or this one.
            path = self.scope.path + (("router",) if cfg.method == "moe" else ())
            collect.report(
                path, aux, routing.metrics, routing.metrics["load"] if has_bias(cfg) else None
            )
        if cfg.method == "sora":  # SoRA's gate on the ranks (moejax.lora.sora)
            h = h * self.param(
                "gate",
                nn.with_logical_partitioning(nn.initializers.ones, ("lora_rank",)),
                (r,),
                pdt,
            ).astype(dt)
        if routing is not None and cfg.dispatcher != "rank" and cfg.method == "moe":
            fn = ExpertFn(lambda w, xs, mm: mm(mm(xs, w["a"]), w["b"]), {"a": a, "b": b})
            y, _ = dispatch(x2, routing, fn, router_config(cfg, e))
        else:
            y = mix_ranks(h, gates, b)
        y = lora_scale(cfg) * y
        return y.reshape(lead + (self.d_out,))


def has_bias(cfg: LoRAConfig) -> bool:
    """Whether the adapters keep a balancing bias in `lora_bias` (SMoRA, FlyLoRA)."""
    return cfg.method == "flylora" or (cfg.method == "moe" and cfg.router == "sigmoid_bias")


def mix_ranks(h: jax.Array, gates: jax.Array | None, b: jax.Array) -> jax.Array:
    """sum_e g_e h_e B_e as one matmul over the concatenated ranks: `h[T, E_a, r]` (E_a = 1:
    one A shared by the heads), `gates[T, E]` (None = all 1), `b[E, r, d_out]`."""
    e, r, d_out = b.shape
    h = jnp.broadcast_to(h, (h.shape[0], e, r))
    if gates is not None:
        h = h * gates.astype(h.dtype)[:, :, None]
    return h.reshape(h.shape[0], e * r) @ b.reshape(e * r, d_out)


def lora_delta(
    module: nn.Module,
    cfg: LoRAConfig | None,
    param: str,
    x: jax.Array,
    out_shape: Sequence[int],
    dtype: str,
    param_dtype: str,
) -> jax.Array | None:
    """The adapter output `[..., *out_shape]` for `module.param` if it is targeted, else None.

    `x[..., d_in]` is the projection's input with its input axes flattened. Call inside the
    module's compact method; the adapter becomes its child `lora_<param>`. X-LoRA's
    scalings come from the enclosing block (`moejax.lora.collect.context`).
    """
    if not is_target(cfg, module.name, param):
        return None
    if cfg.method == "mixlora":  # MixLoRA's attention adapters are plain LoRA
        cfg = dataclasses.replace(cfg, method="lora", num_experts=1, top_k=1)
    d_out = math.prod(out_shape)
    gates = None
    if cfg.method == "xlora":
        scalings = collect.context().get("xlora_scalings")
        gates = None if scalings is None else scalings.reshape(-1, scalings.shape[-1])
    delta = LoRAAdapter(cfg, d_out, dtype, param_dtype, name=ADAPTER_PREFIX + param)(x, gates)
    return delta.reshape(delta.shape[:-1] + tuple(out_shape))


def add_delta(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta.astype(y.dtype)


def split_tree(params: Any, selected: Callable[[tuple], bool]) -> tuple[dict, dict]:
    """`params -> (the leaves whose key path satisfies `selected`, the others)`, two nested
    dicts of whatever leaves `params` holds; `join_trees` puts them back together."""
    from flax import traverse_util

    parts: tuple[dict, dict] = ({}, {})
    for path, leaf in traverse_util.flatten_dict(params).items():
        parts[0 if selected(path) else 1][path] = leaf
    return traverse_util.unflatten_dict(parts[0]), traverse_util.unflatten_dict(parts[1])


def join_trees(*trees: Any) -> dict:
    """The union of nested dicts with disjoint leaves (the inverse of `split_tree`)."""
    from flax import traverse_util

    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def split_adapters(params: Any) -> tuple[dict, dict]:
    """`params -> (base, adapters)`: the leaves outside adapter modules, and those inside."""
    adapters, base = split_tree(params, is_adapter_path)
    return base, adapters


def join_adapters(base: Any, adapters: Any) -> dict:
    """The inverse of `split_adapters`."""
    return join_trees(base, adapters)
