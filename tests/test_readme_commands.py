"""Every documented command works: each fenced shell command of README.md and each command
line of the configs' and experiments' docstrings is run here in a quick form (tiny sizes,
a step or two, a temporary workdir), run by the test named in `COVERED_BY`, or listed in
`NOT_RUN` with the reason it cannot run here (pod-size, GPU-only, the suite itself).

`test_every_documented_command_is_run_or_listed` fails for a command added to the docs
without one of the three, and for a table entry whose command left the docs. A command is
keyed by its text with backslash continuations joined, whitespace collapsed and its
trailing `# comment` dropped. The quick forms run the documented argv itself, through the
same entry point a user types (`python -m ...`, `python experiments/...`, `make ...`), with
flags appended that shrink it (later flags win: absl and argparse keep the last value) and
its workdir / output paths replaced by temporary ones. A chain (convert, then fine-tune)
is one row. `make test` runs the fast rows; the rest are marked slow (`make test-slow`).

Also checked here: no docstring joins a command's lines with a backslash-newline (a
non-raw docstring turns `\\` + newline into a run of spaces in `--help`), and each
experiment script's `--help` shows its docstring whole.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tokenize
from collections.abc import Callable

import pytest
from testing_utils import REPO, TEST_CORPUS_BYTES_PER_DOMAIN

DOCSTRING_FILES = sorted(
    [*REPO.glob("configs/*.py"), *REPO.glob("experiments/*.py"), *REPO.glob("experiments/*/*.py")]
)
# A docstring line is a command when it starts with one of these (after indentation).
COMMAND_START = re.compile(r"^(python3? |make |bash |[A-Z_]+=\S* )")


# --- Finding the documented commands ----------------------------------------------------


def _strip_comment(line: str) -> str:
    """`cmd --x="a#b"  # note` -> `cmd --x="a#b"`: a `#` after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _normalise(command: str) -> str:
    return re.sub(r"\s+", " ", _strip_comment(command)).strip()


def _join_continuations(lines: list[str]) -> list[str]:
    out, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    found = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        for line in _join_continuations(block.splitlines()):
            command = _normalise(line)
            if command and not command.startswith("#"):
                found.append(command)
    return found


