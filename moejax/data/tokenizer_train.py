"""`python -m moejax.data.tokenizer_train`: trains a sub-word vocabulary on `--sources`.

    python -m moejax.data.tokenizer_train --sources=SPEC --vocab_size=N --out=DIR \\
        [--kind=bpe|sentencepiece] [--max_bytes=50000000] [--data_dir=...] [--text_key=text]

`--sources` is a `data.sources` list (source_spec.py); the training role of every source is
read in order until `--max_bytes`. The kinds are described in `tokenizer_training.py`. It
prints progress and the `--config.data.tokenizer` / `--config.model.vocab_size` flags to use.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

from absl import app, flags

from moejax.data import document_sources
from moejax.data.config import default_data_dir
from moejax.data.errors import DataError
from moejax.data.tokenizer import load_tokenizer
from moejax.data.tokenizer_training import KINDS, capped, train_tokenizer


def run_cli(
    texts: Iterable[str], *, kind: str, vocab_size: int, out_dir: str, max_bytes: int
) -> str:
    """The CLI's work on `texts`: trains, prints the flags to use, returns the spec."""
    if max_bytes <= 0:
        raise DataError(f"--max_bytes={max_bytes} must be positive.")
    start = time.time()
    spec = train_tokenizer(
        capped(texts, max_bytes), kind=kind, vocab_size=vocab_size, out_dir=out_dir
    )
    size = load_tokenizer(spec).vocab_size  # and the files load
    print(f"trained {kind} in {time.time() - start:.0f}s: {size} ids written to {out_dir}")
    print(f"use: --config.data.tokenizer={spec} --config.model.vocab_size={size}")
    return spec


def source_texts(sources: str, *, data_dir: str, text_key: str) -> Iterator[str]:
    """The training texts of `--sources`, source after source."""
    return document_sources.iter_texts(sources, data_dir=data_dir, text_key=text_key)


def main(argv: Sequence[str]) -> None:
    """`python -m moejax.data.tokenizer_train` (flags in the module docstring)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    data_dir = f.data_dir or default_data_dir()
    texts = source_texts(f.sources, data_dir=data_dir, text_key=f.text_key)
    run_cli(texts, kind=f.kind, vocab_size=f.vocab_size, out_dir=f.out, max_bytes=f.max_bytes)


if __name__ == "__main__":  # flags defined only when run, so importing defines none
    flags.DEFINE_string("sources", None, "Document sources to read the texts from.")
    flags.DEFINE_integer("vocab_size", None, "Number of ids to train (BPE: at most).")
    flags.DEFINE_string("out", None, "Directory to write the tokenizer files into.")
    flags.DEFINE_enum("kind", "bpe", list(KINDS), "bpe (byte-level) or sentencepiece.")
    flags.DEFINE_integer("max_bytes", 50_000_000, "Stop reading texts after this many bytes.")
    flags.DEFINE_string("data_dir", None, "Data directory (default: default_data_dir()).")
    flags.DEFINE_string("text_key", "text", "The text field of each document.")
    flags.mark_flags_as_required(["sources", "vocab_size", "out"])
    app.run(main)
