r"""Routing traces: what every MoE layer of a run chose for each validation token, as parquet.

    python -m moejax.analysis.trace --workdir=runs/deepseekmoe --tokens=20000 \
        --out=runs/deepseekmoe/trace.parquet [--step=300|100,200,300|all] [--sources=code,prose]

For each checkpoint step asked for, the run (`moejax.load_run`) reads the validation split
through the training data path (`data.sources`, `data.tokenizer`, the evaluation batches of
`moejax.data.make_batches`: every source's held-out documents, packed into rows of
`data.seq_len`) and writes one row per (scored token, MoE layer):

    step, layer (MoE layer index, as the `layerN` metrics), model_layer (index among all
    layers), seq (row of the trace), segment (document within the row), position (in the
    document), token_id, token_text, source (the evaluation domain), target_id,
    predicted_id (argmax of the logits), loss (cross-entropy of the target, nats),
    experts (list, the router's rank order; only slots with a nonzero weight, so top-p rows
    have 1 to k), weights (list, the same order), router_entropy (nats, of the router's
    probabilities over all experts).

`--tokens=N` scored tokens per step, split evenly over the sources traced (`--sources`, a
comma-separated subset of the evaluation domains; default all); a source with fewer
held-out tokens gives what it has. Every step traces the same tokens (the evaluation split
is read in its stored order), so checkpoints compare token by token (router saturation).
Memory does not grow with N: batches are run one at a time (`--batch_size` rows, default
`data.global_batch_size`) and written as they come. The parquet metadata holds
`moejax.num_experts`, `moejax.layer_num_experts` (each MoE layer's, comma-separated),
`moejax.top_k`, `moejax.workdir` and `moejax.tokens`;
`moejax.analysis.metrics.read_trace` reads them back into `DataFrame.attrs`.

The experts, weights and entropies are the ones the MoE layers computed in the forward pass
(`MoEOutput.per_token`: the selection rule's own `Routing`), not a re-derivation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from moejax.config.validation import Sections
from moejax.config_section import ConfigError
from moejax.data import DataError, Tokenizer, domain_names, make_batches
from moejax.models.config import layer_moe_config
from moejax.models.side_outputs import apply_model
from moejax.train.checkpoint import CheckpointError
from moejax.train.run_loader import checkpoint_steps, load_run, resolve_step

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", pa.int16()),
        ("model_layer", pa.int16()),
        ("seq", pa.int64()),
        ("segment", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("source", pa.string()),
        ("target_id", pa.int32()),
        ("predicted_id", pa.int32()),
        ("loss", pa.float32()),
        ("experts", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("router_entropy", pa.float32()),
    ]
)


class TraceError(ValueError):
    """A run that cannot be traced (no MoE layer) or a bad argument."""


def moe_model_layers(s: Sections) -> list[int]:
    """The model layer index of each MoE layer, in order."""
    m = s.model
    return [i for i, kind in enumerate(m.layer_layout) if kind.moe]


def forward_fn(model):
    """jit((variables, batch) -> per-token loss, prediction and routing) for `model`."""

    def forward(variables, batch):
        logits, extras = apply_model(
            model, variables, batch["inputs"], batch["segment_ids"], batch["positions"]
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        loss = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        routing = extras["routing"]
        return {
            "loss": loss,
            "predicted": jnp.argmax(logits, axis=-1).astype(jnp.int32),
            "experts": routing["expert_ids"],  # [n_moe, B, L, k]
            "weights": routing["combine_weights"],
            "entropy": routing["router_entropy"],  # [n_moe, B, L]
        }

    return jax.jit(forward)


class TokenTexts:
    """`tokenizer.decode([id])` of each id, decoded once."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for i in ids.tolist():
            text = self._cache.get(i)
            if text is None:
                text = self._cache[i] = self.tokenizer.decode([i])
            out.append(text)
        return out


