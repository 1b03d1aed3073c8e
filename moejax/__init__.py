"""moejax: sparse Mixture-of-Experts language models in JAX/Flax (see README.md and
docs/architecture.md). Subpackages: config, data, models, moe, sharding, train, analysis.

`moejax.load_run(workdir, step=None)` reads a run back as `(model, variables, config,
tokenizer)` (`moejax.train.run_loader`); it is resolved on first use, so `import moejax.nn`
does not load the training stack.
"""

import importlib

from moejax.libtpu_env import quiet_libtpu_without_chips

quiet_libtpu_without_chips()  # before JAX starts its backends (see moejax/libtpu_env.py)

__version__ = "0.1.0"

# Top-level names resolved on first access (PEP 562): name -> the module that defines it.
_LAZY = {"load_run": "moejax.train.run_loader"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
