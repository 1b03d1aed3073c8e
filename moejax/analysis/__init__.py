"""Routing analysis of finished runs (issue 19).

- `moejax.analysis.trace`: `python -m moejax.analysis.trace --workdir=W --tokens=N
  --out=F.parquet` writes what every MoE layer chose for N validation tokens, one row per
  (token, layer), at one or several checkpoints.
- `moejax.analysis.metrics`: pure functions from a trace to tidy DataFrames (expert load,
  load CV and dead experts, router saturation, co-activation, domain and vocabulary
  specialisation, layer-to-layer transitions, consecutive-token locality, experts per
  token against loss), after OLMoE (section 5) and Mixtral (section 5).

`experiments/notebooks/routing_analysis.ipynb` plots all of them.
"""