def select_tokens(
    batch: dict[str, np.ndarray], wanted: dict[int, int], used: dict[int, int]
) -> np.ndarray:
    """bool[B, L]: the scored tokens of `batch` still within their domain's quota
    (`wanted[domain]` tokens, `used[domain]` taken so far; updated), in row-major order."""
    scored = batch["loss_mask"] > 0
    keep = np.zeros_like(scored)
    flat_keep = keep.reshape(-1)
    domains = batch["domains"].reshape(-1)
    scored = scored.reshape(-1)
    for domain, quota in wanted.items():
        left = quota - used.get(domain, 0)
        if left <= 0:
            continue
        where = np.flatnonzero(scored & (domains == domain))[:left]
        flat_keep[where] = True
        used[domain] = used.get(domain, 0) + len(where)
    return keep


def quotas(names: Sequence[str], sources: Sequence[str] | None, tokens: int) -> dict[int, int]:
    """{domain id: tokens to trace}: `tokens` split evenly over `sources` (all: None)."""
    chosen = list(names) if not sources else list(sources)
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise TraceError(
            f"--sources: {unknown[0]!r} is not an evaluation domain of this run; its domains "
            f"are {list(names)}."
        )
    if tokens < len(chosen):
        raise TraceError(f"--tokens={tokens} must be at least one per source ({len(chosen)}).")
    base, extra = divmod(tokens, len(chosen))
    return {names.index(s): base + (i < extra) for i, s in enumerate(chosen)}


def batch_rows(
    out: dict[str, np.ndarray],
    batch: dict[str, np.ndarray],
    keep: np.ndarray,
    *,
    step: int,
    seq_offset: int,
    names: Sequence[str],
    model_layers: Sequence[int],
    texts: TokenTexts,
) -> pa.Table:
    """The trace rows of one batch: every kept token x every MoE layer, token-major."""
    b_idx, l_idx = np.nonzero(keep)
    n, n_moe = len(b_idx), len(model_layers)
    experts = out["experts"][:, b_idx, l_idx]  # [n_moe, n, k]
    weights = out["weights"][:, b_idx, l_idx]
    k = experts.shape[-1]
    experts = np.transpose(experts, (1, 0, 2)).reshape(n * n_moe, k)
    weights = np.transpose(weights, (1, 0, 2)).reshape(n * n_moe, k).astype(np.float32)
    used = weights > 0
    offsets = np.concatenate([[0], np.cumsum(used.sum(axis=1))]).astype(np.int32)

    def per_token(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, n_moe)

    token_ids = batch["inputs"][b_idx, l_idx]
    return pa.table(
        {
            "step": np.full(n * n_moe, step, np.int64),
            "layer": np.tile(np.arange(n_moe, dtype=np.int16), n),
            "model_layer": np.tile(np.asarray(model_layers, np.int16), n),
            "seq": per_token(seq_offset + b_idx.astype(np.int64)),
            "segment": per_token(batch["segment_ids"][b_idx, l_idx].astype(np.int32)),
            "position": per_token(batch["positions"][b_idx, l_idx].astype(np.int32)),
            "token_id": per_token(token_ids.astype(np.int32)),
            "token_text": per_token(np.asarray(texts(token_ids), dtype=object)),
            "source": per_token(
                np.asarray([names[d] for d in batch["domains"][b_idx, l_idx]], dtype=object)
            ),
            "target_id": per_token(batch["targets"][b_idx, l_idx].astype(np.int32)),
            "predicted_id": per_token(out["predicted"][b_idx, l_idx]),
            "loss": per_token(out["loss"][b_idx, l_idx].astype(np.float32)),
            "experts": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(experts[used].astype(np.int32))
            ),
            "weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights[used])),
            "router_entropy": np.transpose(out["entropy"][:, b_idx, l_idx]).reshape(-1),
        },
        schema=SCHEMA,
    )


