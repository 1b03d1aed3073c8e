"""`open_source`: each kind of `data.sources` item read by index, its train/eval roles, pickling
and the bad-input messages (reference: the rules in moejax/data/document_sources.py's
docstring, recomputed here from `stable_fraction`, and the files these tests write)."""

import gzip
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testing_utils import TEST_CORPUS_BYTES_PER_DOMAIN

from moejax.data import DOMAINS, DataError, open_source, parse_sources
from moejax.data.document_sources import glob_root, iter_texts, write_token_records
from moejax.data.text_files import stable_fraction

WEB = [[f"web file {f} row {i}" for i in range(23)] for f in range(2)]
CODE = [[f"def f{f}_{i}(): pass" for i in range(17)] for f in range(2)]
NOTES = [f"note {i} é" for i in range(15)]
HF = [f"hf row {i}" for i in range(21)]
TOKENS = [list(range(i, 2 * i)) for i in range(19)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One directory holding a small instance of every file-based kind."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    for f, texts in enumerate(WEB):
        table = pa.table({"text": texts, "id": list(range(len(texts)))})
        pq.write_table(table, root / f"web-{f}.parquet", row_group_size=5)
    os.makedirs(root / "code" / "sub")
    for f, texts in enumerate(CODE):
        lines = [json.dumps({"content": t, "n": i}) for i, t in enumerate(texts)]
        (root / "code" / "sub" / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n\n")
    with gzip.open(root / "notes.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps({"text": t}) + "\n" for t in NOTES))
    datasets.Dataset.from_dict({"text": HF, "x": list(range(len(HF)))}).save_to_disk(
        str(root / "hf_plain")
    )
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": HF}),
        validation=datasets.Dataset.from_dict({"text": ["val a", "val b"]}),
    ).save_to_disk(str(root / "hf_dict"))
    write_token_records(str(root / "tok-0.array_record"), TOKENS[:10])
    write_token_records(str(root / "tok-1.array_record"), TOKENS[10:])
    return root


def kwargs(**overrides):
    out = dict(
        data_dir="",
        text_key="text",
        train_split="train",
        eval_split="validation",
        eval_fraction=0.2,
        max_bytes_per_domain=TEST_CORPUS_BYTES_PER_DOMAIN,
    )
    return {**out, **overrides}


def one(item: str):
    (spec,) = parse_sources(item)
    return spec


def records(source) -> list:
    """Every record of a source, texts as str and tokens as tuples."""
    out = []
    for i in range(len(source)):
        r = source[i]
        out.append(r["text"] if "text" in r else tuple(r["tokens"].tolist()))
    return out


def position_split(labels_rows, fraction):
    """The eval rule of the docstring: keys "<relative path>:<row>" below the fraction."""
    return {doc for key, doc in labels_rows if stable_fraction(key) < fraction}


# (item, documents with their documented keys) for the kinds split by position.
def keyed(data):
    return {
        "parquet": (
            f"parquet:{data}/web-*.parquet",
            [(f"web-{f}.parquet:{i}", t) for f, ts in enumerate(WEB) for i, t in enumerate(ts)],
        ),
        "jsonl": (
            f"jsonl:{data}/code/**/*.jsonl#content",
            [(f"sub/part-{f}.jsonl:{i}", t) for f, ts in enumerate(CODE) for i, t in enumerate(ts)],
        ),
        "jsonl_gz": (
            f"jsonl:{data}/notes.jsonl.gz",
            [(f"notes.jsonl.gz:{i}", t) for i, t in enumerate(NOTES)],
        ),
        "hf_disk": (f"hf_disk:{data}/hf_plain", [(f":{i}", t) for i, t in enumerate(HF)]),
        "array_record": (
            f"array_record:{data}/tok-*.array_record",
            [(f"tok-0.array_record:{i}", tuple(t)) for i, t in enumerate(TOKENS[:10])]
            + [(f"tok-1.array_record:{i}", tuple(t)) for i, t in enumerate(TOKENS[10:])],
        ),
    }


KINDS = ["parquet", "jsonl", "jsonl_gz", "hf_disk", "array_record"]


@pytest.mark.parametrize("kind", KINDS)
def test_roles_follow_the_position_rule(data, kind):
    item, docs = keyed(data)[kind]
    spec = one(item)
    train = open_source(spec, "train", **kwargs())
    evals = open_source(spec, "eval", **kwargs())
    expected_eval = position_split(docs, 0.2)
    assert 0 < len(expected_eval) < len(docs)  # the rule alone, no top-up, at this size
    # Each role holds exactly its documents, in stored order, and nothing else.
    assert records(evals) == [d for _, d in docs if d in expected_eval]
    assert records(train) == [d for _, d in docs if d not in expected_eval]
    assert train.name == evals.name == spec.name and train.domains == (spec.name,)
    first = train[0]
    assert first["domain"] == 0
    if kind == "array_record":
        assert first["tokens"].dtype == np.int32
    else:
        assert isinstance(first["text"], str)


def test_a_larger_eval_fraction_only_moves_the_expected_documents(data):
    item, docs = keyed(data)["parquet"]
    spec = one(item)
    small = set(records(open_source(spec, "eval", **kwargs(eval_fraction=0.1))))
    again = set(records(open_source(spec, "eval", **kwargs(eval_fraction=0.1))))
    large = set(records(open_source(spec, "eval", **kwargs(eval_fraction=0.4))))
    assert small == again  # deterministic
    moved = {d for key, d in docs if 0.1 <= stable_fraction(key) < 0.4}
    assert moved and large - small == moved and small <= large


def test_tiny_sources_are_topped_up(tmp_path):
    (tmp_path / "two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "one.jsonl").write_text('{"text": "a"}\n')
    two, single = one(f"jsonl:{tmp_path}/two.jsonl"), one(f"jsonl:{tmp_path}/one.jsonl")
    keys = {"a": stable_fraction("two.jsonl:0"), "b": stable_fraction("two.jsonl:1")}
    low = min(keys, key=keys.get)
    for fraction in (1e-9, 0.999999):  # the rule puts nothing / everything in eval
        assert records(open_source(two, "eval", **kwargs(eval_fraction=fraction))) == [low]
        assert records(open_source(two, "train", **kwargs(eval_fraction=fraction))) == [
            d for d in "ab" if d != low
        ]
    assert len(open_source(single, "eval", **kwargs(eval_fraction=0.999))) == 0
    assert records(open_source(single, "train", **kwargs(eval_fraction=0.999))) == ["a"]


def test_hf_dataset_dict_splits_are_used_by_name(data):
    spec = one(f"hf_disk:{data}/hf_dict")
    assert records(open_source(spec, "train", **kwargs())) == HF
    assert records(open_source(spec, "eval", **kwargs())) == ["val a", "val b"]
    # No eval split: eval is carved out of train by position ("<split>:<row>").
    carved = open_source(spec, "eval", **kwargs(eval_split="test"))
    rest = open_source(spec, "train", **kwargs(eval_split="test"))
    expected = position_split([(f"train:{i}", t) for i, t in enumerate(HF)], 0.2)
    assert set(records(carved)) == expected and set(records(rest)) == set(HF) - expected


def test_corpus_reads_its_own_splits_and_domains(corpus_dir, corpus):
    spec = one("corpus")
    kw = kwargs(data_dir=corpus_dir, text_key="ignored_by_the_corpus")
    train, evals = open_source(spec, "train", **kw), open_source(spec, "eval", **kw)
    assert len(train) == corpus.info.splits["train"].num_examples
    assert len(evals) == corpus.info.splits["validation"].num_examples
    assert train.domains == DOMAINS == ("code", "prose", "arithmetic")
    reference = corpus.as_data_source(split="validation")
    for i in (0, len(evals) - 1):
        assert evals[i] == {
            "text": reference[i]["text"].decode("utf-8"),
            "domain": int(reference[i]["domain"]),
        }
    domains = {train[i]["domain"] for i in range(len(train))}
    assert domains == {0, 1, 2}


def test_tfds_dataset_without_eval_split(plain_text_cfg, plain_texts):
    spec = one("tfds:moejax_test_plain_text#body")
    kw = kwargs(data_dir=plain_text_cfg.data_dir)
    train, evals = open_source(spec, "train", **kw), open_source(spec, "eval", **kw)
    assert sorted(records(train) + records(evals)) == sorted(plain_texts)
    assert not set(records(train)) & set(records(evals)) and len(evals) > 0
    assert train.domains == ("moejax_test_plain_text",)
    # data.text_key applies when there is no #FIELD; eval_split naming an existing split.
    same = open_source(one("tfds:moejax_test_plain_text"), "eval", **{**kw, "text_key": "body"})
    assert len(open_source(spec, "eval", **{**kw, "eval_split": "train"})) == len(plain_texts)
    assert records(same) == records(evals)


@pytest.mark.parametrize("kind", KINDS + ["corpus"])
def test_pickle_round_trip(data, corpus_dir, kind):
    item = "corpus" if kind == "corpus" else keyed(data)[kind][0]
    source = open_source(one(item), "train", **kwargs(data_dir=corpus_dir))
    before = records(source)  # opens files and fills caches, which pickling drops
    copy = pickle.loads(pickle.dumps(source))
    assert records(copy) == before and copy.name == source.name
    assert len(records(copy)) == len(copy)


def test_negative_and_out_of_range_indices(data):
    source = open_source(one(keyed(data)["parquet"][0]), "train", **kwargs())
    assert source[-1] == source[len(source) - 1]
    with pytest.raises(IndexError):
        source[len(source)]


def test_iter_texts_reads_every_train_role_in_order(data):
    spec = f"jsonl:{data}/code/**/*.jsonl#content,parquet:{data}/web-*.parquet"
    with pytest.warns(UserWarning, match="already token ids"):
        texts = list(
            iter_texts(
                spec + f",array_record:{data}/tok-*.array_record", data_dir="", text_key="text"
            )
        )
    expected = []
    for item in parse_sources(spec):
        expected += records(open_source(item, "train", **kwargs(eval_fraction=0.05)))
    assert texts == expected
    with pytest.raises(DataError, match="only pre-tokenized"), pytest.warns(UserWarning):
        iter_texts(f"array_record:{data}/tok-*.array_record", data_dir="", text_key="text")


def test_glob_root():
    assert glob_root("/d/web-*.parquet") == "/d"
    assert glob_root("/d/x/**/a.jsonl") == "/d/x"
    assert glob_root("/d/x/a.jsonl") == "/d/x"
    assert glob_root("*.jsonl") == "."


def test_write_token_records_rejects_non_integer_rows(tmp_path):
    with pytest.raises(ValueError, match="int token ids"):
        write_token_records(str(tmp_path / "x.array_record"), [[1.5, 2.0]])
    with pytest.raises(ValueError, match="int32"):
        write_token_records(str(tmp_path / "y.array_record"), [[2**40]])


# --- bad input: one DataError naming the field and the fix, nothing deleted ----------------


def bad_inputs(root):
    """{case: (item, expected message parts)}; writes the files each case needs."""
    (root / "notjson.jsonl").write_text('{"text": "ok"\n')
    (root / "nofield.jsonl").write_text('{"body": "x"}\n')
    pq.write_table(pa.table({"body": ["x"]}), root / "nocol.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "corrupt.array_record").write_bytes(b"\x00\x01garbage" * 10)
    (root / "not_hf").mkdir()
    (root / "not_hf" / "readme.txt").write_text("hi")
    (root / "empty_tfds").mkdir()
    return {
        "no match": (f"parquet:{root}/nope-*.parquet", ["matches no file", "notjson.jsonl"]),
        "no dir": (f"jsonl:{root}/missing/*.jsonl", ["matches no file", "does not exist"]),
        "no column": (
            f"parquet:{root}/nocol.parquet",
            ["no column 'text'", "nocol.parquet#body", "data.text_key"],
        ),
        "not json": (f"jsonl:{root}/notjson.jsonl", ["notjson.jsonl line 1 is not JSON"]),
        "no field": (
            f"jsonl:{root}/nofield.jsonl#content",
            ["line 1 has no field 'content'", "#content", "nofield.jsonl#body"],
        ),
        "hf missing": (f"hf_disk:{root}/nothing_here", ["does not exist", "save_to_disk"]),
        "hf unreadable": (f"hf_disk:{root}/not_hf", ["load_from_disk cannot read"]),
        "tfds not prepared": (
            "tfds:moejax_test_plain_text",
            [
                "is not prepared",
                f"tfds build moejax_test_plain_text --data_dir={root}/empty_tfds "
                "--file_format=array_record",
            ],
        ),
        "tfds unknown": ("tfds:no_such_dataset_xyz", ["has no builder of that name"]),
        "array_record no files": (f"array_record:{root}/*.arrayrec", ["matches no file"]),
        "corrupt parquet": (f"parquet:{root}/corrupt.parquet", ["not a readable parquet"]),
        "corrupt array_record": (
            f"array_record:{root}/corrupt.array_record",
            ["not a readable array_record"],
        ),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, bad_inputs(root)


BAD_CASES = [
    "no match",
    "no dir",
    "no column",
    "not json",
    "no field",
    "hf missing",
    "hf unreadable",
    "tfds not prepared",
    "tfds unknown",
    "array_record no files",
    "corrupt parquet",
    "corrupt array_record",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_data_error(bad, case):
    bad_root, table = bad
    item, parts = table[case]
    before = sorted(p.relative_to(bad_root) for p in bad_root.rglob("*"))
    with pytest.raises(DataError) as err:
        open_source(one(item), "train", **kwargs(data_dir=str(bad_root / "empty_tfds")))
    message = str(err.value)
    assert "data.sources" in message
    for part in parts:
        assert part in message, message
    assert sorted(p.relative_to(bad_root) for p in bad_root.rglob("*")) == before


def test_a_bad_line_deep_in_a_file_names_it_when_read(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n\n{"tex": "c"}\nnope\n')
    spec = one(f"jsonl:{tmp_path}/a.jsonl")
    read = []
    for role in ("train", "eval"):
        source = open_source(spec, role, **kwargs())  # the first line is fine: opens
        for i in range(len(source)):
            try:
                read.append(source[i]["text"])
            except DataError as e:
                read.append(str(e))
    assert len(read) == 4  # the blank line is skipped
    messages = " ".join(read)
    assert "a.jsonl line 4 has no field 'text'" in messages
    assert "a.jsonl line 5 is not JSON" in messages and "data.sources" in messages


def test_bad_eval_fraction(data):
    with pytest.raises(DataError, match="data.eval_fraction"):
        open_source(one(keyed(data)["parquet"][0]), "eval", **kwargs(eval_fraction=0.0))
