"""Raw text of the offline multi-domain corpus, gathered from what is on this machine.

Three domains with fixed ids, so routing analyses can ask "which experts does code use":

- ``code`` (0): Python standard-library source. Always present.
- ``prose`` (1): English prose. In priority order: licence texts in
  /usr/share/common-licenses, Python's own help topics (`pydoc_data`, shipped with every
  CPython), READMEs / *.txt / *.md (also gzipped) under /usr/share/doc, fortune and jargon
  files when installed, and finally module/class/function docstrings of the stdlib read with
  `ast`. The last source is always there, so a bare Python install still yields prose; the
  system sources only make it more varied.
- ``arithmetic`` (2): generated problems with answers (`arithmetic.py`).

Every source yields `Document(doc_id, domain, text)` chunks of at most `max_chunk_bytes`
UTF-8 bytes, so greedy packing wastes little; each domain stops at `max_bytes_per_domain`
bytes. Files are visited in the order of a stable hash of their path: deterministic, but
spread over the whole tree, so a small cap samples many packages rather than the
alphabetically first ones. A `doc_id` is `<domain>/<source>/<path>#<chunk>`; the part before
`#` names the source file, which the train/validation split keys on (`splits.py`).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from moejax.data import arithmetic
from moejax.data.text_files import (
    DEFAULT_MAX_FILE_BYTES,
    chunk_text,
    read_text_file,
    stable_fraction,
    truncate_utf8,
)

DOMAINS = ("code", "prose", "arithmetic")
DOMAIN_IDS = {name: i for i, name in enumerate(DOMAINS)}

DEFAULT_MAX_BYTES_PER_DOMAIN = 4_000_000
DEFAULT_MAX_CHUNK_BYTES = 8192
# Smaller files (empty `__init__.py`, "Reserved" help stubs) teach nothing.
MIN_DOCUMENT_BYTES = 64

# Tests are excluded as the brief asks (they are repetitive and partly invalid code on
# purpose); `encodings` are generated codec tables, `pydoc_data` is prose (used there).
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "__pycache__", "encodings", "pydoc_data"}
)
LICENSE_DIR = "/usr/share/common-licenses"
DOC_DIR = "/usr/share/doc"
FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes", "/usr/share/fortune")
JARGON_PATHS = (
    "/usr/share/dict/jargon",
    "/usr/share/doc/jargon/jargon.txt.gz",
    "/usr/share/jargon/jargon.txt",
)


class Document(NamedTuple):
    """One corpus record; a plain tuple `(doc_id, domain, text)` for easy unpacking."""

    doc_id: str
    domain: str
    text: str


def _hash_ordered(paths: Iterable[str], root: str) -> list[str]:
    """Sorts paths by a stable hash of their path relative to `root` (ties by path)."""
    return sorted(paths, key=lambda p: (stable_fraction(os.path.relpath(p, root)), p))


def stdlib_python_files(stdlib: str | None = None) -> list[str]:
    """Returns the stdlib's `*.py` files (tests and tools excluded) in stable-hash order."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return _hash_ordered(found, root)


def _prose_files(root: str, every_file: bool) -> list[str]:
    """Every file (licences) or README / *.txt / *.md files (maybe gzipped) under root."""
    if not os.path.isdir(root):
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            lower = name.lower()
            base = lower[:-3] if lower.endswith(".gz") else lower
            # Changelogs and release notes are lists of commit titles and links, not prose.
            if any(word in base for word in ("changelog", "changes", "relnotes", "news")) or (
                "relnotes" in dirpath.lower()
            ):
                continue
            if every_file or base.startswith("readme") or base.endswith((".txt", ".md")):
                found.append(os.path.join(dirpath, name))
    return _hash_ordered(found, root)


def _fortune_files(root: str) -> list[str]:
    """Fortune cookie files under root; their `.dat` indexes are binary and skipped."""
    if not os.path.isdir(root):
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f) for f in sorted(filenames) if not f.endswith((".dat", ".u8"))
        )
    return found


def _jargon_files() -> list[str]:
    """The Jargon File, where a distribution installs it."""
    return [p for p in JARGON_PATHS if os.path.isfile(p)]


def docstring_text(source: str) -> str:
    """Module, class and function docstrings of a Python source, as plain paragraphs.

    Docstrings are the English prose every Python install has. One-line docstrings shorter
    than 40 characters ("Return x.") are skipped: they add little but noise.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                parts.append(doc.strip())
    return "\n\n".join(parts) + "\n" if parts else ""


def _file_documents(
    domain: str,
    prefix: str,
    paths: Iterable[str],
    root: str,
    max_chunk_bytes: int,
    max_file_bytes: int,
    transform=None,
) -> Iterator[Document]:
    """Chunks of each readable file, `doc_id = <domain>/<prefix>/<relpath>#<chunk>`."""
    for path in paths:
        text = read_text_file(path, max_file_bytes if transform is None else 1 << 30)
        if text and transform is not None:
            text = transform(text)[:max_file_bytes]
        if not text or len(text.strip()) < MIN_DOCUMENT_BYTES:
            continue
        rel = os.path.relpath(path, root)
        for i, chunk in enumerate(chunk_text(text, max_chunk_bytes)):
            yield Document(f"{domain}/{prefix}/{rel}#{i}", domain, chunk)


def code_sources(
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    stdlib: str | None = None,
) -> Iterator[Document]:
    """Python stdlib source files, in stable-hash order."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    yield from _file_documents(
        "code", "stdlib", stdlib_python_files(root), root, max_chunk_bytes, max_file_bytes
    )


