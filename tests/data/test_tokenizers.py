"""Sub-word tokenizers behind `Tokenizer`: ids equal to the libraries' own, token_bytes sums to
the UTF-8 byte count, special ids, bad `data.tokenizer` values, and deterministic training.

References: `sentencepiece.SentencePieceProcessor.encode` and `tokenizers.Tokenizer.encode`
(the libraries themselves), and `len(text.encode("utf-8"))` for token_bytes. Tiny vocabularies
are trained in tmp dirs from generated text (no downloads).
"""

import dataclasses
import json
import os
import pickle
import random

import numpy as np
import pytest
import sentencepiece
import tokenizers
from testing_utils import run_module
from tokenizers import decoders, models, pre_tokenizers, trainers

from moejax.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    Tokenizer,
    load_tokenizer,
    open_tokenizer,
)
from moejax.data.subword_tokenizers import gpt2_unicode_to_byte
from moejax.data.tokenizer_train import run_cli
from moejax.data.tokenizer_training import SP_CHUNK_CHARS, _chunks, capped, train_tokenizer

WORDS = (
    "the quick brown fox jumps over a lazy dog while naïve café owners sip crème brûlée "
    "数学 中文 文本 🙂 🚀 def return lambda import numpy as np for in range if else "
    "12 + 30 = 42 7 * 6 = 42 x ** 2"
).split()

TEXTS = [
    "hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café — 数学 🙂 emoji 🚀!",
    "12 + 30 = 42\n7 * 6 = 42",
    "tabs\tand  two  spaces\n\nblank lines",
    "rare ♞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ ∫",  # characters the vocabularies never saw: byte fallback
]


def corpus(n: int = 150, seed: int = 0) -> list[str]:
    """~15 KB of varied documents: prose, code-like lines, arithmetic, multi-byte text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            for _ in range(rng.randint(1, 4))
        ]
        indent = "    " if i % 3 == 0 else ""
        docs.append(("\n" + indent).join(lines) + ("\n" if i % 2 else ""))
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{"sentencepiece": spec, "bpe": spec} trained on `corpus()`."""
    root = tmp_path_factory.mktemp("tok")
    return {
        kind: train_tokenizer(corpus(), kind=kind, vocab_size=400, out_dir=str(root / kind))
        for kind in ("sentencepiece", "bpe")
    }


@pytest.fixture(scope="module", params=["byte", "sentencepiece", "bpe"])
def tok(request, trained):
    return load_tokenizer("byte" if request.param == "byte" else trained[request.param])


def body(tok, text):
    return tok.encode(text, add_bos=False, add_eos=False)


def test_byte_tokenizer_token_bytes_and_spec():
    tok = ByteTokenizer()
    np.testing.assert_array_equal(tok.token_bytes, [0, 0, 0] + [1] * 256)
    assert tok.token_bytes.dtype == np.int32 and not tok.token_bytes.flags.writeable
    assert (tok.spec, tok.files()) == ("byte", [])
    assert load_tokenizer("byte") == tok and load_tokenizer(" byte ") == tok
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_token_bytes(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))  # BOS/EOS count 0
    assert tok.token_bytes[body(tok, text)].sum() == len(text.encode("utf-8"))


def test_protocol_fields(tok):
    assert isinstance(tok, Tokenizer)
    assert tok.token_bytes.shape == (tok.vocab_size,) and tok.token_bytes.dtype == np.int32
    assert tok.token_bytes[[tok.pad_id, tok.bos_id, tok.eos_id]].tolist() == [0, 0, 0]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode([tok.pad_id, tok.bos_id, tok.eos_id]) == ""
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode([3, tok.vocab_size])
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_ids_are_the_librarys(trained, text):
    tok = load_tokenizer(trained["sentencepiece"])
    path = trained["sentencepiece"].removeprefix("sentencepiece:")
    ref = sentencepiece.SentencePieceProcessor(model_file=path)
    assert ref.bos_id() == 1 and ref.eos_id() == 2 and ref.pad_id() == 0
    np.testing.assert_array_equal(body(tok, text), ref.encode(text))
    np.testing.assert_array_equal(tok.encode(text), [1, *ref.encode(text), 2])
    assert tok.vocab_size == ref.get_piece_size() == 400
    assert tok.files() == [path] and tok.dummy_prefix_bytes == 0


