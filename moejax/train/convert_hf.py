"""`python -m moejax.train.convert_hf --from HF_DIR --workdir WORKDIR`: a HF checkpoint as a moejax
run directory that `moejax.train` fine-tunes.

Writes into WORKDIR (which must hold no checkpoint yet):
    config.py         `get_config()`: the default config with the checkpoint's `model` and
                      `moe` sections (from model.json); pass it to moejax.train
    model.json        those two sections
    config.json       the full config, as the trainer writes it (its resume check reads it)
    checkpoints/0/    the train state at step 0: the HF weights, a fresh optimizer state
    tokenizer/        the checkpoint's tokenizer files (tokenizer.json and its configs, or a
                      SentencePiece tokenizer.model); config.py sets `data.tokenizer` to them

`--mesh=fsdp=2,expert=4` (sizes of `mesh` axes; an axis left out is 1, `data` the rest of
the devices) builds every parameter as a sharded `jax.Array` straight from the safetensors
shards (`moejax.hf.from_pretrained(mesh=)`, each device reading only its slices) and orbax
writes the shards, so no host ever holds the whole model.

Fine-tune with
    python -m moejax.train --config=WORKDIR/config.py --workdir=WORKDIR \\
        --config.data.sources=... --config.train.steps=1000
The trainer resumes from step 0, so the config must keep the model and moe sections and
the optimizer's structure (`train.grad_clip` on or off as at conversion: on by default).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from moejax.config.base import default_config
from moejax.config.train import TrainConfig
from moejax.hf import configs_as_dict, from_pretrained
from moejax.nn.collections import NON_TRAINABLE
from moejax.paths import as_path, is_remote, join, resolve, write_text
from moejax.sharding.config import MESH_AXES, MeshConfig
from moejax.sharding.mesh import make_mesh
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer
from moejax.train.step import TrainState

CONFIG_PY = '''"""moejax config of a converted Hugging Face checkpoint (moejax.train.convert_hf).

    python -m moejax.train --config={path} --workdir={workdir}
"""
import json
import os
import shutil

from moejax.config.base import default_config


def get_config(arg=None):
    config = default_config()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.json")) as f:
        sections = json.load(f)
    for name, values in sections.items():
        config[name].update(values)
    kind, _, path = config.data.tokenizer.partition(":")
    if path and not os.path.isabs(path) and "://" not in path:  # the copy next to this file
        here = os.path.dirname(os.path.abspath(__file__))
        config.data.tokenizer = kind + ":" + os.path.join(here, path)
    return config
'''
# The files that define a Hugging Face checkpoint's tokenizer, copied with it.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


def copy_tokenizer(hf_dir: str, workdir: str) -> str | None:
    """Copies the checkpoint's tokenizer files into WORKDIR/tokenizer; returns the
    `data.tokenizer` spec relative to WORKDIR (None when the checkpoint has no tokenizer)."""
    found = [name for name in TOKENIZER_FILES if (as_path(hf_dir) / name).is_file()]
    if "tokenizer.json" in found:
        spec = "hf:tokenizer"
    elif "tokenizer.model" in found:
        spec = "sentencepiece:tokenizer/tokenizer.model"
    else:
        return None
    target = as_path(workdir) / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in found:
        (as_path(hf_dir) / name).copy(target / name, overwrite=True)
    return spec


def write_run(
    workdir: str,
    sections: dict[str, dict],
    variables: dict,
    *,
    extra: dict | None = None,
    train: TrainConfig | None = None,
    tokenizer: str | None = None,
) -> dict:
    """Writes `variables` as a run directory at step 0 (the files of the module docstring):
    the default config updated by `sections` (name -> fields; `model.json` holds them), a
    train state with a fresh optimizer of `train` (default `TrainConfig()`; a resume needs
    the same optimizer structure) and `extra` saved beside the config in the checkpoint.
    `tokenizer`: a `data.tokenizer` spec relative to WORKDIR (the copy `copy_tokenizer`
    made), named by its absolute path in config.json. Raises FileExistsError if WORKDIR holds
    checkpoints, ValueError if `variables` holds a collection the train state does not keep;
    returns the config as a dict. Shared by this converter and `moejax.compress`."""
    if not set(variables) <= {"params", *NON_TRAINABLE}:
        raise ValueError(
            f"variables {sorted(variables)} are not all part of the train state (params, "
            f"{', '.join(NON_TRAINABLE)}); nothing was written."
        )
    as_path(workdir).mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=3, save_every=1, async_save=False)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise FileExistsError(f"{workdir} already holds checkpoints; write into a new one.")
    sections = {name: dict(values) for name, values in sections.items()}
    if tokenizer is not None:  # in a bucket, by its URL: config.py is run from a local copy
        kind, _, path = tokenizer.partition(":")
        remote = f"{kind}:{join(workdir, path)}"
        sections.setdefault("data", {})["tokenizer"] = remote if is_remote(workdir) else tokenizer
    config = default_config()
    for name, values in sections.items():
        config[name].update(values)
    if tokenizer is not None:  # config.json names the copy by its absolute path
        kind, _, path = tokenizer.partition(":")
        config.data.tokenizer = f"{kind}:{join(workdir, path)}"
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(train or TrainConfig()).init(params),
        collections={k: v for k, v in variables.items() if k != "params"} or None,
    )
    ckpt.save(0, state, extra={"config": config.to_dict(), **(extra or {})}, force=True)
    ckpt.close()
    write_text(join(workdir, "model.json"), json.dumps(sections, indent=2, sort_keys=True))
    write_text(join(workdir, "config.json"), json.dumps(config.to_dict(), indent=2, sort_keys=True))
    path = join(workdir, "config.py")
    write_text(path, CONFIG_PY.format(path=path, workdir=resolve(workdir)))
    jax.block_until_ready(params)
    return config.to_dict()


def parse_mesh(spec: str) -> MeshConfig:
    """`--mesh` ("fsdp=2,expert=4") as a MeshConfig; ValueError naming the flag otherwise."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        axis, eq, size = part.partition("=")
        if not eq or axis not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ValueError(
                f"--mesh={spec!r}: {part!r} is not AXIS=SIZE with AXIS one of "
                f"{', '.join(MESH_AXES)} (e.g. --mesh=fsdp=2,expert=4)."
            )
        sizes[axis] = int(size)
    return MeshConfig.from_mapping({"data": -1, **sizes})


