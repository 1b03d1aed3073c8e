"""moejax: sparse Mixture-of-Experts language models in JAX/Flax (see README.md and
docs/architecture.md). Subpackages: config, data, models, moe, sharding, train."""

__version__ = "0.1.0"