def trace_tables(
    model,
    variables,
    s: Sections,
    tokenizer: Tokenizer,
    *,
    step: int,
    tokens: int,
    sources: Sequence[str] | None = None,
    batch_size: int = 0,
    forward=None,
) -> Iterator[pa.Table]:
    """The trace of one loaded checkpoint, a table per batch (module docstring)."""
    layers = moe_model_layers(s)
    if not layers:
        raise TraceError("the run has no MoE layer (model.moe_every=0): nothing to trace.")
    data = dataclasses.replace(s.data, global_batch_size=batch_size) if batch_size else s.data
    names = list(domain_names(data))
    wanted = quotas(names, sources, tokens)
    used: dict[int, int] = {}
    forward = forward or forward_fn(model)
    texts = TokenTexts(tokenizer)
    seq_offset = 0
    for batch in make_batches(data, data.eval_split, process_index=0, process_count=1):
        keep = select_tokens(batch, wanted, used)
        if keep.any():
            device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
            out = jax.device_get(forward(variables, device_batch))
            yield batch_rows(
                out,
                batch,
                keep,
                step=step,
                seq_offset=seq_offset,
                names=names,
                model_layers=layers,
                texts=texts,
            )
        seq_offset += len(batch["inputs"])
        if all(used.get(d, 0) >= q for d, q in wanted.items()):
            return


def parse_steps(text: str | None, available: Sequence[int]) -> list[int | None]:
    """`--step`: None (the latest), `S`, `S1,S2` or `all` (every checkpoint kept)."""
    if not text:
        return [None]
    if text == "all":
        if not available:
            raise TraceError("--step=all: the run has no checkpoint yet.")
        return list(available)
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise TraceError(f"--step={text!r} must be a step, a list S1,S2 or 'all'.") from None


def write_trace(
    workdir: str | epath.Path,
    out: str | epath.Path,
    *,
    tokens: int,
    steps: Sequence[int | None] = (None,),
    sources: Sequence[str] | None = None,
    batch_size: int = 0,
    log=print,
) -> int:
    """Traces every step of `steps` into one parquet file at `out`; returns its rows."""
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer, handle = None, None
    rows = 0
    forward, forward_model = None, None
    try:
        for step in steps:
            step = resolve_step(workdir, step)
            model, variables, s, tokenizer = load_run(workdir, step)
            if forward is None or model != forward_model:  # one compile for equal models
                forward, forward_model = forward_fn(model), model
            if writer is None:
                meta = {
                    "moejax.num_experts": str(s.moe.num_experts),
                    "moejax.layer_num_experts": ",".join(
                        str(layer_moe_config(kind, s.moe).num_experts)
                        for kind in s.model.layer_layout
                        if kind.moe
                    ),
                    "moejax.top_k": str(s.moe.top_k),
                    "moejax.workdir": str(workdir),
                    "moejax.tokens": str(tokens),
                }
                schema = SCHEMA.with_metadata(meta)
                handle = out.open("wb")
                writer = pq.ParquetWriter(handle, schema)
            step_rows = 0
            for table in trace_tables(
                model,
                variables,
                s,
                tokenizer,
                step=step,
                tokens=tokens,
                sources=sources,
                batch_size=batch_size,
                forward=forward,
            ):
                writer.write_table(table.replace_schema_metadata(schema.metadata))
                step_rows += table.num_rows
            layers = max(len(moe_model_layers(s)), 1)
            log(f"trace: step {step}: {step_rows // layers} tokens x {layers} MoE layers")
            rows += step_rows
    finally:
        if writer is not None:
            writer.close()
        if handle is not None:
            handle.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moejax.analysis.trace",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--workdir", required=True, help="a run directory (python -m moejax.train)")
    p.add_argument("--out", required=True, help="the parquet file to write")
    p.add_argument("--tokens", type=int, required=True, help="scored tokens per step")
    p.add_argument("--step", default=None, help="S, S1,S2 or all (default: the latest)")
    p.add_argument("--sources", default=None, help="evaluation domains, comma-separated")
    p.add_argument("--batch_size", type=int, default=0, help="rows per batch (0: the run's)")
    args = p.parse_args(argv)
    try:
        steps = parse_steps(args.step, checkpoint_steps(args.workdir))
        sources = [x for x in args.sources.split(",") if x] if args.sources else None
        rows = write_trace(
            args.workdir,
            args.out,
            tokens=args.tokens,
            steps=steps,
            sources=sources,
            batch_size=args.batch_size,
        )
    except (TraceError, CheckpointError, ConfigError, DataError) as e:
        print(f"moejax.analysis.trace: error: {e}", file=sys.stderr)
        return 1
    print(f"trace: {rows} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
