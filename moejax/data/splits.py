"""The fixed train/validation split of the corpus.

A document is in validation when the MD5 of its *source* (the `doc_id` before `#`) maps
below `validation_fraction`. Keying on the source rather than the chunk keeps all chunks of
one file on the same side, so validation text is never a continuation of a training
document. MD5 is the same on every machine; Python's `hash()` is salted per process and
would give every run a different split.

Small corpora (tests, tiny caps) can have a domain with few or no sources below the
threshold, so each domain is topped up with its next-lowest-hash sources until validation
holds `validation_fraction` of the domain's bytes, always leaving at least one source for
training: every domain is in both splits whenever it has at least two sources.
"""

from __future__ import annotations

from collections.abc import Sequence

from moejax.data.corpus_sources import DOMAINS, Document, stable_fraction

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)
DEFAULT_VALIDATION_FRACTION = 0.05


def source_key(doc_id: str) -> str:
    """The source file of a document: its id up to the chunk suffix `#<i>`."""
    return doc_id.rsplit("#", 1)[0]


def split_documents(
    docs: Sequence[Document],
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> dict[str, list[Document]]:
    """Partitions `docs` into {"train": [...], "validation": [...]}, keeping their order."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    held_out: set[str] = set()
    for domain in DOMAINS:
        sizes: dict[str, int] = {}
        for d in docs:
            if d.domain == domain:
                key = source_key(d.doc_id)
                sizes[key] = sizes.get(key, 0) + len(d.text.encode("utf-8"))
        total, taken = sum(sizes.values()), 0
        # Lowest hash first: exactly the sources below the threshold, then the top-up.
        for i, key in enumerate(sorted(sizes, key=lambda k: (stable_fraction(k), k))):
            below = stable_fraction(key) < validation_fraction
            if i == len(sizes) - 1 or not (below or taken < validation_fraction * total):
                break
            held_out.add(key)
            taken += sizes[key]
    out: dict[str, list[Document]] = {TRAIN: [], VALIDATION: []}
    for doc in docs:
        out[VALIDATION if source_key(doc.doc_id) in held_out else TRAIN].append(doc)
    return out