@pytest.mark.parametrize("text", TEXTS)
def test_hf_ids_are_the_librarys(trained, text):
    tok = load_tokenizer(trained["bpe"])
    directory = trained["bpe"].removeprefix("hf:")
    ref = tokenizers.Tokenizer.from_file(f"{directory}/tokenizer.json")
    ids = ref.encode(text, add_special_tokens=False).ids
    np.testing.assert_array_equal(body(tok, text), ids)
    np.testing.assert_array_equal(tok.encode(text, add_eos=False), [1, *ids])
    assert tok.files() == [f"{directory}/tokenizer.json", f"{directory}/tokenizer_config.json"]
    assert tok.dummy_prefix_bytes == 0


def test_sentencepiece_token_bytes_per_piece(trained):
    tok = load_tokenizer(trained["sentencepiece"])
    sp = sentencepiece.SentencePieceProcessor(model_file=tok.files()[0])
    pieces = {sp.id_to_piece(i): int(tok.token_bytes[i]) for i in range(tok.vocab_size)}
    assert pieces["<0xE2>"] == 1 and pieces["<unk>"] == 0 and pieces["<s>"] == 0
    assert pieces["\u2581"] == 1  # "▁" decodes to a space
    assert all(n == len(p.replace("\u2581", " ").encode()) for p, n in pieces.items() if n > 1)


def test_gpt2_byte_table():
    table = gpt2_unicode_to_byte()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256
    assert table["!"] == 33 and table["\u0120"] == 32 and table["\u010a"] == 10  # Ġ, Ċ
    assert table["\u0100"] == 0 and table["ÿ"] == 255
    byte_level = pre_tokenizers.ByteLevel.alphabet()  # the library's own 256 characters
    assert set(table) == set(byte_level)


def gpt2_style(directory, specials=("<|endoftext|>",), config=None):
    """A byte-level BPE tokenizer.json whose only special token is GPT-2's <|endoftext|>."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(40), trainer=trainer)
    directory.mkdir(exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_gpt2_style_uses_eos_as_bos_and_pads_with_eos_or_pad_id(tmp_path):
    ref = gpt2_style(tmp_path / "gpt2")
    eot = ref.token_to_id("<|endoftext|>")
    for spec in (f"hf:{tmp_path}/gpt2", f"hf:{tmp_path}/gpt2/tokenizer.json"):
        tok = load_tokenizer(spec)
        assert tok.spec == spec
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)
        assert tok.files() == [f"{tmp_path}/gpt2/tokenizer.json"]
        assert tok.decode(tok.encode("naïve 🙂")) == "naïve 🙂"
    tok = load_tokenizer(f"hf:{tmp_path}/gpt2", pad_id=5)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, 5)
    with pytest.raises(DataError, match="pad id"):
        load_tokenizer(f"hf:{tmp_path}/gpt2", pad_id=10**6)


def test_tokenizer_config_names_the_specials(tmp_path):
    config = {"bos_token": {"content": "<B>"}, "eos_token": "<E>", "pad_token": None}
    ref = gpt2_style(tmp_path, specials=("<s>", "</s>", "<B>", "<E>", "<pad>"), config=config)
    tok = load_tokenizer(f"hf:{tmp_path}")
    assert tok.bos_id == ref.token_to_id("<B>") and tok.eos_id == ref.token_to_id("<E>")
    assert tok.pad_id == ref.token_to_id("<pad>")  # not named: found by its common name
    assert tok.files()[1] == f"{tmp_path}/tokenizer_config.json"


def test_hf_without_eos_is_rejected(tmp_path):
    gpt2_style(tmp_path, specials=("<mask>",))
    with pytest.raises(DataError, match="data.tokenizer.*end-of-sequence"):
        load_tokenizer(f"hf:{tmp_path}")


def metaspace_style(path, scheme):
    """A SentencePiece-style tokenizer.json (Metaspace, byte-fallback pieces <0xAB> in the
    model's vocabulary, as in Llama's), trained with `tokenizers`."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.decoder = decoders.Sequence(
        [decoders.Metaspace(prepend_scheme=scheme), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus(60), trainer=trainer)
    config = json.loads(tok.to_str())
    vocab = config["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    config["model"]["byte_fallback"] = True
    path.write_text(json.dumps(config))
    return tokenizers.Tokenizer.from_file(str(path))


@pytest.mark.parametrize("scheme, prefix", [("never", 0), ("always", 1)])
def test_hf_metaspace_counts_the_space_mark_and_byte_pieces(tmp_path, scheme, prefix):
    ref = metaspace_style(tmp_path / "tokenizer.json", scheme)
    tok = load_tokenizer(f"hf:{tmp_path}")
    assert tok.dummy_prefix_bytes == prefix
    for text in TEXTS:
        ids = body(tok, text)
        np.testing.assert_array_equal(ids, ref.encode(text, add_special_tokens=False).ids)
        assert tok.token_bytes[ids].sum() == len(text.encode()) + prefix
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_bytes[ref.token_to_id("<0xE2>")] == 1
    assert tok.token_bytes[ref.token_to_id("\u2581")] == 1
    assert tok.token_bytes[ref.token_to_id("<unk>")] == 0


def test_hf_wordpiece_drops_the_continuation_prefix(tmp_path):
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "hel": 4, "##lo": 5, "wor": 6}
    vocab["##ld"] = 7
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(f"hf:{tmp_path}")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 3)  # [CLS], [SEP], [PAD]
    assert ours.token_bytes.tolist() == [0, 0, 0, 0, 3, 2, 3, 2]
    assert ours.decode(ours.encode("hello world")) == "hello world"


