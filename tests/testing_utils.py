"""Helpers shared by test modules (importable thanks to `pythonpath = tests` in pytest.ini)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from moejax.config.files import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
# The one small corpus the tests build (once per worker, by tests/conftest.py).
TEST_CORPUS_BYTES_PER_DOMAIN = 200_000


def xla_flags_with_devices(devices: int) -> str:
    """This process's XLA_FLAGS (conftest's test-time flags) plus `devices` fake CPU devices,
    for a subprocess's environment."""
    flag = f"--xla_force_host_platform_device_count={devices}"
    return f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def device_env(devices: int) -> dict[str, str]:
    """This process's environment for a subprocess on `devices` simulated CPU devices that
    imports moejax and the test helpers."""
    return {
        **os.environ,
        "XLA_FLAGS": xla_flags_with_devices(devices),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
    }


def run_pod_script(script: str, *args: str, devices: int = 8, timeout: int = 900) -> dict:
    """`python -c script args` in a subprocess on `devices` simulated CPU devices (the XLA
    flag must be set before JAX starts); asserts it succeeded and returns the JSON it
    printed after `RESULT`."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=device_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    return json.loads(line[len("RESULT") :])


def run_faults(
    workdir, *args: str, timeout: int = 1800
) -> tuple[subprocess.CompletedProcess, dict]:
    """`experiments/faults.py --trials=1 --json --workdir=WORKDIR ARGS` on CPU; asserts it
    succeeded and returns the process and its one JSON report."""
    script = REPO / "experiments" / "faults.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--trials=1", "--json", f"--workdir={workdir}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc, json.loads(proc.stdout)


def load_experiment(name: str):
    """Imports experiments/<name>.py by path (experiments/ is not a package), once; `name`
    may name a subfolder ("benchmarks/train_step")."""
    module_name = name.replace("/", "_")
    if module_name not in sys.modules:
        path = REPO / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look their module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def load_config_module(name: str):
    """Imports configs/<name>.py by path (configs/ is not a package)."""
    return load_config_file(REPO / "configs" / f"{name}.py")


def make_tiny_config(data_dir: str, name: str = "deepseekmoe", **overrides):
    """configs/<name>.py shrunk to train in seconds on the test corpus in `data_dir`;
    overrides use dotted names, e.g. `**{"train.steps": 5}` (the `tiny_config` fixture)."""
    c = load_config_module(name).get_config()
    c.model.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=2)
    if c.model.moe_every:
        c.moe.update(num_experts=4, top_k=2, d_expert=16, gmm_tile=16)
    c.data.update(
        data_dir=data_dir,
        max_bytes_per_domain=TEST_CORPUS_BYTES_PER_DOMAIN,
        seq_len=32,
        global_batch_size=4,
    )
    c.train.update(
        steps=10,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        eval_batches=2,
        checkpoint_every=5,
        async_checkpoint=False,
        peak_tflops=1.0,
    )
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        c[section][field] = value
    return c


def cli_flags(config, name: str = "deepseekmoe") -> list[str]:
    """`python -m moejax.train` flags that rebuild `config` from configs/<name>.py: the
    config file plus one `--config.section.field=value` per field that differs from it."""
    base = load_config_module(name).get_config().to_dict()
    flags = [f"--config={REPO / 'configs' / f'{name}.py'}"]
    for section, fields in config.to_dict().items():
        for field, value in fields.items():
            if base[section].get(field) != value:
                flags.append(f"--config.{section}.{field}={value}")
    return flags


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64 (the kernel tests' error measure)."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def f32(*arrays):
    """The arrays cast to float32 (references computed from low-precision operands)."""
    import jax.numpy as jnp

    return [jnp.asarray(a, jnp.float32) for a in arrays]


def run_module(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root on the CPU backend, its output
    captured (text)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def write_mixture(root: pathlib.Path, vocab_size: int = 320) -> tuple[str, str]:
    """Two small sources on disk, parquet "web" (2 files) and gzipped jsonl "code" (text in
    `content`), and a SentencePiece BPE of `vocab_size` ids trained on their text. Returns
    `(data.sources, data.tokenizer)`: the sources weighted 0.7 / 0.3."""
    import gzip

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moejax.data.tokenizer_training import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["the", "expert", "router", "token", "layer", "gate", "sparse", "mixture", "of"]
    web = [" ".join(rng.choice(words, rng.integers(20, 90))) + "." for _ in range(120)]
    code = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(150)]
    for k in range(2):
        pq.write_table(pa.table({"text": web[k::2]}), root / f"web-{k}.parquet")
        with gzip.open(root / f"code-{k}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"content": t}) + "\n" for t in code[k::2])
    tokenizer = train_tokenizer(
        web + code, kind="sentencepiece", vocab_size=vocab_size, out_dir=str(root / "sp")
    )
    sources = f"parquet:{root}/web-*.parquet@0.7,jsonl:{root}/code-*.jsonl.gz#content@0.3"
    return sources, tokenizer


def random_run(workdir: str, config, seed: int = 0, edit=None):
    """A run directory at step 0 holding a randomly initialised model of `config` (no
    training: `moejax.train.convert_hf.write_run`); `edit(variables) -> variables` changes
    the weights first. Returns `(model, variables, sections)`."""
    from moejax.models.transformer import Transformer
    from moejax.train.convert_hf import write_run
    from moejax.train.run_loader import one_device_sections

    s = one_device_sections(config.to_dict())
    model = Transformer(s.model, s.moe)
    variables = random_variables(model, seed)
    if edit is not None:
        variables = edit(variables)
    write_run(workdir, config.to_dict(), variables, train=s.train)
    return model, variables, s


def random_variables(model, seed: int = 0, std: float = 0.2) -> dict:
    """Random variables of `model` without compiling its init: NumPy normals of `std` for
    the weights, ones for norm scales, zeros for biases (router_bias included)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    abstract = nn.unbox(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
