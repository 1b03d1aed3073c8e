"""Calibration: run a model over a few batches and collect, per MoE layer and expert, what
pruning and merging decide by.

    cal = calibrate(model, variables, batches)      # batches: dicts of [B, L] arrays
    cal.layers[0].counts, cal.layers[0].easy_ep     # [E] per MoE layer

Per MoE layer l (in model order; `model_layer` is its index among all layers) and expert e:

- `counts[e]`: the assignments (slots with a nonzero combine weight of real tokens);
- `gate_mass[e]`: the sum of their combine weights g;
- `output_norm[e]`: the sum of ||E_e(h_t)||_2, the expert's own output (before g);
- `weighted_norm[e]`: the sum of g ||E_e(h_t)||_2: EASY-EP's output-aware expert importance
  (Dong et al. 2025, "Domain-Specific Pruning of Large Mixture-of-Experts Models with
  Few-shot Demonstrations", arXiv 2504.06792);
- `easy_ep[e]`: the sum of g ||E_e(h_t)||_2 c_t with EASY-EP's expert-level token
  contribution c_t = max(1 - cos(x_t, x_t + r_t), 0), x_t the residual stream entering the
  FFN sub-layer and r_t the routed experts' combined output (shared experts excluded);
- `inputs`: the layer's FFN inputs h_t (after `ffn_norm`) of the first `max_inputs` real
  tokens, for merging (expert outputs on common inputs) and quantisation error.

The routing is the one the MoE layers returned in the forward pass (`MoEOutput.per_token`:
`expert_ids`, `combine_weights`, as the routing traces of `moejax.analysis.trace` record
it). The FFN inputs and the residual stream are recorded by intercepting each MoE block's
`ffn_norm` (`flax.linen.intercept_methods`, sown into the `calibration` collection, which
the layer scan stacks like every collection); the expert outputs are then computed on the
host from the layer's expert weights (float32 SwiGLU, `moejax.moe.experts`), only for the
(token, expert) pairs the router chose.

EASY-EP's definitions were checked against the authors' code (RUCAIBox/EASYEP,
pruning/model_new.py and pruning/expert_selection.py: score[layer, e] += weight * norm *
max(1 - cos(x_before_moe, x_before_moe + routed_moe), 0), summed over tokens and
demonstrations; top-N experts kept per layer) and its abstract (gating scores times the L2
norms of the activated experts' outputs; token contribution from the representation
similarity before and after the routed experts); the paper's full text was not reachable.
The authors use the 25 longest demonstrations; here the caller chooses the batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.compress.layers import check_scanned, subtree, unstack
from moejax.hf.layout import layer_slot
from moejax.nn.collections import CALIBRATION, SIDE_OUTPUTS, sow_value
from moejax.nn.norm import RMSNorm

FFN_NORM = "ffn_norm"


@dataclasses.dataclass
class LayerCalibration:
    """One MoE layer's statistics (module docstring); arrays are NumPy, float64 sums."""

    model_layer: int
    counts: np.ndarray
    gate_mass: np.ndarray
    output_norm: np.ndarray
    weighted_norm: np.ndarray
    easy_ep: np.ndarray
    inputs: np.ndarray
    tokens: int = 0

    @property
    def num_experts(self) -> int:
        return len(self.counts)


@dataclasses.dataclass
class Calibration:
    layers: list[LayerCalibration]

    def summary(self) -> list[dict]:
        """JSON-ready per-layer statistics (without the recorded inputs)."""
        fields = ("counts", "gate_mass", "output_norm", "weighted_norm", "easy_ep")
        return [
            {
                "model_layer": c.model_layer,
                "tokens": c.tokens,
                **{f: np.asarray(getattr(c, f)).tolist() for f in fields},
            }
            for c in self.layers
        ]


def _record_moe_inputs(next_fun, args, kwargs, context):
    """Interceptor: an MoE block's `ffn_norm` sows its input (the residual stream) and its
    output (the MoE layer's input)."""
    out = next_fun(*args, **kwargs)
    module = context.module
    if (
        context.method_name == "__call__"
        and isinstance(module, RMSNorm)
        and module.name == FFN_NORM
        and getattr(module.parent, "moe", None) is not None
    ):
        sow_value(module, CALIBRATION, "residual", args[0])
        sow_value(module, CALIBRATION, "moe_input", out)
    return out


def capture_fn(model):
    """jit((variables, batch) -> (sown calibration tree, expert_ids, combine_weights,
    logits)): the routing and logits are the model's own outputs."""

    def run(variables, batch):
        with nn.intercept_methods(_record_moe_inputs):
            (logits, extras), state = model.apply(
                variables,
                batch["inputs"],
                batch["segment_ids"],
                batch["positions"],
                mutable=[CALIBRATION, *SIDE_OUTPUTS],
            )
        routing = extras["routing"]
        return state[CALIBRATION], routing["expert_ids"], routing["combine_weights"], logits

    return jax.jit(run)