def test_sentencepiece_dummy_prefix_is_counted_exactly(tmp_path):
    """A model with SentencePiece's default add_dummy_prefix counts 1 byte more per text."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(60)),
        model_prefix=str(tmp_path / "dummy"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
    )  # defaults: unk=0, bos=1, eos=2, no pad; add_dummy_prefix=True
    tok = load_tokenizer(f"sentencepiece:{tmp_path}/dummy.model")
    assert tok.dummy_prefix_bytes == 1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad: pads with EOS
    text = "the quick fox"
    assert tok.token_bytes[body(tok, text)].sum() == len(text) + 1
    assert tok.decode(tok.encode(text)) == text


def test_pickles_with_its_pad_id(trained):
    for spec in trained.values():
        tok = load_tokenizer(spec, pad_id=7)
        copy = pickle.loads(pickle.dumps(tok))
        assert type(copy) is type(tok) and copy.pad_id == tok.pad_id == 0  # own pad wins
        np.testing.assert_array_equal(copy.encode("café 🙂"), tok.encode("café 🙂"))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("wordpiece:/x", "unknown tokenizer kind"),
        ("", "unknown tokenizer kind"),
        ("byte:/x", "takes no path"),
        ("hf:", "names no file"),
        ("sentencepiece:{tmp}/missing.model", "tokenizer_train"),
        ("hf:{tmp}/missing.json", "tokenizer_train"),
        ("sentencepiece:{tmp}/garbage.bin", "garbage.bin is not a SentencePiece model"),
        ("hf:{tmp}/garbage.bin", "garbage.bin is not a Hugging Face tokenizer.json"),
        ("hf:{tmp}/empty_dir", "holds no tokenizer.json"),
        ("hf:{tmp}/sp_dir", "sentencepiece:.*/tokenizer.model"),
    ],
)
def test_bad_specs_raise_data_error(tmp_path, spec, match):
    (tmp_path / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "sp_dir").mkdir()
    (tmp_path / "sp_dir" / "tokenizer.model").write_bytes(b"")
    with pytest.raises(DataError, match=match) as info:
        load_tokenizer(spec.format(tmp=tmp_path))
    assert "data.tokenizer" in str(info.value)


def test_bad_tokenizer_config_raises_data_error(tmp_path):
    gpt2_style(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="data.tokenizer.*tokenizer_config.json"):
        load_tokenizer(f"hf:{tmp_path}")


@pytest.mark.parametrize("kind, size", [("sentencepiece", 400), ("bpe", 400)])
def test_training_is_deterministic(tmp_path, trained, kind, size):
    again = train_tokenizer(corpus(), kind=kind, vocab_size=size, out_dir=str(tmp_path))
    first, second = load_tokenizer(trained[kind]), load_tokenizer(again)
    assert first.files()[0] != second.files()[0]
    for a, b in zip(first.files(), second.files()):
        assert open(a, "rb").read() == open(b, "rb").read()
    if kind == "sentencepiece":
        assert second.vocab_size == size  # SentencePiece fills the vocabulary exactly
    else:  # BPE stops when no pair repeats: at most the request (here the corpus runs out)
        assert 259 < second.vocab_size <= size


def test_bpe_reaches_the_requested_size_when_the_corpus_allows(tmp_path):
    spec = train_tokenizer(corpus(), kind="bpe", vocab_size=300, out_dir=str(tmp_path))
    assert spec == f"hf:{tmp_path}" and load_tokenizer(spec).vocab_size == 300


@pytest.mark.parametrize(
    "kind, size", [("bpe", 258), ("sentencepiece", 260), ("sentencepiece", 270)]
)
def test_too_small_vocab_size_names_the_flag(tmp_path, kind, size):
    with pytest.raises(DataError, match="--vocab_size"):
        train_tokenizer(corpus(), kind=kind, vocab_size=size, out_dir=str(tmp_path))


def test_unknown_kind_names_the_flag(tmp_path):
    with pytest.raises(DataError, match="--kind"):
        train_tokenizer(["x"], kind="unigram", vocab_size=500, out_dir=str(tmp_path))


def test_capped_stops_at_max_bytes():
    texts = ["ab", "cdé", "fgh"]  # 2, 4, 3 bytes
    assert list(capped(texts, 100)) == texts
    assert list(capped(texts, 5)) == ["ab", "cd"]  # "é" would be cut in half: dropped
    assert list(capped(texts, 6)) == ["ab", "cdé"]


def test_run_cli_prints_the_flags(tmp_path, capsys):
    spec = run_cli(
        iter(corpus()), kind="sentencepiece", vocab_size=400, out_dir=str(tmp_path), max_bytes=8000
    )
    out = capsys.readouterr().out
    assert f"--config.data.tokenizer={spec} --config.model.vocab_size=400" in out
    assert "read 8,000 bytes" in out


def test_long_multibyte_texts_are_cut_into_sentences_sentencepiece_keeps(tmp_path):
    text = "数学中文🙂 " * 1000 + "\n" + "naïve café " * 400  # ~17 KB, one line of 6000 chars
    pieces = list(_chunks([text], SP_CHUNK_CHARS))
    assert "".join(pieces) == text and max(map(len, pieces)) <= SP_CHUNK_CHARS
    for before, after in zip(pieces, pieces[1:]):  # cut after a newline or before a space
        assert before.endswith("\n") or after.startswith(" ")
    assert "".join(_chunks(["x" * 5000], SP_CHUNK_CHARS)) == "x" * 5000
    spec = train_tokenizer([text], kind="sentencepiece", vocab_size=300, out_dir=str(tmp_path))
    tok = load_tokenizer(spec)
    assert len(body(tok, "数学中文🙂 ")) < len("数学中文🙂 ".encode())  # learned, not bytes


def test_cli_trains_on_a_source_list_and_prints_the_flags(tmp_path):
    (tmp_path / "docs.jsonl").write_text(
        "".join(
            json.dumps({"body": f"expert {i} routes token {i * 7}\n" * 5}) + "\n" for i in range(60)
        )
    )
    out = tmp_path / "tok"
    proc = run_module(
        "moejax.data.tokenizer_train",
        f"--sources=jsonl:{tmp_path}/*.jsonl#body",
        "--vocab_size=300",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"--config.data.tokenizer=hf:{out}" in proc.stdout
    tokenizer = load_tokenizer(f"hf:{out}")
    assert f"--config.model.vocab_size={tokenizer.vocab_size}" in proc.stdout
    assert (
        tokenizer.decode(tokenizer.encode("expert 3 routes token 21")) == "expert 3 routes token 21"
    )


def test_corpus_bpe_is_built_once_on_first_use(corpus_dir, corpus):
    """`data.tokenizer=corpus_bpe:N`: trained on the corpus's training split, then reused."""
    cfg = DataConfig(
        data_dir=corpus_dir,
        max_bytes_per_domain=corpus.builder_config.max_bytes_per_domain,
        tokenizer="corpus_bpe:400",
    )
    first = open_tokenizer(cfg)
    path = first.files()[0]
    built = os.path.getmtime(path)
    again = open_tokenizer(cfg)
    assert again.files() == first.files() and os.path.getmtime(path) == built
    assert 259 < first.vocab_size <= 400
    text = corpus.as_data_source()["validation"][0]["text"].decode("utf-8")
    ids = first.encode(text, add_bos=False, add_eos=False)
    assert first.decode(ids) == text and len(ids) < len(text.encode("utf-8")) / 1.5
    with pytest.raises(DataError, match="corpus_bpe:N"):
        open_tokenizer(dataclasses.replace(cfg, tokenizer="corpus_bpe:many"))