def docstring_commands(path: pathlib.Path) -> list[str]:
    """The command lines of a module docstring (indented lines starting with `python`,
    `make`, `bash` or `NAME=value`), continuation lines joined."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    found = []
    for line in _join_continuations(doc.splitlines()):
        if COMMAND_START.match(line.strip()):
            found.append(_normalise(line))
    return found


def documented_commands() -> dict[str, list[str]]:
    """{command: [where it is documented]}."""
    out: dict[str, list[str]] = {}
    for command in readme_commands():
        out.setdefault(command, []).append("README.md")
    for path in DOCSTRING_FILES:
        for command in docstring_commands(path):
            out.setdefault(command, []).append(str(path.relative_to(REPO)))
    return out


# --- Running a quick form ---------------------------------------------------------------


@dataclasses.dataclass
class Context:
    tmp: pathlib.Path
    corpus: str  # the tiny offline corpus every quick run reads

    def run(self, argv: list[str], env: dict | None = None, timeout: int = 900) -> str:
        """Runs `argv` from the repository root (python -> this interpreter); returns its
        output, failing the test with that output on a non-zero exit."""
        argv = [sys.executable if a in ("python", "python3") else a for a in argv]
        proc = subprocess.run(
            argv,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"{shlex.join(argv)} exited {proc.returncode}:\n{output[-4000:]}"
        )
        return output


def split(command: str, **values: str) -> tuple[dict, list[str]]:
    """(leading NAME=value environment, argv) of a documented command, with `$NAME`
    placeholders replaced by `values` and optional `[...]` arguments dropped."""
    command = re.sub(r"\s\[[^\]]*\]", "", command)
    for name, value in values.items():
        command = command.replace(f"${name}", value)
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """`--flag=x` or `--flag x` -> the same flag with `value` (appended when absent)."""
    out, i, done = [], 0, False
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            out += [flag, value]
            i, done = i + 2, True
            continue
        if argv[i].startswith(flag + "="):
            out.append(f"{flag}={value}")
            done = True
        else:
            out.append(argv[i])
        i += 1
    return out if done else out + [f"{flag}={value}"]


def tiny_model() -> list[str]:
    sets = {"d_model": 32, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64, "num_layers": 2}
    return [f"--config.model.{k}={v}" for k, v in sets.items()] + [
        "--config.moe.d_expert=16",
        "--config.moe.gmm_tile=16",
    ]


def tiny_data(ctx: Context, seq_len: int | None = 32) -> list[str]:
    flags = [
        f"--config.data.data_dir={ctx.corpus}",
        f"--config.data.max_bytes_per_domain={TEST_CORPUS_BYTES_PER_DOMAIN}",
        "--config.data.global_batch_size=4",
    ]
    return flags + ([f"--config.data.seq_len={seq_len}"] if seq_len else [])


def short_train(steps: int = 2, eval_every: int = 0) -> list[str]:
    sets = {
        "steps": steps,
        "warmup_steps": 1,
        "log_every": 1,
        "eval_every": eval_every,
        "eval_batches": 1,
        "checkpoint_every": 2,
        "async_checkpoint": False,
        "peak_tflops": 1.0,
    }
    return [f"--config.train.{k}={v}" for k, v in sets.items()]


def train_quick(ctx, command, workdir=None, extra=(), steps=2, **values) -> str:
    """A `python -m moejax.train` command shrunk: tiny model and data, `steps` steps."""
    env, argv = split(command, **values)
    workdir = workdir or str(ctx.tmp / "run")
    argv = replace_flag(argv, "--workdir", workdir)
    out = ctx.run([*argv, *tiny_model(), *tiny_data(ctx), *short_train(steps), *extra], env)
    assert f"step {steps}/{steps} (100%)" in out, out[-3000:]
    return out


# --- The rows: each documented command, in a quick form or listed ----------------------


@dataclasses.dataclass(frozen=True)
class Row:
    commands: tuple[str, ...]  # run in order by `run`
    run: Callable[[Context, tuple[str, ...]], None]
    slow: bool = True


def _train_each(ctx, commands):
    for i, command in enumerate(commands):
        train_quick(ctx, command, workdir=str(ctx.tmp / f"run{i}"))


def _make_train(ctx, commands):
    # The Makefile's own recipe, with this interpreter instead of .venv's (STAMP= skips
    # creating .venv) and the quick flags as ARGS.
    args = shlex.join([*tiny_model(), *tiny_data(ctx), *short_train(2, eval_every=2)])
    out = ctx.run(
        [
            "make",
            "train",
            f"PY={sys.executable}",
            "STAMP=",
            f"WORKDIR={ctx.tmp / 'make'}",
            f"ARGS={args}",
        ]
    )
    assert "step 2/2 (100%)" in out and "eval @ 2: loss" in out, out[-3000:]


def _run_then_resume(ctx, commands):
    first, resume = commands
    workdir = str(ctx.tmp / "dsmoe")
    train_quick(ctx, first, workdir)
    out = train_quick(ctx, resume, workdir, steps=4)
    assert "resuming from step 2" in out
    assert "train.learning_rate 0.003 -> 0.001" in out and "step 3 runs at 0.001" in out


def _mixture(ctx, commands):
    make, *trains = commands
    out_dir = str(ctx.tmp / "mix")
    _, argv = split(make, DIR=out_dir)
    argv = replace_flag(argv, "--vocab_size", "512")  # above the corpus's 349 characters
    ctx.run(argv + [f"--data_dir={ctx.corpus}", "--max_bytes_per_domain=200000"])
    for i, command in enumerate(trains):
        train_quick(ctx, command, workdir=str(ctx.tmp / f"mix{i}"), DIR=out_dir)


def _convert_then_fine_tune(ctx, commands):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    convert, fine_tune = commands
    config = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_hidden_layers=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(ctx.tmp / "hf")
    run = str(ctx.tmp / "ft")
    _, argv = split(convert)
    argv = replace_flag(replace_flag(argv, "--from", str(ctx.tmp / "hf")), "--workdir", run)
    out = ctx.run(argv)
    assert len(out.strip().splitlines()) == 2, out  # no tokenizer warning, then the result
    _, argv = split(fine_tune.replace("runs/ft", run))
    out = ctx.run([*argv, *tiny_data(ctx), *short_train(2)])  # the checkpoint's model
    assert "resuming from step 0" not in out and "step 2/2 (100%)" in out, out[-3000:]


def _multitask_stages(ctx, commands):
    base, adapters = commands
    root = ctx.tmp / "mt"
    train_quick(ctx, base.replace("runs/mt", str(root)), str(root / "base"))
    env, argv = split(adapters.replace("runs/mt", str(root)))
    argv = replace_flag(argv, "--workdir", str(root / "lora"))
    out = ctx.run([*argv, *tiny_model(), *short_train(2)])  # the tasks at their own length
    assert "step 2/2 (100%)" in out, out[-3000:]


def _lora(ctx, commands):
    for i, command in enumerate(commands):
        train_quick(ctx, command, workdir=str(ctx.tmp / f"lora{i}"))


def _sweep_dry_run(ctx, commands):
    for command in commands:
        _, argv = split(command)
        argv = replace_flag(argv, "--workdir", str(ctx.tmp / "sweep"))
        out = ctx.run(argv if "--dry_run" in argv else [*argv, "--dry-run"])
        variants = [line for line in out.splitlines() if line.startswith("python -m moejax.train")]
        assert len(variants) >= 2 and "--config." in variants[0], out[-2000:]
        assert f"--workdir={ctx.tmp / 'sweep'}/" in variants[0], variants[0]
        assert not (ctx.tmp / "sweep").exists() or not any((ctx.tmp / "sweep").iterdir())


def _pod_table_from_json(ctx, commands):
    (command,) = commands
    out = ctx.run(split(command)[1])
    assert out.startswith("| config | topology (chips) |") and "| deepseekmoe |" in out


def _mole_multitask_script(ctx, commands):
    for i, command in enumerate(commands):
        _, argv = split(command.replace("--workdir=...", f"--workdir={ctx.tmp / f'mt{i}'}"))
        argv = replace_flag(argv, "--workdir", str(ctx.tmp / f"mt{i}"))
        argv = replace_flag(argv, "--variants", "lora")
        argv = replace_flag(argv, "--seeds", "1") if "--seeds=3" in argv else argv
        argv = (
            replace_flag(argv, "--steps", "2")
            if any(a.startswith("--steps") for a in argv)
            else argv
        )
        out = ctx.run([*argv, "--quick", f"--data_dir={ctx.corpus}"])
        assert "| method | matched to | rank |" in out, out[-2000:]


def _faults(ctx, commands):
    for command in commands:
        _, argv = split(command, DIR=str(ctx.tmp / "mix"))
        if any(a.startswith("--data") for a in argv):
            ctx.run(
                [
                    "python",
                    "experiments/mixture_data.py",
                    f"--out={ctx.tmp / 'mix'}",
                    "--vocab_size=512",
                    f"--data_dir={ctx.corpus}",
                    "--max_bytes_per_domain=200000",
                ]
            )
        argv = replace_flag(argv, "--trials", "1")
        argv = replace_flag(argv, "--scenarios", "sigterm")
        out = ctx.run(argv)
        assert "| sigterm | 1 | 1/1 | 0 | 1/1 |" in out or '"all_recovered": true' in out, out[
            -3000:
        ]


def _gmm(ctx, commands):
    # tests/experiments/test_gmm_benchmark.py's scale: 1/64 of the tokens, no interpreted
    # megablox, the Pallas kernels interpreted on the smallest case only.
    tiny = (
        "--scale 64 --repeats 1 --groups skewed --skip megablox,tokamax --interpret-max-gflop 0.2"
    )
    for command in commands:
        _, argv = split(command)
        out = ctx.run([*argv, *tiny.split(), "--json"])
        assert '"results"' in out


def _moe_layer(ctx, commands):
    tiny = "--tokens 256 --d-model 32 --experts 8 --d-expert 16 --top-k 2 --shared 1 --repeats 1"
    for command in commands:
        _, argv = split(command)
        out = ctx.run([*argv, *tiny.split(), "--json"])
        assert '"results"' in out


def _moe_layer_tpu_cost(ctx, commands):
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs the tpu extra")
    tiny = "--tokens 256 --d-model 128 --experts 8 --d-expert 128 --top-k 2 --shared 1"
    for command in commands:
        _, argv = split(command)
        out = ctx.run([*argv, *tiny.split(), "--json"])  # stdout's JSON line among the logs
        report = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"topology"')))
        results = report["results"]
        assert results["auto"]["flops_ratio"] > 0
        # The grouped-matmul plans contain the experts compiled alone: never under the floor.
        for plan in ("auto", "pallas"):
            assert results[plan]["bytes_ratio"] > report["floor"]["bytes_ratio"]


def _lora_grad(ctx, commands):
    (command,) = commands
    _, argv = split(command)
    out = ctx.run([*argv, "--d_model", "32", "--layers", "1", "--seq", "16", "--batch", "2"])
    assert "ms" in out


def _router_step(ctx, commands):
    for command in commands:
        _, argv = split(command.replace("--runs runs", f"--runs {ctx.tmp}"))
        argv = [
            *argv,
            "--repeats",
            "1",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--cases",
            "softmax_topk",
        ]
        out = ctx.run(argv)
        assert '"results"' in out


def _train_step(ctx, commands):
    for command in commands:
        _, argv = split(command)
        tiny = "--batch 2 --seq-len 32 --warmup 0 --steps 1 --dispatchers auto --remat full"
        out = ctx.run([*argv, *tiny.split()])
        assert '"results"' in out and '"error"' not in out


def _collective_report_cpu(ctx, commands):
    (command,) = commands
    env, argv = split(command)
    out = ctx.run([*argv, *tiny_model(), "--config.data.seq_len=32"], env)
    report = json.loads(out[out.index("{") :])
    assert report["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}


def _collective_report_tpu(ctx, commands):
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs the tpu extra")
    (command,) = commands
    env, argv = split(command)
    out = ctx.run([*argv, *tiny_model(), "--config.data.seq_len=32"], env)
    report = json.loads(out[out.index("{") :])
    assert report["fits_hbm"] is True


SOURCES = '"parquet:$DIR/web-*.parquet@0.7,jsonl:$DIR/code-*.jsonl#content@0.3"'
README = {
    "make_train": "make train",
    "make_test": "make test",
    "dsmoe": (
        "python -m moejax.train --config=configs/deepseekmoe.py --workdir=runs/dsmoe "
        "--config.moe.top_k=6 --config.train.steps=1000"
    ),
    "resume": (
        "python -m moejax.train --config=configs/deepseekmoe.py --workdir=runs/dsmoe "
        "--config.moe.top_k=6 --config.train.steps=2000 --config.train.learning_rate=1e-3 "
        "--config.train.resume_lr=constant"
    ),
    "mix": (
        "python -m moejax.train --config=configs/deepseekmoe.py --workdir=runs/mix "
        "--config.data.tokenizer=sentencepiece:$DIR/sp.model "
        f"--config.data.sources={SOURCES} --config.model.vocab_size=4096 --config.train.steps=50"
    ),
    "convert": "python -m moejax.train.convert_hf --from /path/to/hf_dir --workdir runs/ft",
    "fine_tune": (
        "python -m moejax.train --config=runs/ft/config.py --workdir=runs/ft "
        "--config.train.steps=1000"
    ),
    "ft_convert": (
        "python -m moejax.train.convert_hf --from /path/to/hf_moe --workdir runs/qwen_moe"
    ),
    "ft_lora": (
        "python -m moejax.train --config=configs/finetune.py:base=runs/qwen_moe "
        "--workdir=runs/qwen_moe_lora --config.data.sources='jsonl:data/train-*.jsonl#text'"
    ),
    "smora": (
        "python -m moejax.train --config=configs/lora.py:smora --workdir=runs/lora_smora "
        "--config.lora.targets='attn.*,mlp.*' --config.lora.top_k=2 --config.lora.routed_scale=2"
    ),
    "mt_lora": (
        "python -m moejax.train --config=configs/mole_multitask.py:variant=lora,rank=8 "
        "--config.lora.base_checkpoint=runs/mt/base --workdir=runs/mt/lora"
    ),
    "mt_script": "python experiments/mole_multitask.py --workdir=runs/mole_multitask",
    "report_cpu": (
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m "
        "moejax.train.collective_report --config=configs/deepseekmoe.py --strategy=fsdp "
        "--config.model.vocab_size=264 --config.moe.dispatcher=ragged "
        "--config.moe.gmm_impl=ragged_dot"
    ),
    "report_tpu": (
        "python -m moejax.train.collective_report --config=configs/deepseekmoe.py "
        "--topology=v5p:2x2x1 --config.moe.dispatcher=pallas --unroll_layers"
    ),
    "multihost": (
        "python -m moejax.train --config=configs/deepseekmoe.py:size=pod --workdir=/shared/run "
        "--coordinator=host0:1234 --num_processes=2 --process_id=0"
    ),
    "sweep": (
        "python -m experiments.sweep --config=configs/deepseekmoe.py --sweep=granularity "
        "--workdir=runs/granularity --seeds=3 --parallel=2 --metrics=eval/loss,train/moe/load_cv"
    ),
    "sweep_pod": (
        "python -m experiments.sweep --config=configs/gshard.py:size=pod --sweep=capacity "
        "--workdir=gs://bucket/capacity --dry_run"
    ),
    "sample": 'python -m moejax.sample --workdir=runs/dsmoe --prompt="def " --max_new_tokens=100',
    "sample_top_p": (
        'python -m moejax.sample --workdir=runs/dsmoe --prompt="The " --temperature=0.8 '
        "--top_p=0.95"
    ),
    "trace": (
        "python -m moejax.analysis.trace --workdir=runs/dsmoe --step=all --tokens=20000 "
        "--out=runs/dsmoe/trace.parquet"
    ),
    "sample_scmoe": (
        'python -m moejax.sample --workdir=runs/dsmoe --prompt="def " --routing=scmoe '
        "--scmoe_rank=2 --scmoe_alpha=0.1 --scmoe_beta=0.5"
    ),
    "sample_rewire": (
        'python -m moejax.sample --hf=/path/to/hf_dir --prompt="def " --routing=rewire '
        "--rewire_every=8 --rewire_steps=1 --rewire_lr=0.1 --rewire_layers=-2,-1"
    ),
    "sample_c3po": (
        'python -m moejax.sample --workdir=runs/dsmoe --prompt="12 + 30 =" --routing=c3po '
        "--c3po_references=refs.jsonl --c3po_k=3 --c3po_layers=5 --c3po_steps=10"
    ),
    "eval": "python -m moejax.eval --workdir=runs/dsmoe --sources=corpus --max_batches=8 --json",
    "prune": (
        "python -m moejax.compress prune --workdir=runs/dsmoe --out=runs/dsmoe_p16 --keep=16 "
        "--method=easy_ep --calibration_batches=4"
    ),
    "merge": (
        "python -m moejax.compress merge --workdir=runs/dsmoe --out=runs/dsmoe_m16 --keep=16 "
        "--rank=0.5"
    ),
    "quantize": (
        "python -m moejax.compress quantize --workdir=runs/dsmoe --out=runs/dsmoe_q3 "
        "--policy=mixed --avg_bits=3 --candidate_bits=2,3,4,8 --method=gate_mass "
        "--calibration_batches=4"
    ),
}
SWEEP_ABLATION = (
    "python -m experiments.sweep --config=configs/deepseekmoe.py:tokenizer=bpe --sweep=ablation "
    "--workdir=runs/ablation --seeds=3 --parallel=2 --metrics=eval/loss,train/moe/load_cv "
    "--config.train.steps=250"
)
# The "Running on a TPU pod" walk-through of README.md: each needs a GCP project.
GCP = "gcloud, a GCP project, a bucket and a TPU slice"
GCS_TESTS = (
    "; the same paths in a local gs:// emulator: tests/train/test_gcs_workdir.py, "
    "tests/data/test_bucket_sources.py, tests/experiments/test_faults_pod.py"
)
BUCKET_SOURCES = "parquet:$BUCKET/c4-en/train-*.parquet"
POD_WALKTHROUGH = (
    "ZONE=us-east5-a; TPU=moejax-v5p; BUCKET=gs://my-moejax",
    "gcloud storage buckets create $BUCKET --location=us-east5",
    "gcloud compute tpus tpu-vm create $TPU --zone=$ZONE --accelerator-type=v5p-256 "
    "--version=v2-alpha-tpuv5",
    "gcloud compute tpus tpu-vm scp --recurse --zone=$ZONE --worker=all . $TPU:~/moejax",
    "gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command='cd moejax && "
    'python3 -m venv .venv && .venv/bin/pip install -e ".[tpu]"\'',
    "gcloud storage cp c4-en/train-*.parquet $BUCKET/c4-en/",
    f'python -m moejax.data.tokenizer_train --sources="{BUCKET_SOURCES}" --kind=sentencepiece '
    "--vocab_size=32000 --out=$BUCKET/tokenizers/c4_sp32k",
    'gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd moejax && '
    ".venv/bin/python -m moejax.train --distributed "
    "--config=configs/deepseekmoe.py:size=pod,topology=v5p:4x4x8 "
    f"--config.data.sources='{BUCKET_SOURCES}' "
    "--config.data.tokenizer=sentencepiece:$BUCKET/tokenizers/c4_sp32k/sp.model "
    '--config.model.vocab_size=32000 --workdir=$BUCKET/runs/dsmoe-v5p"',
    "gcloud compute tpus queued-resources create moejax-2x --zone=$ZONE --node-count=2 "
    "--node-prefix=moejax-2x --accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5",
    "gcloud compute tpus queued-resources ssh moejax-2x --zone=$ZONE --node=all --worker=all "
    '--command="cd moejax && .venv/bin/python -m moejax.train --distributed '
    "--config=configs/deepseekmoe.py:size=pod,topology=v5p:4x4x8 --config.mesh.data=2 ... "
    '--workdir=$BUCKET/runs/dsmoe-2x"',
)


def _tiny(name: str, arg: str = "") -> str:
    return f"python -m moejax.train --config=configs/{name}.py{arg} --workdir=runs/{name}"


def _pod(name: str, workdir: str) -> str:
    return f"python -m moejax.train --config=configs/{name}.py:size=pod --workdir={workdir}"


MIXTURE_DATA = "python experiments/mixture_data.py --out=$DIR [--vocab_size=4096]"
MIXTURE_TRAIN = (
    "python -m moejax.train --config=configs/deepseekmoe.py --workdir=W "
    "--config.data.tokenizer=sentencepiece:$DIR/sp.model "
    f"--config.data.sources={SOURCES} --config.model.vocab_size=4096 --config.train.steps=50"
)
MT_BASE = (
    "python -m moejax.train --config=configs/mole_multitask.py:stage=base --workdir=runs/mt/base"
)
MT_LORA4 = (
    "python -m moejax.train --config=configs/mole_multitask.py:variant=lora,rank=4 "
    "--config.lora.base_checkpoint=runs/mt/base --workdir=runs/mt/lora"
)
MT = "python experiments/mole_multitask.py"
FAULTS = "python experiments/faults.py"
GMM = "python experiments/benchmarks/gmm.py"
MOE_LAYER = "python experiments/benchmarks/moe_layer.py"
ROUTER_STEP = "python experiments/benchmarks/router_step.py"
TRAIN_STEP = "python experiments/benchmarks/train_step.py"
POD_TABLE = "python experiments/pod_table.py"
TPU_COST = "python experiments/benchmarks/moe_layer_tpu_cost.py"

ROWS = {
    # Fast: one representative of each entry point, in `make test`.
    "make_train": Row((README["make_train"],), _make_train, slow=False),
    "convert_then_fine_tune": Row(
        (README["convert"], README["fine_tune"]), _convert_then_fine_tune, slow=False
    ),
    "sweep_dry_run": Row(
        (README["sweep"], README["sweep_pod"], SWEEP_ABLATION), _sweep_dry_run, slow=False
    ),
    "pod_table_from_json": Row((f"{POD_TABLE} --table",), _pod_table_from_json, slow=False),
    # Slow: the same entry points on every other config and option (the resume itself is
    # checked in-process by tests/train/test_config_history.py).
    "run_then_resume": Row((README["dsmoe"], README["resume"]), _run_then_resume),
    "tiny_configs": Row(
        tuple(_tiny(n) for n in ("deepseekmoe", "deepseek_v3", "dense", "gshard", "rmoe", "top_p")),
        _train_each,
    ),
    "bpe": Row(
        (_tiny("deepseekmoe", ":tokenizer=bpe").replace("runs/deepseekmoe", "runs/dsmoe_bpe"),),
        _train_each,
    ),
    "mixture": Row((MIXTURE_DATA, README["mix"], MIXTURE_TRAIN), _mixture),
    "lora": Row(
        (
            README["smora"],
            "python -m moejax.train --config=configs/lora.py:smora --workdir=runs/lora_smora",
            "python -m moejax.train --config=configs/lora.py:mola,steps=50 "
            "--workdir=runs/lora_mola --config.lora.balance_coef=0.01",
        ),
        _lora,
    ),
    "multitask_stages": Row((MT_BASE, README["mt_lora"]), _multitask_stages),
    "multitask_stages_rank4": Row((MT_BASE, MT_LORA4), _multitask_stages),
    "mole_multitask_script": Row(
        (
            README["mt_script"],
            f"{MT} --workdir=/tmp/mt --quick",
            f"{MT} --variants=lora,rslora --workdir=...",
            f"{MT} --seeds=3 --steps=2000 --workdir=...",
        ),
        _mole_multitask_script,
    ),
    "faults": Row(
        (
            FAULTS,
            f"{FAULTS} --trials 1",
            f"{FAULTS} --scenarios sigkill,corrupt --trials 5 --jobs 1",
            f"{FAULTS} --data=$DIR",
        ),
        _faults,
    ),
    "gmm": Row((f"{GMM} --json", f"{GMM} --json --scale 8 --repeats 1 --skip tokamax"), _gmm),
    "moe_layer": Row(
        (
            f"{MOE_LAYER} --json",
            f"{MOE_LAYER} --json --batch 1 --dtype bfloat16",
            f"{MOE_LAYER} --dispatchers ragged --gmm-impl ragged_dot --skip hf,breakdown",
        ),
        _moe_layer,
    ),
    "moe_layer_tpu_cost": Row(
        (f"{TPU_COST} --json", f"{TPU_COST} --topology v6e:2x2 --dtype float32"),
        _moe_layer_tpu_cost,
    ),
    "lora_grad": Row(
        (
            "python experiments/benchmarks/lora_grad.py "
            "[--d_model 256 --layers 4 --seq 128 --batch 8]",
        ),
        _lora_grad,
    ),
    "router_step": Row(
        (
            f"{ROUTER_STEP} --json",
            f"{ROUTER_STEP} --json --runs runs",
            f"{ROUTER_STEP} --json --repeats 3 --batch 4 --seq-len 64",
        ),
        _router_step,
    ),
    "train_step": Row(
        (f"{TRAIN_STEP} --json", f"{TRAIN_STEP} --json --dispatchers auto --remat none"),
        _train_step,
    ),
    "collective_report_cpu": Row((README["report_cpu"],), _collective_report_cpu),
    "collective_report_tpu": Row((README["report_tpu"],), _collective_report_tpu),
}

# Commands another test runs in the same quick form: {command: "file::test"}.
COVERED_BY = {
    f"{FAULTS} --trials 1 --json": (
        "tests/experiments/test_faults_script.py::test_nan_skip_scenario_end_to_end_json"
    ),
    f"{GMM} --json --scale 64 --repeats 1 --groups skewed --skip megablox,tokamax "
    "--interpret-max-gflop 0.2": (
        "tests/experiments/test_gmm_benchmark.py::"
        "test_every_case_is_timed_against_dense_and_ragged_dot"
    ),
    f"{MOE_LAYER} --json --dtype bfloat16 --skip hf --dispatchers pallas,pallas+fused,ragged "
    "--profile dense_mlp,pallas": (
        "tests/experiments/test_moe_layer_benchmark.py::"
        "test_every_dispatcher_is_timed_against_the_fastest_dense_swiglu"
    ),
    f"{MOE_LAYER} --json --tokens 256 --d-model 32 --experts 8 --d-expert 16 --top-k 2 "
    "--shared 1 --repeats 1": (
        "tests/experiments/test_moe_layer_benchmark.py::"
        "test_every_dispatcher_is_timed_against_the_fastest_dense_swiglu"
    ),
    f"{TRAIN_STEP} --json --batch 2 --seq-len 32 --warmup 1 --steps 2 "
    "--set moe.capacity_factor=4 --dispatchers ragged,capacity_einsum,bogus --remat none": (
        "tests/experiments/test_train_step_benchmark.py::"
        "test_train_step_benchmark_reports_consistent_numbers"
    ),
    README["sample"]: (
        "tests/analysis/test_load_and_sample.py::test_sample_cli_prints_the_greedy_continuation"
    ),
    README["sample_top_p"]: (
        "tests/analysis/test_load_and_sample.py::test_sampling_is_seeded_and_errors_are_one_line"
    ),
    README["trace"]: (
        "tests/analysis/test_trace.py::test_the_cli_traces_every_step_on_the_same_tokens"
    ),
    **{
        README[name]: f"tests/analysis/test_decoding_routing_cli.py::{test}"
        for name, test in [
            ("sample_scmoe", "test_every_method_runs_from_one_command_on_a_trained_run"),
            ("sample_rewire", "test_every_method_runs_from_one_command_on_an_imported_hf_model"),
            ("sample_c3po", "test_every_method_runs_from_one_command_on_a_trained_run"),
        ]
    },
    README["eval"]: "tests/eval/test_evaluate.py::test_cli_prints_one_json_report",
    README["prune"]: (
        "tests/compress/test_compress_cli.py::test_prune_cli_writes_a_run_that_reloads_and_evaluates"
    ),
    README[
        "merge"
    ]: "tests/compress/test_compress_cli.py::test_merge_cli_writes_a_run_that_reloads",
    README["quantize"]: (
        "tests/compress/test_quantize.py::"
        "test_quantize_cli_mixed_writes_a_run_that_reloads_and_evaluates"
    ),
    README["ft_convert"]: (
        "tests/lora/test_finetune_recipe.py::"
        "test_finetune_recipe_trains_lora_on_attention_and_experts"
    ),
    README["ft_lora"]: (
        "tests/lora/test_finetune_recipe.py::"
        "test_finetune_recipe_trains_lora_on_attention_and_experts"
    ),
    "python -m experiments.shared_expert_removed --sweep_dir=runs/ablation "
    "--variant=fine_grained_shared": (
        "tests/experiments/test_shared_expert_removed.py::test_the_cli_prints_both_losses"
    ),
    "python experiments/notebooks/execute.py experiments/notebooks/routing_analysis.ipynb": (
        "tests/experiments/test_notebooks.py::test_routing_analysis_notebook_runs_on_a_tiny_run"
    ),
    "python -m experiments.post_training "
    "--runs=runs/ablation/fine_grained_shared/seed0,runs/ablation/fine_grained_shared/seed1 "
    "--workdir=runs/post_training --out=experiments/results/post_training/deepseekmoe_bpe": (
        "tests/experiments/test_post_training.py::"
        "test_rows_are_the_eval_reports_of_the_compressed_runs"
    ),
    "python -m experiments.tiny_hf_moe --arch=qwen2_moe --seed=0 --out=runs/hf/qwen2_moe_s0": (
        "tests/experiments/test_post_training.py::"
        "test_tiny_hf_moe_imports_with_the_transformers_logits"
    ),
    "python -m moejax.train.convert_hf --from=runs/hf/qwen2_moe_s0 --workdir=runs/hf/run_s0": (
        "tests/train/test_convert_cli.py::test_convert_prints_one_line_and_bad_input_one_error"
    ),
    f"{FAULTS} --gcs --scenarios corrupt,kill_during_save": (
        "tests/experiments/test_faults_pod.py::test_corrupt_and_interrupted_save_in_a_bucket"
    ),
    f"{FAULTS} --scenarios mh_sigkill,mh_sigterm,mh_unreachable --jobs 1": (
        "tests/experiments/test_faults_pod.py::test_multi_host_kill_and_preemption_recover"
    ),
}

POD = (
    "pod size: a TPU slice of 128-256 chips. tests/config/test_pod_layouts.py validates each "
    "pod layout for its chips; experiments/pod_table.py compiles them with XLA:TPU"
)
NOT_RUN = {
    README["make_test"]: "the whole suite, which includes this test",
    _pod("gshard", "/mnt/shared/runs/gshard"): POD,
    _pod("deepseek_v3", "/mnt/shared/runs/deepseek_v3"): POD,
    _pod("deepseekmoe", "/mnt/shared/runs/dsmoe"): POD,
    _pod("dense", "/mnt/shared/runs/dense"): POD,
    _pod("rmoe", "/mnt/shared/runs/rmoe"): POD,
    "python -m moejax.train --config=configs/deepseekmoe.py:size=gpu --workdir=runs/dsmoe_gpu": (
        "one-GPU size (1.7B parameters, 8 x 4096 tokens a step); "
        "tests/experiments/test_train_step_benchmark.py builds it abstractly"
    ),
    _pod("top_p", "/mnt/shared/runs/top_p"): POD,
    README["multihost"]: (
        POD + "; two hosts. tests/train/test_multihost.py runs two processes at tiny size"
    ),
    f"{GMM} --json --shapes full": (
        "GPU/TPU shapes (K 4096 x N 14336 groups); the CPU form is the `--scale 8` line"
    ),
    "python experiments/benchmarks/gmm_tiles.py --json": "Hopper GPU only (Mosaic GPU kernels)",
    POD_TABLE: "compiles every pod config for its TPU slices: about an hour here",
    f"{POD_TABLE} --only=deepseekmoe --topology=v6e:16x16": (
        "a pod compile for 256 v6e chips: 4-15 minutes here"
    ),
    **{command: GCP + GCS_TESTS for command in POD_WALKTHROUGH},
    "python -m experiments.benchmarks.hf_sharded_load --dir /tmp/synth --gb 2": (
        "writes a checkpoint of 0.5 GB or more and loads it twice; "
        "tests/hf/test_sharded_loading.py loads a tiny one onto a mesh"
    ),
    "python -m experiments.benchmarks.hf_sharded_load --dir /tmp/synth --gb 2 --save /tmp/out": (
        "the same, then saves each load again; tests/hf/test_sharded_loading.py saves a tiny "
        "sharded one in 16 kB shards"
    ),
    f"{POD_TABLE} --only=deepseekmoe --remat=none,dots,full": (
        "three pod compiles for 128 v5p chips: 4-15 minutes each here"
    ),
}


def _row_params():
    return [
        pytest.param(name, marks=[pytest.mark.slow] if row.slow else [], id=name)
        for name, row in ROWS.items()
    ]


# --- The tests ---------------------------------------------------------------------------


def test_every_documented_command_is_run_or_listed():
    documented = documented_commands()
    run = {c for row in ROWS.values() for c in row.commands}
    listed = run | set(COVERED_BY) | set(NOT_RUN)
    missing = {c: where for c, where in documented.items() if c not in listed}
    assert not missing, (
        "documented commands with neither a quick form (ROWS), a covering test (COVERED_BY) "
        f"nor a reason (NOT_RUN) in tests/test_readme_commands.py: {missing}"
    )
    stale = sorted(listed - set(documented))
    assert not stale, f"table entries no longer documented anywhere: {stale}"
    assert not (run & set(NOT_RUN)) and not (run & set(COVERED_BY))


def test_covering_tests_exist():
    for command, target in COVERED_BY.items():
        path, _, name = target.partition("::")
        assert f"def {name}(" in (REPO / path).read_text(), (command, target)


@pytest.mark.parametrize("name", _row_params())
def test_quick_form(name, tmp_path, tiny_corpus_dir):
    row = ROWS[name]
    row.run(Context(tmp_path, tiny_corpus_dir), row.commands)


def test_no_docstring_continues_a_line_with_a_backslash():
    """A `\\` before a newline inside a non-raw string literal joins the two lines, so
    `--help` and `help()` show a command as one line with a run of spaces. Commands in
    docstrings are written raw (`r\"\"\"`) or with `\\\\`."""
    bad = []
    for path in [*DOCSTRING_FILES, *REPO.glob("moejax/**/*.py")]:
        rel = str(path.relative_to(REPO))
        with tokenize.open(path) as f:
            for token in tokenize.generate_tokens(f.readline):
                if token.type != tokenize.STRING:
                    continue
                prefix = re.match(r"^[a-zA-Z]*", token.string).group(0).lower()
                if "r" not in prefix and re.search(r"(?<!\\)\\\n", token.string):
                    bad.append(f"{rel}:{token.start[0]}")
    assert not bad, f"backslash-newline inside a non-raw string literal: {bad}"


HELP_SCRIPTS = [
    "experiments/faults.py",
    "experiments/mixture_data.py",
    "experiments/mole_multitask.py",
    "experiments/pod_table.py",
    "experiments/benchmarks/router_step.py",
    "experiments/benchmarks/train_step.py",
    "experiments/benchmarks/gmm.py",
    "experiments/benchmarks/moe_layer.py",
]


def test_experiment_help_shows_the_docstring_whole():
    """`faults.py --help` cut its description mid-sentence (the docstring's first line)."""
    driver = (
        "import contextlib, io, json, runpy, sys\n"
        "out = {}\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv = [script, '--help']\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            runpy.run_path(script, run_name='__main__')\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    out[script] = buf.getvalue()\n"
        "print('HELP' + json.dumps(out))\n"
    )
    output = Context(REPO, "").run(["python", "-c", driver, *HELP_SCRIPTS], timeout=600)
    helps = json.loads(output[output.index("HELP") + 4 :].splitlines()[0])
    for script in HELP_SCRIPTS:
        doc = ast.get_docstring(ast.parse((REPO / script).read_text()))
        first_paragraph = " ".join(doc.split("\n\n")[0].split())
        shown = " ".join(helps[script].split())
        assert first_paragraph in shown, (script, helps[script][:500])
        assert not re.search(r"\S {3,}--", helps[script]), script
