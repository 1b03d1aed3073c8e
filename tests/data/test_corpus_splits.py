"""The train/validation split: stable, disjoint, and every domain on both sides."""

import collections
import os
import subprocess
import sys

import moejax
from moejax.data import DOMAINS, collect_documents, split_documents
from moejax.data.splits import source_key


def test_split_is_disjoint_deterministic_and_has_every_domain():
    docs = collect_documents(100_000)
    first, second = split_documents(docs), split_documents(docs)
    assert first == second
    train = {d.doc_id for d in first["train"]}
    valid = {d.doc_id for d in first["validation"]}
    assert not train & valid and len(train) + len(valid) == len(docs)
    # All chunks of one source file are on the same side.
    assert not {source_key(i) for i in train} & {source_key(i) for i in valid}
    for split in ("train", "validation"):
        assert {d.domain for d in first[split]} == set(DOMAINS), split


def test_split_of_full_size_corpus_is_about_five_percent():
    docs = collect_documents(4_000_000)
    split = split_documents(docs)
    valid_bytes = collections.Counter()
    for d in split["validation"]:
        valid_bytes[d.domain] += len(d.text.encode("utf-8"))
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    assert 0.02 < sum(valid_bytes.values()) / total < 0.1
    assert sum(valid_bytes.values()) > 300_000  # a few hundred KB of validation text
    assert set(valid_bytes) == set(DOMAINS)


def test_split_does_not_depend_on_python_hash_seed():
    script = (
        "from moejax.data import collect_documents, split_documents\n"
        "print(sorted(d.doc_id for d in split_documents("
        "collect_documents(50_000))['validation']))"
    )
    outputs = set()
    for seed in ("1", "2"):
        repo = os.path.dirname(os.path.dirname(moejax.__file__))
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=repo)
        outputs.add(
            subprocess.run(
                [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
    here = sorted(d.doc_id for d in split_documents(collect_documents(50_000))["validation"])
    assert outputs == {f"{here}\n"}