def _pydoc_topics() -> dict[str, str]:
    """Python's help() topics (the language reference as plain text), if shipped."""
    try:
        from pydoc_data import topics
    except ImportError:  # some distributions strip it
        return {}
    return dict(topics.topics)


def prose_sources(
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    system_prose: bool = True,
    stdlib: str | None = None,
) -> Iterator[Document]:
    """English prose: system documentation first, stdlib docstrings last (always present).

    `system_prose=False` restricts prose to what a bare Python install has: pydoc topics and
    docstrings. Exact duplicate texts (the same licence copied into many packages) are kept
    once, so they cannot leak from the training split into the validation split.
    """
    seen: set[str] = set()

    def unique(docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            key = hashlib.md5(doc.text.encode("utf-8")).hexdigest()
            if key not in seen:
                seen.add(key)
                yield doc

    def files(prefix: str, root: str, paths: Iterable[str], transform=None):
        return unique(
            _file_documents(
                "prose", prefix, paths, root, max_chunk_bytes, max_file_bytes, transform
            )
        )

    if system_prose:  # licences first: long, clean, edited English
        yield from files("licenses", LICENSE_DIR, _prose_files(LICENSE_DIR, every_file=True))
    topics = _pydoc_topics()  # ships with CPython itself
    for name in sorted(topics):
        if len(topics[name].strip()) < MIN_DOCUMENT_BYTES:
            continue
        chunks = chunk_text(topics[name][:max_file_bytes], max_chunk_bytes)
        yield from unique(
            Document(f"prose/pydoc/{name}#{i}", "prose", c) for i, c in enumerate(chunks)
        )
    if system_prose:
        yield from files("doc", DOC_DIR, _prose_files(DOC_DIR, every_file=False))
        for root in FORTUNE_DIRS:
            yield from files("fortunes", root, _fortune_files(root))
        yield from files("jargon", "/", _jargon_files())
    root = stdlib or sysconfig.get_paths()["stdlib"]
    # Reversed hash order: the code domain reads files from the front, so under a byte cap
    # the two domains mostly draw on different modules.
    yield from files("docstrings", root, reversed(stdlib_python_files(root)), docstring_text)


def arithmetic_sources(max_chunk_bytes: int, seed: int = 0) -> Iterator[Document]:
    """Endless worksheets `arithmetic/generated/<index>#0`; the caller caps the bytes."""
    index = 0
    while True:
        text = arithmetic.worksheet(seed, index, max_chunk_bytes)
        yield Document(f"arithmetic/generated/{index:06d}#0", "arithmetic", text)
        index += 1


def take_bytes(docs: Iterable[Document], max_bytes: int) -> list[Document]:
    """The leading documents of `docs` until their UTF-8 size reaches `max_bytes`.

    The last document is cut so the total never exceeds the cap: corpus sizes are exact and
    predictable from the configuration.
    """
    out, total = [], 0
    for doc in docs:
        if total >= max_bytes:
            break
        text = truncate_utf8(doc.text, max_bytes - total)
        if text != doc.text and len(text.strip()) < MIN_DOCUMENT_BYTES:
            break  # the cap leaves room for only a scrap of the next document
        out.append(doc._replace(text=text))
        total += len(text.encode("utf-8"))
    return out


def collect_documents(
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    system_prose: bool = True,
    seed: int = 0,
) -> list[Document]:
    """All documents of the corpus, domain by domain, each domain capped in bytes."""
    if max_bytes_per_domain <= 0:
        raise ValueError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}.")
    streams = {
        "code": code_sources(max_chunk_bytes),
        "prose": prose_sources(max_chunk_bytes, system_prose=system_prose),
        "arithmetic": arithmetic_sources(max_chunk_bytes, seed=seed),
    }
    docs: list[Document] = []
    for name in DOMAINS:
        docs.extend(take_bytes(streams[name], max_bytes_per_domain))
    return docs


# The tfds builder's version and config names (`corpus_tfds`); the prepared corpus lives at
# DATA_DIR/moejax_corpus/<config_name>/<CORPUS_VERSION>.
CORPUS_VERSION = "1.0.0"


def config_name(max_bytes_per_domain: int) -> str:
    return f"domain_bytes_{max_bytes_per_domain}"


def corpus_stats(docs: Sequence[Document]) -> dict:
    """{"documents": n, "bytes": b, "domains": {domain: {"documents", "bytes"}}}."""
    domains = {name: {"documents": 0, "bytes": 0} for name in DOMAINS}
    for doc in docs:
        domains[doc.domain]["documents"] += 1
        domains[doc.domain]["bytes"] += len(doc.text.encode("utf-8"))
    return {
        "documents": sum(d["documents"] for d in domains.values()),
        "bytes": sum(d["bytes"] for d in domains.values()),
        "domains": domains,
    }
