"""Reading system text files safely, and cutting text into corpus-sized pieces.

Helpers shared by the corpus sources: a process-independent hash, UTF-8-aware cutting
(pieces are always valid UTF-8, cut at line ends where possible), and a reader that turns
any file under /usr/share into text or None without raising.
"""

from __future__ import annotations

import gzip
import hashlib
import re

# One file contributes at most this much, so a few huge files cannot fill a domain.
DEFAULT_MAX_FILE_BYTES = 65536
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|.\x08")


def stable_fraction(key: str) -> float:
    """Maps `key` to [0, 1) via MD5: identical on every machine and Python process.

    Python's `hash()` is salted per process (PYTHONHASHSEED), so it must never decide which
    document is in which split or in which order files are read.
    """
    digest = hashlib.md5(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def chunk_text(text: str, max_bytes: int) -> list[str]:
    """Splits `text` into pieces of at most `max_bytes` UTF-8 bytes, at line ends if possible.

    Whitespace-only pieces are dropped. A single line longer than `max_bytes` is cut at a
    character boundary, so every piece is valid UTF-8.
    """
    if max_bytes < 16:
        raise ValueError(f"max_chunk_bytes must be >= 16, got {max_bytes}.")
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and current:
            chunks.append("".join(current))
            current, size = [], 0
        while n > max_bytes:  # a huge line: cut it at a character boundary
            raw = line.encode("utf-8")
            cut = max_bytes
            while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # continuation byte: step back
                cut -= 1
            chunks.append(raw[:cut].decode("utf-8"))
            line = raw[cut:].decode("utf-8")
            n = len(line.encode("utf-8"))
        current.append(line)
        size += n
    if current:
        chunks.append("".join(current))
    return [c for c in chunks if c.strip()]


def read_text_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str | None:
    """Returns up to `max_bytes` of the file as text (gunzipping `*.gz`), or None if unusable.

    None for unreadable, binary-looking (NUL bytes or mostly non-printable) and empty files:
    system directories hold odd things and one bad file must not stop a build.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(max_bytes)
        else:
            with open(path, "rb") as f:
                raw = f.read(max_bytes)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not raw or b"\x00" in raw[:8192]:
        return None
    # Terminal formatting in pre-rendered manuals: ANSI escapes and "X\bX" overstrikes.
    text = _TERMINAL_CODES.sub("", raw.decode("utf-8", errors="ignore"))
    sample = text[:8192]
    printable = sum(ch.isprintable() or ch in "\n\t\r" for ch in sample)
    if printable < 0.95 * len(sample):
        return None
    return text


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` within `max_bytes` bytes, ending at a line end if one is
    in the second half, else at a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = max_bytes
    while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # continuation byte: step back
        cut -= 1
    newline = raw.rfind(b"\n", 0, cut)
    if newline >= cut // 2:
        cut = newline + 1
    return raw[:cut].decode("utf-8")
