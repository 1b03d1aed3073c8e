"""The tfds builder: built once, read back without TensorFlow, with the stored stats."""

import collections
import sys

import tensorflow_datasets as tfds

from moejax.data import DOMAINS, MoejaxCorpus, build_corpus
from moejax.data.config import default_data_dir


def _read_all(source):
    return [source[i] for i in range(len(source))]


def test_registered_and_described(corpus):
    assert isinstance(corpus, MoejaxCorpus)
    assert tfds.builder_cls("moejax_corpus") is MoejaxCorpus
    assert str(corpus.info.version) == "1.0.0"
    assert set(corpus.info.splits.keys()) == {"train", "validation"}
    assert corpus.info.features["domain"].names == list(DOMAINS)
    assert corpus.data_dir.endswith("moejax_corpus/domain_bytes_200000/1.0.0")


def test_reads_back_without_tensorflow(corpus):
    assert "tensorflow" not in sys.modules
    sources = corpus.as_data_source()
    stats = corpus.info.metadata["stats"]
    seen_ids = {}
    for split in ("train", "validation"):
        records = _read_all(sources[split])
        assert len(records) == stats[split]["documents"] == corpus.info.splits[split].num_examples
        counts, sizes = collections.Counter(), collections.Counter()
        for r in records:
            assert set(r) == {"text", "domain", "doc_id"}
            name = DOMAINS[int(r["domain"])]
            assert r["doc_id"].decode().startswith(name + "/")
            counts[name] += 1
            sizes[name] += len(r["text"])
        assert dict(counts) == {d: s["documents"] for d, s in stats[split]["domains"].items()}
        assert dict(sizes) == {d: s["bytes"] for d, s in stats[split]["domains"].items()}
        assert set(counts) == set(DOMAINS)  # every domain in both splits
        seen_ids[split] = {r["doc_id"] for r in records}
    assert not seen_ids["train"] & seen_ids["validation"]
    cap = corpus.builder_config.max_bytes_per_domain
    for d in DOMAINS:  # each domain's cap is met to within one 8 KB chunk
        size = sum(stats[s]["domains"][d]["bytes"] for s in stats)
        assert cap - 8192 <= size <= cap, d
    assert "tensorflow" not in sys.modules


def test_second_build_reuses_files(corpus_dir, corpus, capsys):
    path = corpus.data_dir + "/dataset_info.json"
    before = open(path).read()
    cap = corpus.builder_config.max_bytes_per_domain
    again = build_corpus(corpus_dir, max_bytes_per_domain=cap)
    assert again.data_dir == corpus.data_dir and open(path).read() == before
    assert "built" not in capsys.readouterr().out


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("MOEJAX_DATA_DIR", "/some/where")
    assert default_data_dir() == "/some/where"
    monkeypatch.delenv("MOEJAX_DATA_DIR")
    assert default_data_dir().endswith(".cache/moejax/tensorflow_datasets")
