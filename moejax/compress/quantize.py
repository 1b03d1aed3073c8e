"""Weight-only post-training quantization of a model's layers by module kind, through qwix.

    layers, rest = unstack(variables["params"], model.model)
    policy = QuantPolicy(bits={"attn": 8, "shared": 8, "experts": 4})
    new_layers, report = quantize_layers(layers, policy, expert_bits=None)

Each weight matrix (a leaf named `w*`: `wq, wk, wv, wo`, MLA's `wq_a, wkv_a, wkv_b`,
`w_gate, w_up, w_down`) of the chosen kinds is quantized with `qwix.quantize` (symmetric
absmax, integer `int2` ... `int8`) and dequantized back with `qwix.dequantize`, the
round-to-nearest weight-only PTQ baseline, per MoE module kind as QuantMoE-Bench (Li et al.
2024, "Examining Post-Training Quantization for Mixture-of-Experts") compares policies (the
paper's text was not read here: the kinds and the loss / accuracy / size table follow the
issue's description of it; qwix's API was read from the installed qwix 0.1.8):

- `attn`: the attention projections; `wo [H, Dh, d]` contracts its first two axes, the rest
  their first;
- `shared`: the shared experts (`moe/shared`); `dense`: the FFN of dense layers (`mlp`);
- `experts`: the routed experts `[E, K, N]`, each expert its own scales (`e` and `n`
  channelwise), and with `expert_bits` (`moejax.compress.bit_allocation`, MC#) its own
  bit width.

The scales are per output channel (every axis but the contracted ones), or per group of
`group_size` input rows along the (first) contracted axis (`tiled_axes` of qwix). The
router, the norms, the biases, the embedding and the LM head stay in float, bit for bit.

Storage: the run written by `python -m moejax.compress quantize` keeps the dequantized
(fake-quantized) float weights, with the policy, the bits of every expert and the
size accounting in the checkpoint's `compression` record; `load_run`, `moejax.eval` and
`moejax.hf.save_pretrained` (a float export of the quantized values) read it like any run.
`model_bytes` is the size the weights would have stored as integers: `bits / 8` bytes per
quantized value (packed; int3 is held by qwix as int4 in memory) plus the scales in the
weight's float dtype, and every float leaf at its own dtype. The grouped matmul that runs
on integer expert weights and their scales is `moejax.moe.quantized_gmm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from moejax.compress.layers import restack, subtree, unstack
from moejax.config_section import ConfigError

KIND_PATHS = {"attn": "attn", "shared": "moe/shared", "experts": "moe/experts", "dense": "mlp"}
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_QTYPES = {4: jnp.int4, 8: jnp.int8}


def qtype(bits: int):
    """qwix's integer type of `bits` bits."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits}: qwix integer types have {SUPPORTED_BITS} bits.")
    return _QTYPES.get(bits, f"int{bits}")


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """Bits per module kind (absent: kept in float) and the scale granularity."""

    bits: dict[str, int]
    group_size: int = 0  # 0: one scale per output channel

    def __post_init__(self):
        for kind, b in self.bits.items():
            if kind not in KIND_PATHS:
                raise ConfigError(f"--kinds: {kind!r} is not one of {sorted(KIND_PATHS)}.")
            qtype(b)
        if self.group_size < 0:
            raise ConfigError(f"--group_size={self.group_size} must be >= 0 (0: per channel).")


def contracted_axes(name: str, ndim: int, stacked: bool) -> tuple[int, ...]:
    """The input (contracted) axes of weight `name`; `stacked`: a leading expert axis."""
    first = 1 if stacked else 0
    axes = (first, first + 1) if name == "wo" else (first,)
    if max(axes) >= ndim:
        raise ValueError(f"weight {name!r} of rank {ndim} has no input axes {axes}.")
    return axes


def quantize_weight(w: np.ndarray, bits: int, contract: tuple[int, ...], group_size: int = 0):
    """qwix QArray of `w`: one scale per output channel, or per `group_size` rows of the
    first contracted axis (when that axis holds a whole number of groups)."""
    channelwise = tuple(a for a in range(w.ndim) if a not in contract)
    tiled = None
    if group_size and w.shape[contract[0]] > group_size:
        if w.shape[contract[0]] % group_size:
            raise ConfigError(
                f"--group_size={group_size} does not divide an input axis of "
                f"{w.shape[contract[0]]}; use a divisor or 0 (per channel)."
            )
        tiled = {contract[0]: group_size}
    return qwix.quantize(
        jnp.asarray(w), qtype(bits), channelwise_axes=channelwise, tiled_axes=tiled
    )