def moe_layers(m) -> list[int]:
    return [i for i, kind in enumerate(m.layer_layout) if kind.moe]


def expert_weights(variables, m) -> dict[int, dict[str, np.ndarray]]:
    """{model layer: {"w_gate", "w_up", "w_down"} float32 [E, ...]} of every MoE layer."""
    layers, _ = unstack(variables["params"], m)
    out = {}
    for i in moe_layers(m):
        experts = layers[i]["moe"]["experts"]
        extra = sorted(set(experts) - {"w_gate", "w_up", "w_down"})
        if extra:
            raise ValueError(
                f"layer {i}: the routed experts carry adapter weights {extra}; merge the "
                f"adapters into the base weights first."
            )
        out[i] = {k: np.asarray(v, np.float32) for k, v in experts.items()}
    return out


def swiglu(w: dict[str, np.ndarray], e: int, h: np.ndarray) -> np.ndarray:
    """Expert e's SwiGLU on rows h [n, d] (float32): silu(h W_gate) * (h W_up) W_down."""
    a = h @ w["w_gate"][e]
    return ((a / (1.0 + np.exp(-a))) * (h @ w["w_up"][e])) @ w["w_down"][e]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def calibrate(
    model,
    variables,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    max_inputs: int = 512,
    capture=None,
) -> Calibration:
    """The calibration statistics of `model` over `batches` (module docstring): dicts with
    `inputs`, `segment_ids`, `positions` [B, L] (the data pipeline's batches)."""
    m = model.model
    check_scanned(m)
    layers = moe_layers(m)
    if not layers:
        raise ValueError("the model has no MoE layer: nothing to calibrate.")
    weights = expert_weights(variables, m)
    capture = capture or capture_fn(model)
    stats = []
    for i in layers:
        e = weights[i]["w_gate"].shape[0]
        z = np.zeros(e)
        stats.append(
            LayerCalibration(
                i,
                np.zeros(e, np.int64),
                z.copy(),
                z.copy(),
                z.copy(),
                z.copy(),
                np.zeros((0, m.d_model), np.float32),
            )
        )
    for batch in batches:
        device = {k: jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions")}
        sown, ids, gates, _ = jax.device_get(capture(variables, device))
        real = (np.asarray(batch["segment_ids"]) > 0).reshape(-1)
        for layer, (i, st) in enumerate(zip(layers, stats)):
            path, index = layer_slot(m, i)
            x = np.asarray(subtree(sown, f"{path}/{FFN_NORM}/residual")[index], np.float32)
            h = np.asarray(subtree(sown, f"{path}/{FFN_NORM}/moe_input")[index], np.float32)
            x, h = x.reshape(-1, x.shape[-1])[real], h.reshape(-1, h.shape[-1])[real]
            k = ids.shape[-1]
            lid = np.asarray(ids[layer]).reshape(-1, k)[real]
            g = np.asarray(gates[layer], np.float64).reshape(-1, k)[real]
            _accumulate(st, weights[i], x, h, lid, g)
            if len(st.inputs) < max_inputs:
                st.inputs = np.concatenate([st.inputs, h[: max_inputs - len(st.inputs)]])
    return Calibration(stats)


def _accumulate(st: LayerCalibration, w, x, h, ids, g) -> None:
    """Adds one batch's real tokens (x, h [T, d], ids, g [T, k]) to a layer's sums."""
    t_idx, slot = np.nonzero(g > 0)
    experts = ids[t_idx, slot]
    gate = g[t_idx, slot]
    norms = np.zeros(len(t_idx))
    routed = np.zeros_like(x, np.float64)
    for e in np.unique(experts):
        rows = np.flatnonzero(experts == e)
        out = swiglu(w, int(e), h[t_idx[rows]]).astype(np.float64)
        norms[rows] = np.linalg.norm(out, axis=-1)
        np.add.at(routed, t_idx[rows], gate[rows, None] * out)
    contribution = np.maximum(1.0 - _cosine(x.astype(np.float64), x + routed), 0.0)
    n = st.num_experts
    st.counts += np.bincount(experts, minlength=n)[:n]
    st.gate_mass += np.bincount(experts, weights=gate, minlength=n)[:n]
    st.output_norm += np.bincount(experts, weights=norms, minlength=n)[:n]
    st.weighted_norm += np.bincount(experts, weights=gate * norms, minlength=n)[:n]
    st.easy_ep += np.bincount(experts, weights=gate * norms * contribution[t_idx], minlength=n)[:n]
    st.tokens += len(x)
