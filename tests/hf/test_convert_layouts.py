"""Convert, then fine-tune: every layer layout `moejax.hf` can produce from a Hugging Face
checkpoint trains (issue 23 item 1).

The converter fits each checkpoint's MoE layers to `first_k_dense` dense layers followed by
periods of `moe_every` layers ending in MoE (`moejax.hf.architectures.fit_layout`), or, when
no such pair exists, names every layer in `model.layer_kinds`. The
periods with dense blocks inside (`moe_every >= 2`: Qwen2-MoE's `decoder_sparse_step=2`, a
2-layer DeepSeek-V3 with `first_k_dense_replace=1`) used to stop every training run in
`check_divisible` ("Dimensions ('layers',) occur more than once"), while `from_pretrained`
and `generate` worked. Each case here builds a tiny random checkpoint with transformers,
converts it with `moejax.train.convert_hf.convert`, checks the layout the converter chose,
and trains two steps with `moejax.train.loop.train` on the test corpus: the loss must be
finite and the step-2 weights must have moved away from the checkpoint's (the reference).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("safetensors", reason="moejax.hf needs safetensors")

import importlib.util  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import moejax.hf as mhf  # noqa: E402
from moejax.config.train import TrainConfig  # noqa: E402
from moejax.train.checkpoint import Checkpointer  # noqa: E402
from moejax.train.convert_hf import convert  # noqa: E402
from moejax.train.loop import train  # noqa: E402
from moejax.train.optimizer import make_optimizer  # noqa: E402
from moejax.train.step import TrainState  # noqa: E402

# vocab 260 >= the byte tokenizer's 259 ids, so the converted run reads the test corpus.
SMALL = dict(
    vocab_size=260,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
)
QWEN2_MOE = dict(
    SMALL,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)
DEEPSEEK_V3 = dict(
    SMALL,
    num_key_value_heads=4,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=8,
    q_lora_rank=None,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    moe_intermediate_size=16,
    n_shared_experts=1,
)

# name -> (transformers config class, kwargs, the (first_k_dense, moe_every[, layer_kinds]) it
# converts to).
# One case per kind of layout: all dense, every layer MoE, a dense prefix before every-layer
# MoE, periods with dense blocks inside, a dense prefix before such periods.
LAYOUTS = {
    # decoder_sparse_step=2: MoE at layer 1 -> one period of (dense, MoE).
    "qwen2_moe_sparse_step_2": (
        "Qwen2MoeConfig",
        dict(QWEN2_MOE, num_hidden_layers=2, decoder_sparse_step=2),
        (0, 2),
    ),
    # first_k_dense_replace=1 of 2 layers: (dense, MoE) is one period of moe_every=2.
    "deepseek_v3_first_dense_of_2": (
        "DeepseekV3Config",
        dict(DEEPSEEK_V3, num_hidden_layers=2, first_k_dense_replace=1),
        (0, 2),
    ),
    # MoE at layers 2 and 4 of 5: one dense layer, then two periods of (dense, MoE).
    "qwen2_moe_dense_prefix_then_periods": (
        "Qwen2MoeConfig",
        dict(QWEN2_MOE, num_hidden_layers=5, mlp_only_layers=[0, 1, 3]),
        (1, 2),
    ),
    # first_k_dense_replace=2 of 3 layers: one period of (dense, dense, MoE).
    "deepseek_v3_period_of_3": (
        "DeepseekV3Config",
        dict(DEEPSEEK_V3, num_hidden_layers=3, first_k_dense_replace=2),
        (0, 3),
    ),
    "deepseek_v3_dense_prefix": (
        "DeepseekV3Config",
        dict(DEEPSEEK_V3, num_hidden_layers=3, first_k_dense_replace=1),
        (1, 1),
    ),
    "mixtral_every_layer": (
        "MixtralConfig",
        dict(SMALL, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        (0, 1),
    ),
    "llama_dense": ("LlamaConfig", dict(SMALL, num_hidden_layers=2), (0, 0)),
    # mlp_only_layers=[1] of 3: MoE, dense, MoE is no prefix + periods -> model.layer_kinds
    # (three runs, `runs_0` .. `runs_2`), first_k_dense / moe_every at their defaults.
    "qwen2_moe_dense_between": (
        "Qwen2MoeConfig",
        dict(QWEN2_MOE, num_hidden_layers=3, mlp_only_layers=[1]),
        (0, 1, "moe,dense,moe"),
    ),
}
# One case runs by default (a period with a dense block inside, and MLA); the others with
# `make test-slow`, each 20-30 s of CPU here (tests/train/test_layouts.py trains the period
# shapes from a moejax config by default).
FAST = ("deepseek_v3_first_dense_of_2",)


def _converted(name, tmp_path):
    config_cls, kwargs, _ = LAYOUTS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    workdir = tmp_path / "run"
    convert(str(tmp_path / "hf"), str(workdir))
    spec = importlib.util.spec_from_file_location("converted", workdir / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(), workdir


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in LAYOUTS],
)
def test_a_converted_checkpoint_fine_tunes(name, tmp_path, tiny_config):
    config, workdir = _converted(name, tmp_path)
    want_layout = (*LAYOUTS[name][2], "")[:3]  # (first_k_dense, moe_every, layer_kinds)
    got = (config.model.first_k_dense, config.model.moe_every, config.model.layer_kinds)
    assert got == want_layout
    saved = json.loads((workdir / "config.json").read_text())["model"]
    assert (saved["first_k_dense"], saved["moe_every"], saved["layer_kinds"]) == want_layout
    # The test corpus and a two-step budget; model and moe stay the checkpoint's.
    config.data.update(tiny_config("dense").data.to_dict())
    config.train.update(
        steps=2,
        warmup_steps=0,
        learning_rate=1e-3,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
        async_checkpoint=False,
        peak_tflops=1.0,
    )
    metrics = train(config, str(workdir))
    assert metrics["step"] == 2 and np.isfinite(metrics["train/loss"])

    _, variables = mhf.from_pretrained(str(tmp_path / "hf"))
    params = variables["params"]
    target = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(TrainConfig()).init(params),
        collections={k: v for k, v in variables.items() if k != "params"} or None,
    )
    with Checkpointer(str(workdir)) as ckpt:
        assert ckpt.all_steps() == [0, 2]
        trained = ckpt.restore(2, target=target)[0].params
    # Every stack the layout has (dense prefix, periods' dense blocks, MoE blocks) trained.
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained, params
    )
    for stack, tree in moved.items():
        if isinstance(tree, dict):
            assert max(jax.tree.leaves(tree)) > 0, f"{stack} did not train"