def fake_quantize(
    w: np.ndarray, bits: int, contract, group_size: int = 0
) -> tuple[np.ndarray, int]:
    """(dequantized `w` in its dtype, its stored size in bytes: values plus scales)."""
    q = quantize_weight(w, bits, contract, group_size)
    out = np.asarray(qwix.dequantize(q)).astype(w.dtype)
    return out, (w.size * bits + 7) // 8 + q.scale.size * w.dtype.itemsize


def _is_weight(name: str, leaf) -> bool:
    return name.startswith("w") and np.ndim(leaf) >= 2


def quantize_layers(
    layers: list[Any],
    policy: QuantPolicy,
    expert_bits: dict[int, np.ndarray] | None = None,
) -> tuple[list[Any], dict]:
    """Quantizes the per-layer `params` trees (`moejax.compress.layers.unstack`) by `policy`;
    `expert_bits[i]` ([E] ints) overrides the `experts` bits of model layer i per expert.
    Returns (new trees, {"bytes": quantized weight bytes, "float_bytes": their float size,
    "sq_error": sum of squared weight errors per kind})."""
    report = {"bytes": 0, "float_bytes": 0, "sq_error": {k: 0.0 for k in policy.bits}}
    out = []
    for i, layer in enumerate(layers):
        layer = jax.tree.map(np.asarray, layer)
        for kind, bits in policy.bits.items():
            node = subtree(layer, KIND_PATHS[kind])
            if node is None:
                continue
            per_expert = expert_bits.get(i) if (kind == "experts" and expert_bits) else None
            for name, w in list(node.items()):
                if not _is_weight(name, w):
                    continue
                stacked = kind == "experts"
                contract = contracted_axes(name, w.ndim, stacked)
                if per_expert is None:
                    new, size = fake_quantize(w, bits, contract, policy.group_size)
                else:
                    if len(per_expert) != w.shape[0]:
                        raise ValueError(
                            f"layer {i}: {len(per_expert)} expert bit widths for "
                            f"{w.shape[0]} experts."
                        )
                    # the experts of one width at once: the expert axis is channelwise
                    new, size = np.empty_like(w), 0
                    for b in np.unique(per_expert):
                        ids = np.flatnonzero(np.asarray(per_expert) == b)
                        part, part_size = fake_quantize(w[ids], int(b), contract, policy.group_size)
                        new[ids], size = part, size + part_size
                node[name] = new
                report["bytes"] += size
                report["float_bytes"] += w.nbytes
                diff = new.astype(np.float64) - w.astype(np.float64)
                report["sq_error"][kind] += float(np.sum(diff * diff))
        out.append(layer)
    return out, report


def expert_quant_errors(
    experts: dict[str, np.ndarray], candidate_bits, group_size: int = 0
) -> np.ndarray:
    """[E, B]: each expert's squared Frobenius quantization error over its weight matrices
    at each candidate bit width (the error term of MC#'s bit allocation)."""
    names = [n for n, w in experts.items() if _is_weight(n, w)]
    num = experts[names[0]].shape[0]
    err = np.zeros((num, len(candidate_bits)))
    for j, bits in enumerate(candidate_bits):
        for name in names:
            w = np.asarray(experts[name])
            contract = contracted_axes(name, w.ndim, stacked=True)
            deq, _ = fake_quantize(w, bits, contract, group_size)
            d = deq.astype(np.float64) - w.astype(np.float64)
            err[:, j] += np.sum(d * d, axis=tuple(range(1, w.ndim)))
    return err


def tree_bytes(tree) -> int:
    """The float size of every leaf of `tree`."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def quantize_variables(model, variables: dict, policy: QuantPolicy, expert_bits=None):
    """`variables` with its `params` quantized by `policy` (`quantize_layers`; the other
    collections as they are). The report adds `model_bytes`: the quantized weights at their
    integer size plus every other `params` leaf at its float size, and `float_model_bytes`."""

    layers, rest = unstack(variables["params"], model.model)
    new_layers, report = quantize_layers(layers, policy, expert_bits)
    params = restack(new_layers, rest, model.model)
    total = tree_bytes(variables["params"])
    report["float_model_bytes"] = total
    report["model_bytes"] = total - report["float_bytes"] + report["bytes"]
    return {**variables, "params": params}, report
