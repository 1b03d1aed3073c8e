"""moejax: sparse Mixture-of-Experts language models in JAX/Flax (see README.md and
docs/architecture.md). Subpackages: config, data, models, moe, sharding, train."""

from moejax.libtpu_env import quiet_libtpu_without_chips

quiet_libtpu_without_chips()  # before JAX starts its backends (see moejax/libtpu_env.py)

__version__ = "0.1.0"
