"""`parse_sources`: the `data.sources` grammar KIND:WHERE[#FIELD][@WEIGHT] (reference: the
grammar in moejax/data/source_spec.py's docstring)."""

import pytest

from moejax.data import DataError, SourceSpec, parse_sources

VALID = [
    ("corpus", [SourceSpec("corpus", "", 1.0, None, "corpus")]),
    (" corpus@0.5 ", [SourceSpec("corpus", "", 0.5, None, "corpus")]),
    (
        "parquet:/d/web-*.parquet@0.7,jsonl:/d/code-*.jsonl#content@0.3",
        [
            SourceSpec("parquet", "/d/web-*.parquet", 0.7, None, "web"),
            SourceSpec("jsonl", "/d/code-*.jsonl", 0.3, "content", "code"),
        ],
    ),
    ("tfds:c4/en:3.1.0", [SourceSpec("tfds", "c4/en:3.1.0", 1.0, None, "c4_en")]),
    ("tfds:wiki40b#body@2", [SourceSpec("tfds", "wiki40b", 2.0, "body", "wiki40b")]),
    (
        "jsonl:/d/x/part-*.jsonl.gz",
        [SourceSpec("jsonl", "/d/x/part-*.jsonl.gz", 1.0, None, "part")],
    ),
    ("hf_disk:/data/my set/", [SourceSpec("hf_disk", "/data/my set/", 1.0, None, "my_set")]),
    (
        "array_record:/t/*.array_record",
        [SourceSpec("array_record", "/t/*.array_record", 1, None, "t")],
    ),
    (
        "parquet:/d/shard-[0-9]?.parquet@1e-3",
        [SourceSpec("parquet", "/d/shard-[0-9]?.parquet", 1e-3, None, "shard")],
    ),
    # The same basename twice (different directories): numeric suffixes.
    (
        "parquet:/a/web-*.parquet,parquet:/b/web-*.parquet,jsonl:/c/web.jsonl",
        [
            SourceSpec("parquet", "/a/web-*.parquet", 1.0, None, "web"),
            SourceSpec("parquet", "/b/web-*.parquet", 1.0, None, "web_2"),
            SourceSpec("jsonl", "/c/web.jsonl", 1.0, None, "web_3"),
        ],
    ),
    # The same files with two different fields are two sources.
    (
        "jsonl:/d/a.jsonl#q,jsonl:/d/a.jsonl#a",
        [
            SourceSpec("jsonl", "/d/a.jsonl", 1.0, "q", "a"),
            SourceSpec("jsonl", "/d/a.jsonl", 1.0, "a", "a_2"),
        ],
    ),
]


@pytest.mark.parametrize("spec, expected", VALID)
def test_parse_valid(spec, expected):
    assert parse_sources(spec) == tuple(expected)


INVALID = [
    ("", "is empty"),
    ("   ", "is empty"),
    ("corpus,,parquet:/d/*.parquet", "item 2 is empty"),
    ("corpus,", "item 2 is empty"),
    ("csv:/d/*.csv", "unknown kind 'csv'.*parquet, jsonl, hf_disk, array_record"),
    ("/d/web-*.parquet", "unknown kind"),
    ("parquet:", "no location"),
    ("parquet:@0.5", "no location"),
    ("hf_disk", "no location"),
    ("corpus:/d", "gives corpus a location"),
    ("corpus#text", "gives a #FIELD to corpus"),
    ("array_record:/t/*.ar#text", "gives a #FIELD to array_record"),
    ("jsonl:/d/a.jsonl#", "empty #FIELD"),
    ("parquet:/d/a.parquet@abc", "weight 'abc'"),
    ("parquet:/d/a.parquet@0", "weight '0'"),
    ("parquet:/d/a.parquet@-1", "weight '-1'"),
    ("parquet:/d/a.parquet@inf", "weight 'inf'"),
    ("parquet:/d/a.parquet@nan", "weight 'nan'"),
    ("parquet:/d/a.parquet@", "weight ''"),
    ("parquet:/d/a@b/x.parquet", "weight 'b/x.parquet'.*explicit weight"),
    ("parquet:/d/a.parquet@0.5, parquet:/d/a.parquet@0.2", "same source"),
    ("corpus,corpus@2", "same source"),
]


@pytest.mark.parametrize("spec, message", INVALID)
def test_parse_invalid(spec, message):
    with pytest.raises(DataError, match=message) as err:
        parse_sources(spec)
    assert "data.sources" in str(err.value)


def test_names_are_metric_safe():
    specs = parse_sources("parquet:/d/wé b+x-*.parquet,jsonl:*.jsonl,parquet:/d/*.parquet")
    assert [s.name for s in specs] == ["w_b_x", "jsonl", "d"]
