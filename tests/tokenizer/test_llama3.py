"""The Llama 3 tokenizer against the reference `llama_models.llama3.tokenizer.Tokenizer`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.tokenizer import llama3
from tests.tokenizer.corpus import CORPUS


@pytest.fixture(scope="module")
def reference():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def tok():
    return llama3()


def test_vocabulary_and_special_tokens_match_reference(tok, reference):
    assert tok.vocab_size == reference.n_words == 128_256
    assert tok.special_tokens == reference.special_tokens
    assert (tok.bos_id, tok.eos_id) == (reference.bos_id, reference.eos_id) == (128000, 128001)
    assert set(tok.stop_ids) == set(reference.stop_tokens) == {128001, 128008, 128009}
    assert tok.special_tokens["<|eot_id|>"] == 128009
    assert tok.special_tokens["<|python_tag|>"] == 128010
    assert tok.special_tokens["<|image|>"] == 128011
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_match_reference(tok, reference, text):
    for bos, eos in ((False, False), (True, True)):
        assert tok.encode(text, bos=bos, eos=eos) == reference.encode(text, bos=bos, eos=eos)
    assert tok.decode(tok.encode(text)) == text


def _long_inputs() -> dict[str, str]:
    mixed = "".join(CORPUS)
    return {
        "1MB mixed": (mixed * (1_000_000 // len(mixed) + 1))[:1_000_000],
        "whitespace runs around 25k": " " * 25_000 + "a" + " " * 25_001 + "b" + "\n" * 60_000,
        "non-whitespace runs around 25k": "x" * 25_000 + " " + "y" * 25_001 + " " + "z" * 80_003,
        "run across the 400k slice edge": "ab " * 133_000 + "q" * 40_000 + "tail",
        "one char type, 1MB": "\u00e9" * 1_000_000,
        "space run across slice edge": "w" * 390_000 + " " * 30_000 + "end",
    }


@pytest.mark.parametrize("name", list(_long_inputs()))
def test_huge_and_adversarial_inputs_match_reference(tok, reference, name):
    text = _long_inputs()[name]
    ids = tok.encode(text)
    assert ids == reference.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


def test_user_text_never_becomes_special(tok, reference):
    text = "please say <|eot_id|> then <|begin_of_text|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert ids == reference.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text
    trusted = tok.encode(text, special=True)
    assert 128009 in trusted and 128000 in trusted
    assert trusted == reference.encode(text, bos=False, eos=False, allowed_special="all")


def test_encode_batch_equals_encode(tok):
    texts = CORPUS * 3
    expected = [tok.encode(t, bos=True) for t in texts]
    assert tok.encode_batch(texts, bos=True, num_threads=2) == expected
    assert tok.encode_batch(texts, bos=True, num_threads=1) == expected
    arrays = tok.encode_batch_numpy(texts, bos=True, eos=True, num_threads=2)
    assert all(a.dtype == np.uint32 for a in arrays)
    assert [a.tolist() for a in arrays] == [tok.encode(t, bos=True, eos=True) for t in texts]
    long = _long_inputs()["non-whitespace runs around 25k"]
    assert tok.encode_batch_numpy([long])[0].tolist() == tok.encode(long)


def test_bad_input_errors(tok):
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"\[128256\].*outside"):
        tok.decode([1, 128256])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-3])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_stream_decoder_emits_whole_characters_only(tok, text):
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    deltas = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    # valid text never shows a replacement character mid-stream, even when a character's
    # bytes are split across tokens
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 128_255), max_size=40))
def test_stream_decoder_equals_decode_on_arbitrary_ids(tok, ids):
    stream = tok.stream_decoder()
    assert stream.extend(ids) + stream.flush() == tok.decode(ids)


def test_stream_decoder_holds_back_split_characters(tok):
    # byte-level tokens 'ð', '\x9f', ... split the emoji's four bytes across ids
    pieces = [tok.ranks[bytes([b])] for b in "🎉".encode()]
    stream = tok.stream_decoder()
    assert [stream.add(i) for i in pieces] == ["", "", "", "🎉"]
    assert stream.flush() == ""
    stream = tok.stream_decoder()
    assert stream.extend(pieces[:2]) == ""
    assert stream.flush() == "\ufffd"


@pytest.mark.parametrize("offset", [0, 1, 12_499, 12_500, 12_501, 24_999, 37_501, 374_999])
@pytest.mark.parametrize("length", [25_000, 25_001, 50_001])
@pytest.mark.parametrize("char", ["q", " "])
def test_long_runs_anywhere_are_cut_like_the_reference(tok, reference, offset, length, char):
    other = " " if char == "q" else "q"
    filler = (other + "ab") * (offset // 3 + 1)
    text = filler[:offset] + char * length + filler[: 400_000 - offset - length]
    assert tok.encode(text) == reference.encode(text, bos=False, eos=False)


def test_lone_surrogates_are_repaired_like_the_reference(tok, reference):
    text = "a\ud800b \udfff x " * 3
    assert tok.encode(text) == reference.encode(text, bos=False, eos=False)
    assert tok.encode(text * 20_000) == reference.encode(text * 20_000, bos=False, eos=False)
