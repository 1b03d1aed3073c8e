"""Train-step invariants: gradient accumulation equals the full batch; the loss is the
masked mean cross-entropy plus the aux losses; the schedule has the documented shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config.train import TrainConfig
from moejax.config.validation import validate
from moejax.data import make_batches
from moejax.lora.config import LoRAConfig
from moejax.lora.hook import adapters_for
from moejax.sharding.mesh import make_mesh
from moejax.train.experiment import build_experiment
from moejax.train.optimizer import decay_mask, learning_rate_schedule
from moejax.train.step import token_cross_entropy


def _one_step(config, batch):
    s = validate(config, num_devices=1, num_processes=1)
    exp = build_experiment(s, make_mesh(s.mesh))
    state = exp.init_fn(jax.random.PRNGKey(0))
    new_state, metrics = exp.step_fn(state, jax.tree.map(jnp.asarray, batch))
    return new_state, metrics


@pytest.mark.parametrize("name", ["dense", pytest.param("deepseekmoe", marks=pytest.mark.slow)])
def test_grad_accumulation_equals_full_batch(tiny_config, name):
    # Aux losses are per-batch statistics (a mean of products), so they are switched off to
    # make the accumulated gradient exactly the full-batch one.
    base = tiny_config(name, **{"moe.balance_coef": 0.0, "moe.z_loss_coef": 0.0})
    s = validate(base, num_devices=1, num_processes=1)
    batch = next(make_batches(s.data, "train"))
    full, m_full = _one_step(base, batch)
    accum, m_accum = _one_step(
        tiny_config(
            name, **{"moe.balance_coef": 0.0, "moe.z_loss_coef": 0.0, "train.grad_accum": 2}
        ),
        batch,
    )
    np.testing.assert_allclose(m_accum["loss"], m_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_accum["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_loss_is_masked_cross_entropy_plus_aux(tiny_config):
    config = tiny_config("deepseekmoe")
    s = validate(config, num_devices=1, num_processes=1)
    batch = jax.tree.map(jnp.asarray, next(make_batches(s.data, "train")))
    exp = build_experiment(s, make_mesh(s.mesh))
    state = exp.init_fn(jax.random.PRNGKey(0))
    logits, extras = jax.jit(exp.model.apply)(  # eagerly, each of its ops compiles alone
        {"params": state.params}, batch["inputs"], batch["segment_ids"], batch["positions"]
    )
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets, mask = np.asarray(batch["targets"]), np.asarray(batch["loss_mask"], np.float64)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want_ce = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(
        (np.asarray(token_cross_entropy(logits, batch["targets"])) * mask).sum() / mask.sum(),
        want_ce,
        rtol=1e-5,
    )
    _, metrics = exp.step_fn(state, batch)
    np.testing.assert_allclose(metrics["ce_loss"], want_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want_ce + float(extras["aux_loss"]), rtol=1e-5)
    assert float(extras["aux_loss"]) > 0


def test_learning_rate_schedule_shape():
    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(lr(100)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_skips_norm_scales_only():
    params = {
        "attn_norm": {"scale": jnp.ones((2, 4))},
        "mlp": {"w_up": jnp.ones((4, 4))},
        "embedding": jnp.ones((8, 4)),
    }
    mask = decay_mask(params)
    assert mask == {"attn_norm": {"scale": False}, "mlp": {"w_up": True}, "embedding": True}


def test_the_adapter_hook_decides_the_decay_of_adapter_weights():
    params = {
        "attn": {"wq": jnp.ones((4, 4)), "lora_wq": {"a": jnp.ones((4, 2)), "gate": jnp.ones(2)}},
        "router": {"gate": jnp.ones((4, 2))},
    }
    sora = decay_mask(params, adapters_for(LoRAConfig(method="sora")))
    assert sora == {
        "attn": {"wq": True, "lora_wq": {"a": True, "gate": False}},  # SoRA: proximal step
        "router": {"gate": True},  # not an adapter weight
    }
    assert all(jax.tree.leaves(decay_mask(params, adapters_for(LoRAConfig(method="lora")))))
    assert all(jax.tree.leaves(decay_mask(params)))
