"""Building blocks that import only jax/flax: parameters with logical axes, dtypes, RMSNorm,
rotary embeddings, the SwiGLU MLP, the collection-name table and the adapter hook protocol.

Every other package of moejax may import this one; this one imports no other part of moejax.
"""
