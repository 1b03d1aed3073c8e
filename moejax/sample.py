r"""Sample text from a run: `python -m moejax.sample --workdir=W --prompt="def "`.

Reads checkpoint `--step` (default: the latest) of the run with `moejax.load_run`, encodes the
prompt with the run's tokenizer (BOS first, no EOS), decodes with the key/value cache of
`moejax.generate` and prints the prompt followed by the continuation, once per sample,
stopping a sample at the tokenizer's EOS. Greedy by default (`--temperature=0`); with
`--temperature > 0` it samples from softmax(logits / temperature), restricted to the nucleus
of probability `--top_p` (Holtzman et al., 2020), seeded by `--seed`.

    python -m moejax.sample --workdir=runs/deepseekmoe --prompt="def " --max_new_tokens=100
    python -m moejax.sample --workdir=runs/deepseekmoe --prompt="The " --temperature=0.8 \
        --top_p=0.95 --num_samples=3 --seed=1

Exit status 1 with one line on stderr when the workdir, checkpoint or config is unusable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import numpy as np

from moejax.config_section import ConfigError
from moejax.data import DataError, Tokenizer
from moejax.generate import generate
from moejax.train.checkpoint import CheckpointError
from moejax.train.run_loader import load_run


def continuation_ids(tokens: np.ndarray, prompt_len: int, eos_id: int) -> np.ndarray:
    """The generated ids of one row of `generate`'s output, cut before the first EOS."""
    new = np.asarray(tokens[prompt_len:])
    stops = np.nonzero(new == eos_id)[0] if eos_id >= 0 else []
    return new[: stops[0]] if len(stops) else new


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
) -> list[str]:
    """The prompt followed by each sample's continuation."""
    ids = np.asarray(tokenizer.encode(prompt, add_bos=True, add_eos=False), np.int32)
    prompts = np.broadcast_to(ids, (num_samples, len(ids)))
    tokens = generate(
        model,
        variables,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        rng=jax.random.PRNGKey(seed),
        eos_id=tokenizer.eos_id,
    )
    tokens = np.asarray(jax.device_get(tokens))
    return [
        prompt + tokenizer.decode(continuation_ids(row, len(ids), tokenizer.eos_id))
        for row in tokens
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moejax.sample",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--workdir", required=True, help="a run directory (python -m moejax.train)")
    p.add_argument("--prompt", default="", help="text to continue (after BOS)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass, in (0, 1]")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num_samples={args.num_samples} must be >= 1.")
        model, variables, _, tokenizer = load_run(args.workdir, args.step)
        texts = sample_texts(
            model,
            variables,
            tokenizer,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            num_samples=args.num_samples,
            seed=args.seed,
        )
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"moejax.sample: error: {e}", file=sys.stderr)
        return 1
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
