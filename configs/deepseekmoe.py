"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Dai et al., 2024, "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts
Language Models" (arXiv 2401.06066). Fine-grained segmentation splits each of N experts into
m smaller ones (mN experts of width f/m, top mK) and isolates K_s shared experts; the first
layer keeps a dense FFN (`first_k_dense=1`).

Tiny CPU run (the default of `make train`, ~0.3 s/step on 2 cores):
    python -m moejax.train --config=configs/deepseekmoe.py --workdir=runs/deepseekmoe
The same with sub-word tokens (a 4096-id byte-level BPE trained on the offline corpus on
first use, `data.tokenizer=corpus_bpe:4096`):
    python -m moejax.train --config=configs/deepseekmoe.py:tokenizer=bpe --workdir=runs/dsmoe_bpe
Pod run (DeepSeekMoE-16B-like shape: 28 layers, d 2048, 64 experts of 1408, top-6, 2 shared),
on C4 with DeepSeek's tokenizer (`moejax/config/pod_data.py` says how to prepare both):
    python -m moejax.train --config=configs/deepseekmoe.py:size=pod --workdir=/mnt/shared/runs/dsmoe
laid out for a v5p-256 slice (v5p:4x4x8, 128 chips) by default; `size=pod,topology=v6e:16x16`
for a v6e-256 (POD_LAYOUTS below; compiled and checked to fit by experiments/pod_table.py).
One-GPU size (`size=gpu`: 16 layers, d 1024, 8 heads of 128, 64 experts of 512, top-6, 2
shared, first layer dense with d_ff 4096 = (6 + 2) x 512, vocab 32768, bfloat16 compute,
8 x 4096 tokens a step; 1.70B parameters, 0.34B active per token; gate and up projections as
one grouped matmul, `moe.fuse_gate_up`), the default shape of
experiments/benchmarks/train_step.py on a GPU (H200: 29.7% MFU, the dense model of the same
active width 39.3%; README "GPU"):
    python -m moejax.train --config=configs/deepseekmoe.py:size=gpu --workdir=runs/dsmoe_gpu
on the offline byte corpus (its 259 ids use a sliver of the 32768-id vocabulary, sized like
a sub-word model's for the step's cost).

