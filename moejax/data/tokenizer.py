"""Byte-level tokenizer: every UTF-8 byte is a token, plus three special ids.

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

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = BYTE_OFFSET + 256


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Maps text to int32 ids (`byte + 3`) and back; stateless, so freely shared."""

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

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
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = arr[(arr < 0) | (arr >= VOCAB_SIZE)]
        if bad.size:
            raise ValueError(
                f"ByteTokenizer.decode got ids outside [0, {VOCAB_SIZE}): {bad[:8].tolist()}; "
                "mask logits beyond the tokenizer's vocab_size before sampling."
            )
        data = (arr[arr >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")
