"""moejax input data: tokenizers, document sources, weighted mixtures and the grain pipeline.

cfg = DataConfig.from_mapping(config.data)
batches = make_batches(cfg, cfg.train_split)   # this process's share of each batch
batch = next(batches)                          # dict of NumPy arrays [B, seq_len]
state = batches.get_state()                    # JSON; save it with the checkpoint

`data.sources` is a comma-separated mixture `KIND:WHERE[#FIELD][@WEIGHT]`:
`parse_sources("parquet:/d/web-*.parquet@0.7,corpus@0.3")` reads it (source_spec.py) and
`open_source(spec, "train" | "eval", ...)` gives one item's documents by index
(document_sources.py: corpus, tfds, parquet, jsonl, hf_disk, array_record). The pipeline that
mixes, shuffles, packs and checkpoints them is pipeline.py (grain).

`data.tokenizer` is `byte`, `sentencepiece:PATH`, `hf:PATH` (tokenizer.py) or
`corpus_bpe:N` (corpus_tokenizer.py, trained on first use): `load_tokenizer("hf:DIR")`.
Train a sub-word vocabulary with `python -m moejax.data.tokenizer_train`
(`tokenizer_training.train_tokenizer`).
"""

from moejax.data import corpus_builder
from moejax.data.config import DataConfig, default_data_dir
from moejax.data.corpus_builder import build_corpus
from moejax.data.corpus_sources import DOMAIN_IDS, DOMAINS, Document, collect_documents
from moejax.data.datasets import (
    Batches,
    check_evaluation_sources,
    describe,
    domain_names,
    evaluation_batches,
    make_batches,
    open_tokenizer,
    training_batches,
)
from moejax.data.document_sources import open_source
from moejax.data.errors import DataError
from moejax.data.model_batch import PAD_DOMAIN, padding_batch
from moejax.data.pipeline import DataStateWarning
from moejax.data.source_spec import SourceSpec, parse_sources
from moejax.data.splits import split_documents
from moejax.data.subword_tokenizers import HFTokenizer, SentencePieceTokenizer
from moejax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "BOS_ID",
    "Batches",
    "ByteTokenizer",
    "DOMAINS",
    "DOMAIN_IDS",
    "DataConfig",
    "DataError",
    "DataStateWarning",
    "Document",
    "EOS_ID",
    "HFTokenizer",
    "MoejaxCorpus",
    "PAD_DOMAIN",
    "PAD_ID",
    "SentencePieceTokenizer",
    "SourceSpec",
    "Tokenizer",
    "VOCAB_SIZE",
    "build_corpus",
    "check_evaluation_sources",
    "collect_documents",
    "default_data_dir",
    "describe",
    "domain_names",
    "evaluation_batches",
    "load_tokenizer",
    "make_batches",
    "open_source",
    "open_tokenizer",
    "padding_batch",
    "parse_sources",
    "split_documents",
    "training_batches",
]


def __getattr__(name: str):
    """`MoejaxCorpus`, defined (and tensorflow-datasets imported) on first access
    (`corpus_builder._tfds`): the rest of moejax imports without tfds."""
    if name == "MoejaxCorpus":
        return corpus_builder.MoejaxCorpus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
