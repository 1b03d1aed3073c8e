"""Corpus sources: chunking, caps, the docstring fallback, and correct arithmetic."""

import re

import pytest

from moejax.data import DOMAIN_IDS, DOMAINS, arithmetic, corpus_sources, text_files


def test_domains_are_fixed():
    assert DOMAINS == ("code", "prose", "arithmetic")
    assert DOMAIN_IDS == {"code": 0, "prose": 1, "arithmetic": 2}


def test_chunk_text_respects_limit_and_keeps_text():
    text = "line one\n" * 50 + "é" * 300 + "\n" + "tail\n"
    chunks = text_files.chunk_text(text, 64)
    assert "".join(chunks) == text
    assert all(len(c.encode("utf-8")) <= 64 for c in chunks)
    assert chunks[0] == "line one\n" * 7  # 63 bytes: cut at a line end
    assert text_files.chunk_text(" \n\n", 64) == []
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        text_files.chunk_text(text, 8)


def test_truncate_utf8_stays_valid():
    assert text_files.truncate_utf8("ab\ncdéf", 6) == "ab\n"  # a line end in the second half
    assert text_files.truncate_utf8("a\ncdeéf", 6) == "a\ncde"  # else a character boundary
    assert text_files.truncate_utf8("aaaa\nbbbbbbbbbb", 12) == "aaaa\nbbbbbbb"
    assert text_files.truncate_utf8("ééé", 5) == "éé"
    assert text_files.truncate_utf8("short", 100) == "short"


def test_collect_is_deterministic_capped_and_chunked():
    cap = 60_000
    first = corpus_sources.collect_documents(cap, max_chunk_bytes=4096)
    second = corpus_sources.collect_documents(cap, max_chunk_bytes=4096)
    assert first == second
    assert len({d.doc_id for d in first}) == len(first)
    for domain in DOMAINS:
        size = sum(len(d.text.encode("utf-8")) for d in first if d.domain == domain)
        assert cap - 4096 <= size <= cap, domain  # the cap is exact up to one chunk
    assert max(len(d.text.encode("utf-8")) for d in first) <= 4096
    for doc in first:
        assert doc.doc_id.startswith(doc.domain + "/") and "#" in doc.doc_id
    code = [d for d in first if d.domain == "code"]
    assert all("/test/" not in d.doc_id and "idlelib" not in d.doc_id for d in code)
    assert any("def " in d.text for d in code)


def test_prose_fallback_needs_only_python():
    """Without any system documentation, prose still comes from Python itself."""
    docs = corpus_sources.prose_sources(max_chunk_bytes=8192, system_prose=False)
    kinds = set()
    for doc in docs:
        kinds.add(doc.doc_id.split("/")[1])
        if "docstrings" in kinds:
            break
    assert kinds <= {"pydoc", "docstrings"} and "docstrings" in kinds
    assert doc.domain == "prose" and len(doc.text) > 40


def test_docstring_text():
    source = (
        '"""Module doc that is long enough to keep as prose."""\n'
        'def f():\n  """Short."""\n'
        'class C:\n  """A class docstring, also long enough to be kept."""\n'
    )
    assert corpus_sources.docstring_text(source) == (
        "Module doc that is long enough to keep as prose.\n\n"
        "A class docstring, also long enough to be kept.\n"
    )
    assert corpus_sources.docstring_text("def broken(:\n") == ""


def test_arithmetic_is_deterministic_and_correct():
    assert arithmetic.worksheet(0, 5, 8192) == arithmetic.worksheet(0, 5, 8192)
    assert arithmetic.worksheet(0, 5, 8192) != arithmetic.worksheet(1, 5, 8192)
    checked = 0
    for index in range(40):
        text = arithmetic.worksheet(0, index, 8192)
        assert len(text.encode()) <= 8192
        for line in text.splitlines():
            if re.fullmatch(r"[-0-9+*() =]+", line):  # sums, products, multi-step expressions
                values = {eval(step) for step in line.split(" = ")}
                assert len(values) == 1, line
                checked += 1
            elif m := re.fullmatch(r"(\d+) / (\d+) = (\d+)(?: remainder (\d+))?", line):
                a, b, q, r = (int(g or 0) for g in m.groups())
                assert a == q * b + r and 0 <= r < b, line
                checked += 1
            elif m := re.search(r"So (\d+) \+ (\d+) = (\d+)\.$", line):
                assert int(m[1]) + int(m[2]) == int(m[3]), line
                checked += 1
            elif m := re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)\. Answer: (\d+)\.$", line):
                a, op, b, c, answer = m.groups()
                assert eval(f"{a} {op.replace('/', '//')} {b}") == int(c) == int(answer), line
                checked += 1
            else:
                raise AssertionError(f"unrecognised line: {line!r}")
    assert checked > 1000
