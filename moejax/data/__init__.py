"""moejax input data: an offline multi-domain corpus and a resumable packed-batch pipeline.

cfg = DataConfig.from_mapping(config.data)
batches = make_batches(cfg, cfg.train_split)   # this process's share of each batch
batch = next(batches)                          # dict of NumPy arrays [B, seq_len]
state = batches.get_state()                    # JSON; save it with the checkpoint

`data.dataset` selects an entry of `DATASETS` (datasets.py), or any other tfds dataset
prepared in `data.data_dir`.

tok = load_tokenizer("hf:DIR")                 # data.tokenizer: byte, sentencepiece:, hf:
Train a sub-word vocabulary with `python -m moejax.data.tokenizer_train` (`train_tokenizer`;
not imported here, so `python -m` runs it without a double import).
`parse_sources("parquet:/d/web-*.parquet@0.7,corpus@0.3")` reads a `data.sources` list
(source_spec.py) and `open_source(spec, "train" | "eval", ...)` gives one item's documents
by index (document_sources.py: corpus, tfds, parquet, jsonl, hf_disk, array_record).
"""

from moejax.data.config import DataConfig, default_data_dir
from moejax.data.corpus_builder import MoejaxCorpus, build_corpus
from moejax.data.corpus_sources import DOMAIN_IDS, DOMAINS, Document, collect_documents
from moejax.data.datasets import (
    DATASETS,
    Batches,
    Dataset,
    check_split,
    dataset_for,
    describe,
    make_batches,
    open_split,
)
from moejax.data.document_sources import open_source
from moejax.data.errors import DataError
from moejax.data.packing import PAD_DOMAIN, PackedRows, pack_documents
from moejax.data.pipeline import PackedBatches
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
    "DATASETS",
    "Dataset",
    "DOMAINS",
    "DOMAIN_IDS",
    "DataConfig",
    "DataError",
    "Document",
    "EOS_ID",
    "ByteTokenizer",
    "HFTokenizer",
    "MoejaxCorpus",
    "PAD_DOMAIN",
    "PAD_ID",
    "PackedBatches",
    "PackedRows",
    "SentencePieceTokenizer",
    "Tokenizer",
    "SourceSpec",
    "VOCAB_SIZE",
    "build_corpus",
    "check_split",
    "collect_documents",
    "dataset_for",
    "default_data_dir",
    "describe",
    "load_tokenizer",
    "make_batches",
    "open_source",
    "open_split",
    "pack_documents",
    "parse_sources",
    "split_documents",
]
