"""Sub-word tokenizers behind `moejax.data.tokenizer.Tokenizer`: SentencePiece and HF `tokenizers`.

`SentencePieceTokenizer` wraps a SentencePiece model (Kudo & Richardson 2018, "SentencePiece:
A simple and language independent subword tokenizer and detokenizer for Neural Text
Processing"; the `sentencepiece` library). `HFTokenizer` wraps a Hugging Face `tokenizer.json`
(the `tokenizers` library): byte-level BPE as in GPT-2 (Radford et al. 2019; BPE: Sennrich
et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"), SentencePiece-style
Metaspace vocabularies converted to tokenizer.json, and WordPiece.

Both encode without the library's own BOS/EOS (`encode` adds ours from `add_bos`/`add_eos`)
and decode skipping special ids. `token_bytes[i]` is the number of UTF-8 bytes id `i` stands
for, so bits per byte can be computed from token ids alone:

    SentencePiece  the piece's text with "▁" (U+2581) counted as the one-byte space it
                   decodes to; a byte-fallback piece "<0xAB>" is 1 byte; control, unknown
                   and unused ids are 0.
    HF byte-level  each character of a token is one byte (GPT-2's bytes-to-unicode table,
                   `gpt2_unicode_to_byte`).
    HF Metaspace   as SentencePiece: "▁" is 1 byte, "<0xAB>" is 1 byte.
    HF WordPiece   the token without its "##" continuation prefix (the spaces WordPiece's
                   decoder puts between words are not counted).
    special ids (BOS, EOS, PAD, added tokens marked special, the unknown token): 0.

BOS, EOS and PAD are never text: `decode` skips them and `token_bytes` is 0 there, so a
`pad_id` argument should name an id that is not text (the default, -1, pads with EOS).

`dummy_prefix_bytes` is what `token_bytes` counts per encoded text beyond the text's own
bytes: 1 for a vocabulary that prepends a space to every text (SentencePiece's
`add_dummy_prefix`, Metaspace's prepend scheme, ByteLevel's `add_prefix_space`), else 0.
`moejax.data.tokenizer_train` trains without such a prefix, so there it is 0.

Every problem with the files raises `DataError` naming `data.tokenizer`. The libraries are
imported when a tokenizer is built, so importing `moejax.data` needs neither.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

from moejax.data.errors import DataError
from moejax.paths import as_path, join, resolve

SPACE_MARK = "\u2581"  # "▁": SentencePiece's (and Metaspace's) visible space
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte-fallback piece: one raw byte
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
EOS_NAMES = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[SEP]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
TRAIN_HINT = (
    "train one with python -m moejax.data.tokenizer_train --sources=... --vocab_size=N --out=DIR"
)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file as a `Tokenizer` (see the module docstring)."""

    def __init__(self, path: str, *, pad_id: int = -1):
        """Loads `path`; `pad_id` is used only when the model has no pad id (-1: EOS)."""
        self.path = resolve(path)  # a local file, or a gs:// object read through epath
        self.spec = f"sentencepiece:{path}"
        self._pad_arg = pad_id
        self._sp = _load_sentencepiece(self.path, self.spec)
        self.vocab_size = int(self._sp.get_piece_size())
        own = [_sp_id(self._sp.bos_id()), _sp_id(self._sp.eos_id()), _sp_id(self._sp.pad_id())]
        self.bos_id, self.eos_id, self.pad_id = _special_ids(
            self.spec, *own, pad_id, self.vocab_size
        )
        self.token_bytes, self._skip = _sp_token_bytes(self._sp)
        self._skip[[self.bos_id, self.eos_id, self.pad_id]] = True
        self.token_bytes[self._skip] = 0
        self.token_bytes.setflags(write=False)
        self.dummy_prefix_bytes = _dummy_prefix_bytes(self)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """int32[n] piece ids of `text` (no SentencePiece BOS/EOS), framed by ours if asked."""
        _check_text(text, type(self).__name__)
        body = self._sp.encode(text, out_type=int)
        return _frame(body, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`, skipping BOS/EOS/PAD and control ids; bad ids raise ValueError."""
        arr = check_ids(ids, self.vocab_size, type(self).__name__)
        return self._sp.decode(arr[~self._skip[arr]].tolist())

    def files(self) -> list[str]:
        """The `.model` file."""
        return [self.path]

    def __reduce__(self):  # rebuilt from the file in another process (e.g. a data worker)
        return functools.partial(type(self), pad_id=self._pad_arg), (self.path,)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (or a directory holding one) as a `Tokenizer`.

    BOS/EOS/PAD come from `tokenizer_config.json` next to tokenizer.json when it names them
    (`bos_token`, `eos_token`, `pad_token`), else from common token names (`BOS_NAMES`,
    `EOS_NAMES`, `PAD_NAMES`). Without a BOS token, EOS doubles as BOS (GPT-2 style).
    """

    def __init__(self, path: str, *, pad_id: int = -1):
        """Loads `path`; `pad_id` is used only when no pad token is found (-1: EOS)."""
        self.path = resolve(path)
        self.spec = f"hf:{path}"
        self._pad_arg = pad_id
        self._file = _tokenizer_json(self.path, self.spec)
        self._tok = _load_hf(self._file, self.spec)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        config_path = as_path(self._file).parent / "tokenizer_config.json"
        self._config_path = str(config_path) if config_path.is_file() else None
        named = _named_specials(self._config_path, self.spec)
        found = [self._find(named.get(role), names) for role, names in _ROLES]
        self.bos_id, self.eos_id, self.pad_id = _special_ids(
            self.spec, *found, pad_id, self.vocab_size
        )
        self._specials = sorted({self.bos_id, self.eos_id, self.pad_id})
        self.token_bytes = _hf_token_bytes(self._tok, self.vocab_size)
        self.token_bytes[self._specials] = 0
        self.token_bytes.setflags(write=False)
        self.dummy_prefix_bytes = _dummy_prefix_bytes(self)

    def _find(self, named: str | None, names: Iterable[str]) -> int | None:
        """The id of the configured token `named`, else of the first of `names` in the vocab."""
        for name in ([named] if named else []) + list(names):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """int32[n] ids of `text` (no post-processor specials), framed by BOS/EOS if asked."""
        _check_text(text, type(self).__name__)
        body = self._tok.encode(text, add_special_tokens=False).ids
        return _frame(body, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`, skipping BOS/EOS/PAD and special tokens; bad ids raise."""
        arr = check_ids(ids, self.vocab_size, type(self).__name__)
        keep = arr[~np.isin(arr, self._specials)]
        return self._tok.decode(keep.tolist(), skip_special_tokens=True)

    def files(self) -> list[str]:
        """tokenizer.json, and tokenizer_config.json when it is next to it."""
        return [self._file] + ([self._config_path] if self._config_path else [])

    def __reduce__(self):  # rebuilt from the file in another process (e.g. a data worker)
        return functools.partial(type(self), pad_id=self._pad_arg), (self.path,)


_ROLES = (("bos_token", BOS_NAMES), ("eos_token", EOS_NAMES), ("pad_token", PAD_NAMES))


def gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode` table (Radford et al. 2019, encoder.py).

    GPT-2 gives every byte a printable character so that byte-level BPE tokens are strings:
    the printable bytes "!".."~", "¡".."¬" and "®".."ÿ" stand for themselves; the other 68
    bytes, in increasing order, become chr(256), chr(257), ... . Built per call (no
    module-level mutable state); callers keep the result.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _sp_token_bytes(sp) -> tuple[np.ndarray, np.ndarray]:
    """(int32 bytes per piece, bool "not text": control and unused ids) of a processor."""
    size = sp.get_piece_size()
    sizes, skip = np.zeros(size, np.int32), np.zeros(size, bool)
    for i in range(size):
        skip[i] = sp.is_control(i) or sp.is_unused(i)
        if not (skip[i] or sp.is_unknown(i)):
            sizes[i] = 1 if sp.is_byte(i) else _piece_bytes(sp.id_to_piece(i))
    return sizes, skip


def _piece_bytes(piece: str) -> int:
    """UTF-8 bytes of a SentencePiece-style piece, "▁" counted as the space it decodes to."""
    return len(piece.replace(SPACE_MARK, " ").encode("utf-8"))


def _hf_token_bytes(tok, vocab_size: int) -> np.ndarray:
    """int32[vocab_size]: the bytes each id of a `tokenizers.Tokenizer` decodes to."""
    config = json.loads(tok.to_str())
    style, prefix = _hf_style(config)
    unk = (config.get("model") or {}).get("unk_token")
    added = tok.get_added_tokens_decoder()
    byte_of = gpt2_unicode_to_byte() if style == "byte_level" else {}
    sizes = np.zeros(vocab_size, np.int32)
    for i in range(vocab_size):
        token = tok.id_to_token(i)
        if token is None or token == unk or (i in added and added[i].special):
            continue
        if i in added:  # a non-special added token is matched and decoded as its raw text
            sizes[i] = len(added[i].content.encode("utf-8"))
        elif style == "byte_level" and all(c in byte_of for c in token):
            sizes[i] = len(token)
        elif style == "metaspace":
            sizes[i] = 1 if BYTE_PIECE.fullmatch(token) else _piece_bytes(token)
        elif style == "wordpiece":
            sizes[i] = len(token.removeprefix(prefix).encode("utf-8"))
        else:
            sizes[i] = len(token.encode("utf-8"))
    return sizes


def _hf_style(config: dict) -> tuple[str, str]:
    """How a tokenizer.json spells bytes: ("byte_level" | "metaspace" | "wordpiece" | "plain",
    the WordPiece continuation prefix)."""
    parts = [config.get(k) for k in ("decoder", "pre_tokenizer", "normalizer")]
    types = set(_types(parts))
    model = config.get("model") or {}
    if "ByteLevel" in types:
        return "byte_level", ""
    if {"Metaspace", "ByteFallback"} & types or SPACE_MARK in json.dumps(parts, ensure_ascii=False):
        return "metaspace", ""
    if "WordPiece" in types or model.get("type") == "WordPiece":
        decoder = config.get("decoder") or {}
        return "wordpiece", decoder.get("prefix", model.get("continuing_subword_prefix", "##"))
    return "plain", ""


def _types(node) -> Iterable[str]:
    """Every "type" value in a nested tokenizer.json component (Sequences included)."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        for value in node.values():
            yield from _types(value)
    elif isinstance(node, list):
        for value in node:
            yield from _types(value)


def _dummy_prefix_bytes(tok) -> int:
    """Bytes `token_bytes` counts per encoded text beyond the text (a prepended space)."""
    probe = "a"
    counted = int(tok.token_bytes[tok.encode(probe, add_bos=False, add_eos=False)].sum())
    return max(0, counted - len(probe))


def _special_ids(
    spec: str, bos: int | None, eos: int | None, pad: int | None, pad_arg: int, vocab_size: int
) -> tuple[int, int, int]:
    """(bos, eos, pad): EOS doubles as a missing BOS; a missing pad is `pad_arg`, or EOS."""
    if eos is None:
        raise DataError(
            f"data.tokenizer={spec!r} has no end-of-sequence token (looked for "
            f"{', '.join(EOS_NAMES)}, or eos_token in tokenizer_config.json); moejax frames "
            f"every document with BOS/EOS: use a tokenizer that has one, or {TRAIN_HINT}."
        )
    if pad is None:
        pad = eos if pad_arg == -1 else pad_arg
    if not 0 <= pad < vocab_size:
        raise DataError(
            f"data.tokenizer={spec!r}: pad id {pad} is outside the vocabulary [0, {vocab_size}); "
            "pass pad_id=-1 (pad with EOS; padding is masked out of the loss) or a valid id."
        )
    return (eos if bos is None else bos), eos, pad


def _sp_id(token_id: int) -> int | None:
    return None if token_id < 0 else int(token_id)


def _missing(spec: str, path: str, what: str) -> DataError:
    return DataError(
        f"data.tokenizer={spec!r}: no {what} at {path}; point --config.data.tokenizer at an "
        f"existing file, or {TRAIN_HINT} (it prints the flag to use)."
    )


def _load_sentencepiece(path: str, spec: str):
    """A `sentencepiece.SentencePieceProcessor` of `path`, or DataError."""
    if not as_path(path).is_file():
        raise _missing(spec, path, "SentencePiece .model file")
    try:
        import sentencepiece
    except ImportError as e:
        raise DataError(
            f"data.tokenizer={spec!r} needs the sentencepiece package: pip install sentencepiece."
        ) from e
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(as_path(path).read_bytes())
    except Exception as e:  # the library raises OSError/RuntimeError for a bad model proto
        raise DataError(
            f"data.tokenizer={spec!r}: {path} is not a SentencePiece model ({e}); point "
            f"--config.data.tokenizer at a .model file, or {TRAIN_HINT}."
        ) from e
    return processor


def _tokenizer_json(path: str, spec: str) -> str:
    """`path` itself, or `path/tokenizer.json` for a directory; DataError if there is none."""
    if as_path(path).is_dir():
        file = join(path, "tokenizer.json")
        if as_path(file).is_file():
            return file
        hint = ""
        if (as_path(path) / "tokenizer.model").is_file():
            hint = f" It holds tokenizer.model: use sentencepiece:{path}/tokenizer.model."
        raise DataError(
            f"data.tokenizer={spec!r}: directory {path} holds no tokenizer.json.{hint} Put "
            f"the tokenizer.json there, point --config.data.tokenizer at one, or {TRAIN_HINT}."
        )
    if not as_path(path).is_file():
        raise _missing(spec, path, "tokenizer.json (or directory holding one)")
    return path


def _load_hf(file: str, spec: str):
    """A `tokenizers.Tokenizer` of `file`, or DataError."""
    try:
        import tokenizers
    except ImportError as e:
        raise DataError(
            f"data.tokenizer={spec!r} needs the tokenizers package: pip install tokenizers."
        ) from e
    try:
        return tokenizers.Tokenizer.from_str(as_path(file).read_text(encoding="utf-8"))
    except Exception as e:  # the library raises a bare Exception for a bad tokenizer.json
        raise DataError(
            f"data.tokenizer={spec!r}: {file} is not a Hugging Face tokenizer.json ({e}); "
            f"point --config.data.tokenizer at a valid one, or {TRAIN_HINT}."
        ) from e


def _named_specials(config_path: str | None, spec: str) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the special tokens tokenizer_config.json names, if any."""
    if config_path is None:
        return {}
    try:
        config = json.loads(as_path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"data.tokenizer={spec!r}: cannot read {config_path} ({e}); fix or remove it."
        ) from e
    named = {}
    for role, _ in _ROLES:
        value = config.get(role) if isinstance(config, dict) else None
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            named[role] = value
    return named


def _check_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name}.encode expects str, got {type(text).__name__}.")


def check_ids(ids, vocab_size: int, name: str) -> np.ndarray:
    """`ids` as int64[n]; ids outside [0, vocab_size) raise ValueError."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"{name}.decode got ids outside [0, {vocab_size}): {bad[:8].tolist()}; "
            "mask logits beyond the tokenizer's vocab_size before sampling."
        )
    return arr


def _frame(body: Sequence[int], bos: int | None, eos: int | None) -> np.ndarray:
    """int32[n]: `body` between `bos` and `eos` (each left out when None)."""
    head = [] if bos is None else [bos]
    tail = [] if eos is None else [eos]
    return np.asarray(head + list(body) + tail, dtype=np.int32)
