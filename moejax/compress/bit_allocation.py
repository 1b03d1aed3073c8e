"""Per-expert bit widths from expert importance: the integer program of MC#'s Pre-Loading
Mixed-Precision Quantization (Huang et al. 2025, "MC#: Mixture Compressor for
Mixture-of-Experts Large Models", arXiv 2510.10962).

For one MoE layer with experts i (importance s_i, parameter count n_i) and candidate bit
widths b (quantization error e_ib = ||W_i - Q_b(W_i)||_F^2, `quantize.expert_quant_errors`),
choose x_ib in {0, 1}:

    minimise   sum_ib  s_i e_ib x_ib
    subject to sum_b x_ib = 1                          (one width per expert)
               sum_ib  n_i b x_ib <= avg_bits sum_i n_i  (the average-bits budget)

solved exactly by `scipy.optimize.milp` (HiGHS branch and bound). Verified against MC#'s
public abstract and summaries only (bit allocation by linear programming over expert
importance and quantization error, under an average-bit budget, e.g. 2.57 bits); the
paper's exact objective weighting was not reachable, so this is the importance-weighted
error form above, with importance from `moejax.compress.calibrate` (`--importance`:
frequency, gate_mass, output_norm or easy_ep), normalised to sum to 1 in the layer.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from moejax.compress.calibrate import expert_weights
from moejax.compress.prune import importance
from moejax.compress.quantize import expert_quant_errors, qtype
from moejax.config_section import ConfigError


def allocate_bits(
    importance: np.ndarray,
    errors: np.ndarray,
    candidate_bits,
    avg_bits: float,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """[E] bit widths minimising sum_i importance_i errors[i, b_i] with the size-weighted
    mean bit width at most `avg_bits` (module docstring)."""
    importance = np.asarray(importance, np.float64)
    errors = np.asarray(errors, np.float64)
    bits = np.asarray(candidate_bits, np.float64)
    num, nb = errors.shape
    if importance.shape != (num,) or nb != len(bits):
        raise ValueError(f"importance {importance.shape} and errors {errors.shape} disagree.")
    sizes = np.ones(num) if sizes is None else np.asarray(sizes, np.float64)
    if avg_bits < bits.min() or not np.isfinite(avg_bits):
        raise ConfigError(
            f"--avg_bits={avg_bits} is below the smallest candidate width {int(bits.min())}; "
            f"raise it or add a smaller width to --candidate_bits."
        )
    total = importance.sum()
    weight = importance / total if total > 0 else np.full(num, 1.0 / num)
    cost = (weight[:, None] * errors).ravel()
    one_each = np.kron(np.eye(num), np.ones(nb))
    budget = (sizes[:, None] * bits[None, :]).ravel()[None, :]
    res = milp(
        cost,
        integrality=np.ones(num * nb),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(budget, -np.inf, avg_bits * sizes.sum() * (1 + 1e-12)),
        ],
    )
    if not res.success:
        raise ValueError(f"bit allocation: the integer program failed ({res.message}).")
    choice = np.asarray(res.x).reshape(num, nb).argmax(axis=1)
    return bits[choice].astype(np.int64)


def plan_expert_bits(
    model, variables, cal, method: str, candidate_bits, avg_bits: float, group_size: int = 0
) -> dict[int, np.ndarray]:
    """{model layer: [E] bit widths} for every MoE layer of a calibrated model: importance
    `method` (`moejax.compress.prune.IMPORTANCE`) and each expert's qwix quantization error
    at every candidate width, allocated per layer by `allocate_bits`."""
    candidate_bits = sorted({int(b) for b in candidate_bits})
    for b in candidate_bits:
        qtype(b)
    weights = expert_weights(variables, model.model)
    plan = {}
    for c, score in zip(cal.layers, importance(cal, method)):
        experts = weights[c.model_layer]
        errors = expert_quant_errors(experts, candidate_bits, group_size)
        sizes = sum(np.asarray(w)[0].size for w in experts.values()) * np.ones(len(score))
        plan[c.model_layer] = allocate_bits(score, errors, candidate_bits, avg_bits, sizes)
    return plan
