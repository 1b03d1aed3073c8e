"""Training a sub-word vocabulary for `data.tokenizer`: byte-level BPE or SentencePiece BPE
(`train_tokenizer`; the command line is `tokenizer_train.py`).

kind "bpe": byte-level BPE with the Hugging Face `tokenizers` library (BPE: Sennrich et al.
2016; byte-level, over GPT-2's 256-character byte alphabet: Radford et al. 2019). Specials
"<pad>"=0, "<s>"=1, "</s>"=2; no prefix space, so every text's bytes are counted exactly.
Writes DIR/tokenizer.json (and a tokenizer_config.json naming the specials); the spec is
"hf:DIR". BPE stops when no pair is left to merge, so the vocabulary can be smaller than
`vocab_size` on a small corpus: set `model.vocab_size` from what the CLI prints.

kind "sentencepiece": SentencePiece (Kudo & Richardson 2018) in BPE mode with pad=0, BOS=1,
EOS=2, unk=3 and byte fallback (a character outside the vocabulary becomes its UTF-8 bytes,
so nothing is unknown). Trained losslessly: identity normalization, whitespace kept as is,
and no dummy prefix (`add_dummy_prefix=False`), so `decode(encode(t)) == t` and
`token_bytes` counts exactly the text's bytes. Writes DIR/sp.model; the spec is
"sentencepiece:DIR/sp.model". Its vocabulary has exactly `vocab_size` pieces.

Both are deterministic: the same texts give the same vocabulary.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Iterator

from moejax.data.errors import DataError
from moejax.paths import as_path, join, resolve, write_text

KINDS = ("bpe", "sentencepiece")
BPE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
BPE_MIN_VOCAB = len(BPE_SPECIALS) + 256  # the specials and the byte alphabet
SP_MIN_VOCAB = 4 + 256 + 1  # pad, bos, eos, unk, the 256 byte pieces, at least one character
SP_CHUNK_CHARS = 2000  # texts are cut into sentences of at most this many characters ...
SP_MAX_SENTENCE_BYTES = 4 * SP_CHUNK_CHARS  # ... which SentencePiece keeps (it skips longer)


def train_tokenizer(texts: Iterable[str], *, kind: str, vocab_size: int, out_dir: str) -> str:
    """Trains a `kind` vocabulary of (at most) `vocab_size` ids on `texts` into `out_dir`.

    Returns the spec to put in `data.tokenizer` (see the module docstring for each kind),
    with `out_dir` made absolute.
    """
    if kind not in KINDS:
        raise DataError(f"--kind={kind!r} is not one of {', '.join(KINDS)}.")
    out_dir = resolve(out_dir)  # the spec works from any directory (or host: a gs:// URL)
    as_path(out_dir).mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        return _train_bpe(texts, vocab_size, out_dir)
    return _train_sentencepiece(texts, vocab_size, out_dir)


def _train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> str:
    """Byte-level BPE with `tokenizers`; writes tokenizer.json and tokenizer_config.json."""
    if vocab_size < BPE_MIN_VOCAB:
        raise DataError(
            f"--vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
            f"{BPE_MIN_VOCAB} (3 specials and 256 bytes) plus the merges to learn."
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    write_text(join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    pad, bos, eos = BPE_SPECIALS
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # so transformers loads it too
    write_text(join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2))
    return f"hf:{out_dir}"


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str) -> str:
    """Lossless SentencePiece BPE with byte fallback; writes sp.model."""
    if vocab_size < SP_MIN_VOCAB:
        raise DataError(
            f"--vocab_size={vocab_size} is too small for SentencePiece: it needs at least "
            f"{SP_MIN_VOCAB} (4 specials, 256 byte pieces) plus the corpus's characters."
        )
    import sentencepiece

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts, SP_CHUNK_CHARS),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            byte_fallback=True,
            max_sentence_length=SP_MAX_SENTENCE_BYTES,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            shuffle_input_sentence=False,
            num_threads=1,  # one thread: the same vocabulary every time
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        raise DataError(
            f"SentencePiece could not train --vocab_size={vocab_size} ({e}); change "
            "--vocab_size (above the corpus's distinct characters, below what it can merge)."
        ) from e
    path = join(out_dir, "sp.model")
    as_path(path).write_bytes(model.getvalue())
    return f"sentencepiece:{path}"


def _chunks(texts: Iterable[str], size: int) -> Iterator[str]:
    """Each text in pieces of at most `size` characters, cut after a newline, else before a
    space, else anywhere (so few words are split in two)."""
    for text in texts:
        while len(text) > size:
            cut = text.rfind("\n", 0, size) + 1 or max(text.rfind(" ", 1, size), 0) or size
            yield text[:cut]
            text = text[cut:]
        if text:
            yield text


def capped(texts: Iterable[str], max_bytes: int, log_every: float = 10.0) -> Iterator[str]:
    """`texts` until `max_bytes` UTF-8 bytes: the text that crosses the cap is cut to fit (at
    a character boundary) and is the last one.

    Prints the bytes read every `log_every` seconds and at the end.
    """
    read, start, last = 0, time.time(), time.time()
    for text in texts:
        data = text.encode("utf-8")
        full = read + len(data) >= max_bytes
        if read + len(data) > max_bytes:
            text = data[: max_bytes - read].decode("utf-8", errors="ignore")
            data = text.encode("utf-8")
        read += len(data)
        if text:
            yield text
        if full:
            break
        if time.time() - last > log_every:
            last = time.time()
            print(f"read {read:,} bytes in {last - start:.0f}s", flush=True)
    print(f"read {read:,} bytes in {time.time() - start:.0f}s (cap {max_bytes:,})", flush=True)
