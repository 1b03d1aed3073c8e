"""Router auxiliary losses and routing statistics.

All functions take router probabilities `probs[T, E]` or logits, the selected
`expert_ids[T, k]`, and an optional `mask[T]` (1 for real tokens, 0 for padding) so padded
positions of packed batches do not count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.one_hot import count_ids


def _mask(t: int, mask: jax.Array | None) -> jax.Array:
    return jnp.ones((t,), jnp.float32) if mask is None else mask.astype(jnp.float32)


def expert_load(
    expert_ids: jax.Array,
    num_experts: int,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Fraction of the (token, choice) assignments that go to each expert: [E], sums to 1.

    `weights[T, k]` (optional) excludes slots with zero combine weight (top-p padding).
    """
    t, k = expert_ids.shape
    m = _mask(t, mask)[:, None] * jnp.ones((1, k), jnp.float32)
    if weights is not None:
        m = m * (weights > 0)
    counts = count_ids(expert_ids, num_experts, m)
    return counts / jnp.maximum(jnp.sum(m), 1.0)


def balance_statistics(
    probs: jax.Array,
    expert_ids: jax.Array,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The two factors of every balance loss below: `f[E]`, the fraction of the (token,
    slot) assignments sent to each expert (`expert_load`), and `P[E]`, each expert's mean
    router probability over the real tokens."""
    t = probs.shape[0]
    m = _mask(t, mask)
    f = expert_load(expert_ids, probs.shape[-1], mask, weights)
    p = jnp.sum(probs.astype(jnp.float32) * m[:, None], axis=0) / jnp.maximum(jnp.sum(m), 1.0)
    return f, p


def switch_balance_loss(
    probs: jax.Array,
    expert_ids: jax.Array,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Switch Transformer load-balance loss (Fedus et al., 2021, eq. 4), top-k form.

    L = E * sum_i f_i * P_i, where f_i is the fraction of the T*k assignments sent to expert
    i and P_i the mean router probability of expert i. Equals 1 under perfect balance. This
    is DeepSeekMoE's expert-level balance loss (Dai et al., 2024, arXiv 2401.06066, eq. 12-14)
    without its alpha1: there f_i' = E/(K T) sum_t 1(token t selects i) = E f_i. With
    `weights`, slots of zero weight (top-p padding) are not assignments.
    """
    f, p = balance_statistics(probs, expert_ids, mask, weights)
    return probs.shape[-1] * jnp.sum(f * p)


def device_balance_loss(f: jax.Array, p: jax.Array, num_devices: int) -> jax.Array:
    """DeepSeekMoE's device-level balance loss without its alpha2 (Dai et al., 2024, arXiv
    2401.06066, eq. 15-17), from `balance_statistics`.

    The E experts form D = `num_devices` groups of E/D consecutive experts (expert parallelism
    places them so along the `expert` mesh axis). L = sum_d f''_d P'_d with f''_d the mean of
    f_j' = E f_j over the group's experts (eq. 16) and P'_d the sum of their P_j (eq. 17).
    Equals 1 when every device gets the same load.
    """
    e = f.shape[-1]
    if num_devices < 1 or e % num_devices:
        raise ValueError(
            f"device_balance_loss: {e} experts do not split into num_devices="
            f"{num_devices} equal groups; set moe.balance_devices to a divisor "
            f"of moe.num_experts (0 = mesh.expert, filled in by validate)."
        )
    f_dev = jnp.mean((e * f).reshape(num_devices, e // num_devices), axis=-1)
    p_dev = jnp.sum(p.reshape(num_devices, e // num_devices), axis=-1)
    return jnp.sum(f_dev * p_dev)


def sequence_balance_loss(
    probs: jax.Array,
    expert_ids: jax.Array,
    seq_len: int,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """DeepSeek-V3's complementary sequence-wise balance loss without its alpha (Liu et al.,
    2024, arXiv 2412.19437, eq. 17-20), averaged over the sequences.

    The T tokens are T / `seq_len` sequences of `seq_len` consecutive tokens (the rows of the
    batch). Per sequence: f_i = E/(K L) sum_t 1(token t selects i) (eq. 18), P_i = mean_t
    s'_{i,t} with `probs` the normalised affinities s'_{i,t} = s_{i,t} / sum_j s_{j,t}
    (eq. 19-20), L = sum_i f_i P_i (eq. 17): the Switch loss of that sequence alone. Padding
    tokens do not count; sequences without real tokens are left out of the mean.
    """
    t, e = probs.shape
    if t % seq_len:
        raise ValueError(
            f"sequence_balance_loss: {t} tokens are not whole sequences of seq_len={seq_len}."
        )
    n = t // seq_len
    m = _mask(t, mask).reshape(n, seq_len)
    w = None if weights is None else weights.reshape(n, seq_len, -1)
    per_seq = jax.vmap(switch_balance_loss)(
        probs.reshape(n, seq_len, e), expert_ids.reshape(n, seq_len, -1), m, w
    )
    real = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
    return jnp.sum(per_seq * real) / jnp.maximum(jnp.sum(real), 1.0)


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al., 2022, eq. 5): mean_t logsumexp(logits_t)^2."""
    m = _mask(logits.shape[0], mask)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(z * z * m) / jnp.maximum(jnp.sum(m), 1.0)


def token_entropy(probs: jax.Array) -> jax.Array:
    """Each token's entropy (nats) of its router distribution `probs[T, E]`: float32[T]."""
    p = probs.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def router_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean per-token entropy (nats) of the router distribution."""
    m = _mask(probs.shape[0], mask)
    return jnp.sum(token_entropy(probs) * m) / jnp.maximum(jnp.sum(m), 1.0)


def coefficient_of_variation(load: jax.Array) -> jax.Array:
    """std / mean of the per-expert load (0 = perfectly balanced)."""
    return jnp.std(load) / jnp.maximum(jnp.mean(load), 1e-9)


def routing_metrics(
    probs: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    mask: jax.Array | None = None,
    load: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-layer statistics every router reports: load [E], load CV, entropy, experts/token
    (mean, and `experts_per_token_hist[j]`: the fraction of tokens that use j experts,
    j = 0..k). `load` (`expert_load`) and `entropy` (`router_entropy`) may be passed in when
    the caller already computed them for its losses."""
    e, k = probs.shape[-1], expert_ids.shape[-1]
    if load is None:
        load = expert_load(expert_ids, e, mask, weights)
    if entropy is None:
        entropy = router_entropy(probs, mask)
    m = _mask(probs.shape[0], mask)
    per_token = jnp.sum((weights > 0).astype(jnp.float32), axis=-1)
    hist = count_ids(per_token.astype(jnp.int32), k + 1, m)
    return {
        "experts_per_token_hist": hist / jnp.maximum(jnp.sum(m), 1.0),
        "load": load,
        "load_cv": coefficient_of_variation(load),
        "max_load": jnp.max(load) * e,  # 1 = balanced, E = everything on one expert
        "router_entropy": entropy,
        "experts_per_token": jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0),
    }
