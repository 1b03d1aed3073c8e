"""moejax input data: an offline multi-domain corpus and a resumable packed-batch pipeline.

cfg = DataConfig.from_mapping(config.data)
batches = make_batches(cfg, cfg.train_split)   # this process's share of each batch
batch = next(batches)                          # dict of NumPy arrays [B, seq_len]
state = batches.get_state()                    # JSON; save it with the checkpoint
"""

from moejax.data.config import DataConfig, default_data_dir
from moejax.data.corpus_builder import MoejaxCorpus, build_corpus
from moejax.data.errors import DataError
from moejax.data.packing import PAD_DOMAIN, PackedRows, pack_documents
from moejax.data.pipeline import PackedBatches, make_batches
from moejax.data.reader import describe, open_split
from moejax.data.sources import DOMAIN_IDS, DOMAINS, Document, collect_documents
from moejax.data.splits import split_documents
from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BOS_ID",
    "DOMAINS",
    "DOMAIN_IDS",
    "DataConfig",
    "DataError",
    "Document",
    "EOS_ID",
    "ByteTokenizer",
    "MoejaxCorpus",
    "PAD_DOMAIN",
    "PAD_ID",
    "PackedBatches",
    "PackedRows",
    "VOCAB_SIZE",
    "build_corpus",
    "collect_documents",
    "default_data_dir",
    "describe",
    "make_batches",
    "open_split",
    "pack_documents",
    "split_documents",
]