def convert(hf_dir: str, workdir: str, mesh: MeshConfig | None = None) -> dict:
    """Converts `hf_dir` into `workdir` (see the module docstring); returns the config.
    `mesh`: load every parameter sharded over these local devices (by `mesh.rules`)."""
    if mesh is None:
        model, variables = from_pretrained(hf_dir)
    else:
        model, variables = from_pretrained(hf_dir, mesh=make_mesh(mesh), rules=mesh.rules)
    if not set(variables) <= {"params", *NON_TRAINABLE}:
        raise ValueError(
            f"{hf_dir}: variables {sorted(variables)} are not all part of the "
            f"train state (params, {', '.join(NON_TRAINABLE)}); nothing was written."
        )
    with Checkpointer(workdir, async_save=False) as ckpt:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{workdir} already holds checkpoints; convert into a new one.")
    tokenizer = copy_tokenizer(hf_dir, workdir)
    return write_run(
        workdir,
        configs_as_dict(model),
        variables,
        extra={"converted_from": hf_dir},
        tokenizer=tokenizer,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    workdir, hf_dir = flags.FLAGS["workdir"].value, flags.FLAGS["from"].value
    try:
        if not (as_path(hf_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"--from={hf_dir} holds no config.json: pass a Hugging Face checkpoint "
                f"directory (config.json and *.safetensors, as save_pretrained writes it)."
            )
        mesh = flags.FLAGS["mesh"].value
        config = convert(hf_dir, workdir, parse_mesh(mesh) if mesh else None)
    except (OSError, ValueError) as e:  # ConfigError is a ValueError: names the key
        print(f"moejax: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if config["data"]["tokenizer"] == "byte":
        print(
            f"WARNING: {flags.FLAGS['from'].value} holds no tokenizer (tokenizer.json or "
            f"tokenizer.model): the run would feed byte ids to a sub-word vocabulary. Pass "
            f"--config.data.tokenizer=hf:DIR (or sentencepiece:FILE) when fine-tuning."
        )
    config_py = join(workdir, "config.py")
    if is_remote(workdir):  # a config file is imported from local disk
        config_py = "config.py"
        files = f"{join(workdir, 'config.py')} {join(workdir, 'model.json')}"
        print(f"copy its config file here first: gcloud storage cp {files} .")
    print(
        f"wrote {resolve(workdir)}: fine-tune with python -m moejax.train "
        f"--config={config_py} --workdir={resolve(workdir)}"
    )


if __name__ == "__main__":  # flags defined only when run, so importing `convert` defines none
    flags.DEFINE_string("from", None, "Hugging Face checkpoint directory.")
    flags.DEFINE_string("workdir", None, "moejax run directory to create.")
    flags.DEFINE_string(
        "mesh", "", "Load sharded over the local devices, e.g. fsdp=2,expert=4 ('' = one device)."
    )
    flags.mark_flags_as_required(["from", "workdir"])
    app.run(main)
