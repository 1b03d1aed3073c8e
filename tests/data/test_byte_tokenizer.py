"""ByteTokenizer: the id layout, round trips and the handling of bad input."""

import numpy as np
import pytest

from moejax.data import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer


def test_layout():
    tok = ByteTokenizer()
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.vocab_size == VOCAB_SIZE == 259
    ids = tok.encode("Ab")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [1, ord("A") + 3, ord("b") + 3, 2])
    np.testing.assert_array_equal(tok.encode("Ab", add_bos=False, add_eos=False), [68, 101])
    np.testing.assert_array_equal(tok.encode("", add_bos=True, add_eos=False), [1])
    assert tok.encode("\x00\xff", add_bos=False, add_eos=False).tolist() == [3, 198, 194]


@pytest.mark.parametrize(
    "text", ["", "hello", "def f(x):\n\treturn x ** 2\n", "naïve café — 数学 🙂", "12 + 30 = 42"]
)
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert ids.min() >= 1 and ids.max() < 259
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    np.testing.assert_array_equal(tok.encode_bytes(text.encode("utf-8")), ids)


def test_decode_skips_specials_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = [0, 1] + (tok.encode("hé", add_bos=False, add_eos=False)).tolist() + [2, 0, 0]
    assert tok.decode(ids) == "hé"
    cut = tok.encode("é", add_bos=False, add_eos=False)[:1]  # first byte of two
    assert tok.decode(cut) == "\ufffd"


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer().decode([5, 259])
    with pytest.raises(TypeError, match="encode_bytes"):
        ByteTokenizer().encode(b"bytes")