Active FFN width per token is 4 x 128 routed + 1 x 128 shared = 640 = dense.py's d_ff and
gshard.py's 2 x 320, so the three tiny configs compare at equal active parameters.
Sweeps: `sweep_granularity` (compare `eval/loss` and `train/moe/load_cv`) and
`sweep_ablation` (the paper's ablation: dense, GShard, + fine-grained, + shared expert;
experiments/README.md has it at CPU scale).
"""

from moejax.config.args import parse_arg
from moejax.config.base import default_config
from moejax.config.pod_data import c4_hf_tokenizer
from moejax.config.pod_layout import PodLayout, apply_pod_layout

# size=pod on each TPU slice it compiles for and fits (moejax/config/pod_layout.py; the README
# table, `python experiments/pod_table.py`); the first is the default.
POD_LAYOUTS = {
    "v5p:4x4x8": PodLayout(mesh=dict(fsdp=16, expert=8), grad_accum=9),
    "v6e:16x16": PodLayout(mesh=dict(fsdp=32, expert=8), grad_accum=18),
}


def get_config(arg=None):
    # steps=0: the size's default; tokenizer=bpe: a 4096-id BPE trained on the corpus.
    arg = parse_arg(arg, size="tiny", steps=0, tokenizer="byte", topology="")
    c = default_config()
    c.train.steps = arg.steps or {"tiny": 300, "gpu": 2000, "pod": 100_000}.get(arg.size, 0)
    if arg.size == "tiny":
        c.model.update(
            d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=640, first_k_dense=1
        )
        c.moe.update(
            num_experts=16,
            top_k=4,
            d_expert=128,
            n_shared=1,
            renormalize=False,
            balance_coef=0.01,
            z_loss_coef=1e-3,
            gmm_tile=128,
        )
        c.data.update(seq_len=256, global_batch_size=16)
        c.train.update(
            learning_rate=3e-3,
            warmup_steps=min(30, c.train.steps),
            eval_every=100,
            eval_batches=8,
            checkpoint_every=100,
            log_every=10,
        )
    elif arg.size == "gpu":
        c.model.update(
            vocab_size=32768,
            d_model=1024,
            num_layers=16,
            # head dim 128: cuDNN's flash attention ran the MoE step 1.4% faster than with
            # 16 heads of 64 (H200, experiments/gpu/results/h200_2026-12-04)
            num_heads=8,
            num_kv_heads=8,
            d_ff=4096,  # (top_k + n_shared) x d_expert: the active FFN width of a MoE layer
            first_k_dense=1,
            dtype="bfloat16",
        )
        c.moe.update(
            num_experts=64,
            top_k=6,
            d_expert=512,
            n_shared=2,
            renormalize=False,
            balance_coef=0.001,
            # one grouped matmul on [W_gate | W_up]: the train step 4% faster on an H200
            fuse_gate_up=True,
        )
        c.data.update(seq_len=4096, global_batch_size=8)
        c.train.update(
            learning_rate=5e-4,
            warmup_steps=min(200, c.train.steps),
            eval_every=500,
            eval_batches=8,
            checkpoint_every=500,
            log_every=10,
        )
    elif arg.size == "pod":
        c.model.update(
            vocab_size=102400,
            d_model=2048,
            num_layers=28,
            num_heads=16,
            num_kv_heads=16,
            d_ff=10944,
            first_k_dense=1,
            dtype="bfloat16",
        )
        c.moe.update(
            num_experts=64,
            top_k=6,
            d_expert=1408,
            n_shared=2,
            renormalize=False,
            balance_coef=0.001,
            dispatcher="expert_parallel",  # gmm_impl auto: the Mosaic grouped matmul on TPU
        )
        c.data.update(seq_len=4096, global_batch_size=4608, **c4_hf_tokenizer("deepseek-moe-16b"))
        c.train.update(
            learning_rate=4.2e-4,
            warmup_steps=2000,
            eval_every=1000,
            eval_batches=64,
            checkpoint_every=1000,
        )
        # The [tokens, vocab] float32 logits a chunk at a time (moejax/train/chunked_loss.py):
        # 262,144 tokens (2,048 per chip on 128 chips) divide every layout's micro-batch.
        c.train.loss_chunk = 262_144
        apply_pod_layout(c, POD_LAYOUTS, arg.topology)
    else:
        raise ValueError(f"size={arg.size!r}: choose tiny, gpu or pod")
    if arg.topology and arg.size != "pod":
        raise ValueError("topology= picks a pod layout: use it with size=pod")
    if arg.tokenizer == "bpe":
        if arg.size != "tiny":
            raise ValueError("tokenizer=bpe trains on the offline corpus: use it with size=tiny")
        # Built on first use in data.data_dir, like the corpus; model.vocab_size=0 takes its
        # size, rounded up to a multiple of 128.
        c.data.tokenizer = "corpus_bpe:4096"
        c.model.vocab_size = 0
    elif arg.tokenizer != "byte":
        raise ValueError(f"tokenizer={arg.tokenizer!r}: choose byte or bpe")
    return c


def sweep_granularity(add, config):
    """Fine-grained segmentation at fixed active and total routed width: the config's top_k
    routed experts are split back into m in {1, 2, 4} pieces each (tiny: 4 x 512 top-1,
    8 x 256 top-2, 16 x 128 top-4), without shared experts."""
    width = config.moe.top_k * config.moe.d_expert  # the routed width a token activates
    coarse = config.moe.num_experts // config.moe.top_k
    for m in (1, 2, 4):
        add(
            **{
                "moe.num_experts": coarse * m,
                "moe.top_k": m,
                "moe.d_expert": width // m,
                "moe.n_shared": 0,
            }
        )


def sweep_ablation(add, config):
    """DeepSeekMoE's ablation (Dai et al., 2024, Table 1 and Figure 3) at the active FFN width
    F = model.d_ff of a dense layer: dense (F); GShard, top-2 of 8 experts of F/2;
    + fine-grained segmentation, each expert split into 4 (top-8 of 32 of F/8); + shared
    expert isolation, one of those 32 always on (1 shared + top-7 of 31: DeepSeekMoE). Every
    MoE variant has the same total (8 x F/2) and active (F) width; the first layer stays
    dense. The paper's "shared expert removed" is an evaluation of the trained DeepSeekMoE
    variant (experiments/shared_expert_removed.py), not a run."""
    width = config.model.d_ff
    moe = {"model.moe_every": 1, "moe.renormalize": False}
    add(name="dense", **{"model.moe_every": 0})
    add(
        name="gshard_top2",
        **moe,
        **{"moe.num_experts": 8, "moe.top_k": 2, "moe.d_expert": width // 2, "moe.n_shared": 0},
    )
    add(
        name="fine_grained",
        **moe,
        **{"moe.num_experts": 32, "moe.top_k": 8, "moe.d_expert": width // 8, "moe.n_shared": 0},
    )
    add(
        name="fine_grained_shared",
        **moe,
        **{"moe.num_experts": 31, "moe.top_k": 7, "moe.d_expert": width // 8, "moe.n_shared": 1},
    )


def sweep_straggler(add):
    """The straggler ratio of expert parallelism against FSSDP (Hecate, arXiv 2502.02581) in
    training: the 16 experts split over `mesh.expert=8` devices (2 each, tokens split 8 ways),
    plain EP, then FSSDP with 1 and 2 replica slots per device filled each step from the
    loads, then EP and 1-slot FSSDP with Hecate's heterogeneous re-sharding every 10 steps,
    and EP re-sharded every 2 (`moe.fssdp_reshard_every`; `fssdp_slots=0` is EP), with 2
    experts a device or, given 8 spare rows (`moe.fssdp_spare_rows`), 0 to 3. Run with
    8 simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); compare
    `train/moe/device_tokens_max_over_mean` (experiments/README.md, FSSDP)."""
    ep = {"mesh.expert": 8, "moe.dispatcher": "expert_parallel"}
    add(name="expert_parallel", **ep)
    fssdp = {**ep, "moe.dispatcher": "fssdp", "moe.fssdp_reshard_every": 0}
    for slots in (1, 2):
        add(name=f"fssdp_{slots}", **{**fssdp, "moe.fssdp_slots": slots})
    for slots, every in ((0, 10), (1, 10), (0, 2)):
        add(
            name=f"fssdp_{slots}_reshard{every}",
            **{**fssdp, "moe.fssdp_slots": slots, "moe.fssdp_reshard_every": every},
        )
    add(
        name="fssdp_0_reshard2_spare8",
        **{**fssdp, "moe.fssdp_slots": 0, "moe.fssdp_reshard_every": 2, "moe.fssdp_spare_rows": 8},
    )


def sweep_ep_capacity(add):
    """What dropless expert parallelism costs against a bounded exchange (GShard's capacity,
    Lepikhin et al., 2020, at the device level): the 16 experts over `mesh.expert=8` devices,
    every (source, destination) buffer of the exchange sized for the worst case (dropless,
    `moe.ep_capacity_factor=0`) or for c times its average share (c = 1.25, 1.5, 2; what
    overflows is dropped and counted in `train/moe/dropped_fraction`). On a v5p-256 the
    bounded buffers cut DeepSeekMoE's bytes per step 3.4x (README "Dropless against bounded
    exchange buffers"); this sweep measures what they drop and cost in loss. Run with 8
    simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=8;
    experiments/README.md)."""
    ep = {"mesh.expert": 8, "moe.dispatcher": "expert_parallel"}
    add(name="dropless", **ep)
    for c in (1.25, 1.5, 2.0):
        add(name=f"capacity_{c:g}", **{**ep, "moe.ep_capacity_factor": c})
