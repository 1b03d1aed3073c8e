r"""Sample text from a run: `python -m moejax.sample --workdir=W --prompt="def "`.

Reads checkpoint `--step` (default: the latest) of the run with `moejax.load_run` (or, with
`--hf=DIR` instead of `--workdir`, a Hugging Face checkpoint directory through
`moejax.hf.from_pretrained`, its tokenizer `hf:DIR` when the directory holds one, else
`--tokenizer`), encodes the prompt with the run's tokenizer (BOS first, no EOS), decodes
with the key/value cache of `moejax.generate` and prints the prompt followed by the
continuation, once per sample, stopping a sample at the tokenizer's EOS. Greedy by default
(`--temperature=0`); with `--temperature > 0` it samples from softmax(logits / temperature),
restricted to the nucleus of probability `--top_p` (Holtzman et al., 2020), seeded by
`--seed`.

    python -m moejax.sample --workdir=runs/deepseekmoe --prompt="def " --max_new_tokens=100
    python -m moejax.sample --workdir=runs/deepseekmoe --prompt="The " --temperature=0.8 \
        --top_p=0.95 --num_samples=3 --seed=1

Decoding-time routing (`--routing`, all through the `router_delta` collection, see
`moejax.generate`): `scmoe` (self-contrast of the top-k pass with the rank-`--scmoe_rank`
pass, `--scmoe_alpha`, `--scmoe_beta`), `rewire` (the routing-logit delta of
`--rewire_layers` updated every `--rewire_every` tokens by `--rewire_steps` steps of
`--rewire_optimizer` at rate `--rewire_lr` on the text so far) and `c3po` (the delta of the
last `--c3po_layers` MoE layers, `--c3po_core_experts` experts each, optimised for
`--c3po_steps` steps on the `--c3po_k` nearest of the `--c3po_references`, a JSON-lines
file of {"prompt": ..., "output": ...}). The method's one-line report goes to stderr.

    python -m moejax.sample --workdir=W --prompt="def " --routing=scmoe --scmoe_rank=2
    python -m moejax.sample --hf=/path/to/OLMoE --prompt="def " --routing=rewire
    python -m moejax.sample --workdir=W --prompt="2+2=" --routing=c3po \
        --c3po_references=refs.jsonl --c3po_k=3

Exit status 1 with one line on stderr when the workdir, checkpoint, config or a flag is
unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax
import numpy as np

from moejax.config_section import ConfigError
from moejax.data import DataError, Tokenizer, load_tokenizer
from moejax.generate import generate
from moejax.generate.c3po import Reference, c3po_generate
from moejax.generate.rewire import OPTIMIZERS, rewire_generate
from moejax.generate.scmoe import scmoe_generate
from moejax.hf import from_pretrained
from moejax.paths import as_path
from moejax.train.checkpoint import CheckpointError
from moejax.train.run_loader import load_run


def continuation_ids(tokens: np.ndarray, prompt_len: int, eos_id: int) -> np.ndarray:
    """The generated ids of one row of `generate`'s output, cut before the first EOS."""
    new = np.asarray(tokens[prompt_len:])
    stops = np.nonzero(new == eos_id)[0] if eos_id >= 0 else []
    return new[: stops[0]] if len(stops) else new


ROUTINGS = ("none", "scmoe", "rewire", "c3po")


def _layers(text: str) -> list[int] | None:
    """`--rewire_layers`: comma-separated MoE-layer indices; "" = all."""
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--rewire_layers={text!r} must be comma-separated MoE-layer indices, e.g. -2,-1."
        ) from None


def read_references(path: str, tokenizer: Tokenizer) -> list[Reference]:
    """`--c3po_references`: one JSON object {"prompt": text, "output": text} per line, the
    prompt encoded as `sample_texts` encodes its own (BOS first), the output without BOS."""
    refs = []
    for n, line in enumerate(as_path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, output = row["prompt"], row["output"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f'--c3po_references={path} line {n} is not a JSON object with a "prompt" and '
                f'an "output" string.'
            ) from None
        refs.append(
            Reference(
                tokenizer.encode(prompt, add_bos=True, add_eos=False),
                tokenizer.encode(output, add_bos=False, add_eos=False),
            )
        )
    return refs


def decode_tokens(
    model, variables, prompts: np.ndarray, max_new_tokens: int, routing: str, options: dict, **kw
) -> tuple[np.ndarray, str]:
    """`[N, P]` prompts -> (`[N, P + n]` tokens, the routing method's one-line report)."""
    if routing == "none":
        return generate(model, variables, prompts, max_new_tokens, **kw), ""
    if routing == "scmoe":
        tokens = scmoe_generate(model, variables, prompts, max_new_tokens, **options, **kw)
        return tokens, f"scmoe: rank {options['rank']} contrasted, beta {options['beta']}"
    if routing == "rewire":
        tokens, _, losses = rewire_generate(
            model, variables, prompts, max_new_tokens, **options, **kw
        )
        shown = ", ".join(f"{x:.4f}" for x in losses)
        return tokens, f"rewire: {len(losses)} adaptations, loss before each: {shown}"
    references = options.pop("references")
    tokens, _, report = c3po_generate(
        model, variables, prompts[0], references, max_new_tokens,
        num_samples=len(prompts), **options, **kw,
    )  # fmt: skip
    return tokens, (
        f"c3po: neighbours {report.neighbours.tolist()} (cosine "
        f"{', '.join(f'{s:.3f}' for s in report.similarities)}), neighbour loss "
        f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}"
    )


