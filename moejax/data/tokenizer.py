"""Tokenizers behind one interface (`Tokenizer`), chosen by `data.tokenizer` (`load_tokenizer`).

`"byte"` (the default) is `ByteTokenizer` below; `"sentencepiece:PATH"` and `"hf:PATH"` are the
sub-word tokenizers of `moejax.data.subword_tokenizers` (SentencePiece, Kudo & Richardson 2018;
Hugging Face `tokenizers`, e.g. byte-level BPE, Radford et al. 2019 / Sennrich et al. 2016).
Train one with `python -m moejax.data.tokenizer_train`.

Byte-level tokenizer: every UTF-8 byte is a token, plus three special ids.

Why bytes: the corpus mixes Python source, English prose and arithmetic, and a byte
vocabulary needs no training, no files and no download, never produces an unknown
token, and makes a token count equal to a byte count (so corpus sizes in bytes are
token budgets). The cost is ~4x longer sequences than a BPE vocabulary.

Layout of the 259 ids::

    0 = PAD   padding; never a target (loss_mask is 0 there)
    1 = BOS   first token of every document
    2 = EOS   last token of every document
    3 + b     the byte b, for b in 0..255
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from moejax.data.errors import DataError
from moejax.data.subword_tokenizers import HFTokenizer, SentencePieceTokenizer, check_ids
from moejax.paths import resolve

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = BYTE_OFFSET + 256

KINDS = ("byte", "sentencepiece:PATH", "hf:PATH")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, evaluation and sampling need of a tokenizer.

    `token_bytes[i]` is the number of UTF-8 bytes id `i` decodes to (0 for special and
    control ids), so a document's byte count is `token_bytes[ids].sum()` and bits per byte
    is `summed_loss / ln(2) / token_bytes[targets].sum()` whatever the vocabulary.
    `files()` lists the files that define the tokenizer (copy them next to a run).
    """

    spec: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    token_bytes: np.ndarray

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """int32[n] ids of `text`, optionally framed by BOS/EOS."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`, skipping special ids; ids outside the vocabulary raise."""
        ...

    def files(self) -> list[str]:
        """The files that define this tokenizer ([] when none)."""
        ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Maps text to int32 ids (`byte + 3`) and back; stateless, so freely shared."""

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    token_bytes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    """int32[259]: 0 for the three specials, 1 for each byte id (read-only)."""

    def __post_init__(self):
        sizes = np.zeros(VOCAB_SIZE, np.int32)
        sizes[BYTE_OFFSET:] = 1
        sizes.setflags(write=False)
        object.__setattr__(self, "token_bytes", sizes)  # frozen: set once, here

    @property
    def spec(self) -> str:
        """`"byte"`: the `data.tokenizer` value that loads this tokenizer."""
        return "byte"

    def files(self) -> list[str]:
        """No files define a byte tokenizer."""
        return []

    @property
    def vocab_size(self) -> int:
        """259: three specials plus 256 byte values."""
        return VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Returns int32[n] ids of the UTF-8 bytes of `text`, optionally framed by BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(
                f"ByteTokenizer.encode expects str, got {type(text).__name__}; "
                "use encode_bytes for raw bytes."
            )
        return self.encode_bytes(text.encode("utf-8"), add_bos=add_bos, add_eos=add_eos)

    def encode_bytes(self, data: bytes, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Like `encode` for already-encoded bytes (what tfds Text features return).

        Skips a decode/encode round trip in the input pipeline's hot loop.
        """
        body = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        if not head and not tail:
            return body
        return np.concatenate([np.asarray(head, np.int32), body, np.asarray(tail, np.int32)])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of the byte ids in `ids`, skipping PAD/BOS/EOS.

        Invalid UTF-8 (e.g. a sequence cut inside a multi-byte character) becomes U+FFFD
        rather than raising, because model samples are not guaranteed to be valid UTF-8.
        Ids outside [0, 259) are a bug upstream (e.g. a vocabulary padded for speed and
        sampled without masking) and raise.
        """
        arr = check_ids(ids, VOCAB_SIZE, "ByteTokenizer")
        data = (arr[arr >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


def load_tokenizer(spec: str, *, pad_id: int = -1) -> Tokenizer:
    """The tokenizer named by `spec` (the value of `data.tokenizer`).

    `spec` is one of
        "byte"                 `ByteTokenizer` (259 ids, no files)
        "sentencepiece:PATH"   a SentencePiece `.model` file
        "hf:PATH"              a Hugging Face `tokenizer.json`, or a directory holding one
                               (e.g. a checkpoint directory; its tokenizer_config.json, if
                               any, names the BOS/EOS/PAD tokens)

    `pad_id` is used only when the tokenizer has no pad id of its own; -1 means "use its EOS
    id". Padding is always masked out of the loss (`loss_mask` is 0 there), so which id
    pads does not change training; but the pad id is then not text (`decode` skips it, its
    `token_bytes` is 0), so name an id that is not text. A sub-word tokenizer without a BOS
    token but with an EOS token uses EOS as BOS too, as GPT-2-style models do. Every failure
    raises `DataError` naming `data.tokenizer`.
    """
    if not isinstance(spec, str):
        raise DataError(f"data.tokenizer must be a string, got {spec!r}; {_usage()}")
    kind, sep, path = spec.strip().partition(":")
    if kind == "byte":
        if sep:
            raise DataError(f"data.tokenizer={spec!r}: 'byte' takes no path; {_usage()}")
        return ByteTokenizer()
    if kind not in ("sentencepiece", "hf"):
        raise DataError(f"data.tokenizer={spec!r}: unknown tokenizer kind {kind!r}; {_usage()}")
    if not path:
        raise DataError(f"data.tokenizer={spec!r} names no file; {_usage()}")
    path = resolve(path)  # `~` expanded; gs:// kept
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, pad_id=pad_id)
    return HFTokenizer(path, pad_id=pad_id)


def _usage() -> str:
    return (
        f"set --config.data.tokenizer to one of {', '.join(KINDS)} "
        "(train one with python -m moejax.data.tokenizer_train)."
    )
