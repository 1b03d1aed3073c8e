"""A byte-level BPE tokenizer of the offline corpus, trained on first use.

`data.tokenizer=corpus_bpe:N` names a BPE vocabulary of at most N ids (byte-level BPE:
Sennrich et al. 2016, with GPT-2's byte alphabet, Radford et al. 2019) trained with
`tokenizer_train.train_tokenizer` on the training split of the offline corpus of
`data.max_bytes_per_domain`, so experiments here use realistic sub-word tokens without a
download. It is built once per data dir, like the corpus: under a file lock (concurrent
processes wait for the first), written to a temporary directory and renamed into place, so
an interrupted build leaves nothing that looks finished.

    data_dir/moejax_tokenizers/corpus_bpe_<N>_<corpus variant>/tokenizer.json
"""

from __future__ import annotations

import os
import shutil
import time

from moejax.data import corpus_builder
from moejax.data.tokenizer_training import train_tokenizer

CORPUS_BPE = "corpus_bpe"


def corpus_tokenizer_dir(data_dir: str, max_bytes_per_domain: int, vocab_size: int) -> str:
    """Where the corpus tokenizer of `vocab_size` ids lives under `data_dir`."""
    variant = f"domain_bytes_{max_bytes_per_domain}"
    return os.path.join(data_dir, "moejax_tokenizers", f"{CORPUS_BPE}_{vocab_size}_{variant}")


def parse_vocab_size(spec: str) -> int:
    """N of `corpus_bpe:N`; ValueError naming data.tokenizer otherwise."""
    _, _, size = spec.partition(":")
    if not size.isdigit() or int(size) < 300:
        raise ValueError(
            f"data.tokenizer={spec!r}: write {CORPUS_BPE}:N with N >= 300 ids (the 256 byte "
            f"symbols, the specials and some merges), e.g. {CORPUS_BPE}:4096."
        )
    return int(size)


def build_corpus_tokenizer(data_dir: str, max_bytes_per_domain: int, vocab_size: int) -> str:
    """The `hf:DIR` spec of the corpus tokenizer, trained first if it is not there yet."""
    target = corpus_tokenizer_dir(data_dir, max_bytes_per_domain, vocab_size)
    spec = f"hf:{target}"
    if os.path.isfile(os.path.join(target, "tokenizer.json")):
        return spec
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with corpus_builder.file_lock(target + ".lock"):
        if os.path.isfile(os.path.join(target, "tokenizer.json")):
            return spec  # built while we waited
        start = time.perf_counter()
        builder = corpus_builder.build_corpus(data_dir, max_bytes_per_domain)
        split = builder.as_data_source(split="train")
        texts = (split[i]["text"].decode("utf-8") for i in range(len(split)))
        partial = f"{target}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        train_tokenizer(texts, kind="bpe", vocab_size=vocab_size, out_dir=partial)
        os.replace(partial, target)
        print(
            f"{CORPUS_BPE}:{vocab_size}: trained on the corpus in "
            f"{time.perf_counter() - start:.1f} s -> {target}",
            flush=True,
        )
    return spec