def sample_texts(
    model,
    variables,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    routing: str = "none",
    options: dict | None = None,
) -> tuple[list[str], str]:
    """The prompt followed by each sample's continuation, and the routing method's report
    ("" without one); `options`: the keyword arguments of the method (`decode_tokens`)."""
    ids = np.asarray(tokenizer.encode(prompt, add_bos=True, add_eos=False), np.int32)
    prompts = np.broadcast_to(ids, (num_samples, len(ids)))
    tokens, report = decode_tokens(
        model, variables, prompts, max_new_tokens, routing, dict(options or {}),
        temperature=temperature, top_p=top_p, rng=jax.random.PRNGKey(seed),
        eos_id=tokenizer.eos_id,
    )  # fmt: skip
    tokens = np.asarray(jax.device_get(tokens))
    texts = [
        prompt + tokenizer.decode(continuation_ids(row, len(ids), tokenizer.eos_id))
        for row in tokens
    ]
    return texts, report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moejax.sample",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run directory (python -m moejax.train)")
    source.add_argument("--hf", help="a Hugging Face checkpoint directory (moejax.hf)")
    p.add_argument("--tokenizer", default="", help="with --hf: data.tokenizer spec")
    p.add_argument("--prompt", default="", help="text to continue (after BOS)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass, in (0, 1]")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--routing", default="none", choices=ROUTINGS, help="decoding-time routing")
    p.add_argument("--scmoe_rank", type=int, default=2, help="weak pass: the k-th choice")
    p.add_argument("--scmoe_alpha", type=float, default=0.1, help="plausibility threshold")
    p.add_argument("--scmoe_beta", type=float, default=0.5, help="contrast strength")
    p.add_argument("--rewire_every", type=int, default=8, help="tokens between adaptations")
    p.add_argument("--rewire_steps", type=int, default=1, help="steps per adaptation")
    p.add_argument("--rewire_lr", type=float, default=0.1)
    p.add_argument("--rewire_optimizer", default="sgd", choices=sorted(OPTIMIZERS))
    p.add_argument("--rewire_layers", default="", help="MoE layers, e.g. -2,-1 (default: all)")
    p.add_argument("--c3po_references", default="", help="JSON lines of prompt and output")
    p.add_argument("--c3po_k", type=int, default=3, help="neighbours")
    p.add_argument("--c3po_width", type=float, default=1.0, help="Gaussian kernel width")
    p.add_argument("--c3po_layers", type=int, default=5, help="critical (last) MoE layers")
    p.add_argument("--c3po_core_experts", type=int, default=0, help="per layer; 0: all")
    p.add_argument("--c3po_steps", type=int, default=10)
    p.add_argument("--c3po_lr", type=float, default=0.1)
    return p


def routing_options(args, tokenizer: Tokenizer) -> dict:
    """The keyword arguments of `args.routing`'s method, from its flags."""
    if args.routing == "scmoe":
        return dict(rank=args.scmoe_rank, alpha=args.scmoe_alpha, beta=args.scmoe_beta)
    if args.routing == "rewire":
        return dict(
            every=args.rewire_every,
            steps=args.rewire_steps,
            lr=args.rewire_lr,
            optimizer=args.rewire_optimizer,
            layers=_layers(args.rewire_layers),
        )
    if args.routing == "c3po":
        if not args.c3po_references:
            raise ValueError("--routing=c3po needs --c3po_references=FILE.jsonl.")
        return dict(
            references=read_references(args.c3po_references, tokenizer),
            k=args.c3po_k,
            width=args.c3po_width,
            critical_layers=args.c3po_layers,
            core_experts=args.c3po_core_experts,
            steps=args.c3po_steps,
            lr=args.c3po_lr,
        )
    return {}


def load_model(args):
    """(model, variables, tokenizer) of `--workdir` or `--hf`."""
    if args.workdir:
        model, variables, _, tokenizer = load_run(args.workdir, args.step)
        return model, variables, tokenizer
    spec = args.tokenizer
    if not spec:
        has_own = (as_path(args.hf) / "tokenizer.json").exists()
        spec = f"hf:{args.hf}" if has_own else "byte"
    model, variables = from_pretrained(args.hf)
    return model, variables, load_tokenizer(spec)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num_samples={args.num_samples} must be >= 1.")
        if args.routing == "c3po" and not args.c3po_references:
            raise ValueError("--routing=c3po needs --c3po_references=FILE.jsonl.")
        if args.hf and args.step is not None:
            raise ValueError("--step reads a run's checkpoint; --hf has none.")
        _layers(args.rewire_layers)
        model, variables, tokenizer = load_model(args)
        texts, report = sample_texts(
            model,
            variables,
            tokenizer,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            num_samples=args.num_samples,
            seed=args.seed,
            routing=args.routing,
            options=routing_options(args, tokenizer),
        )
    except (CheckpointError, ConfigError, DataError, ValueError, OSError) as e:
        print(f"moejax.sample: error: {e}", file=sys.stderr)
        return 1
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)
    if report:
        print(report, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
