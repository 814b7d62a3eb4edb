"""The emulator tokenizer: deterministic ids, readable round trips, bounded vocabulary."""

from __future__ import annotations

import pytest

from loadtest.emulator.tokenizer import Tokenizer, placeholder_word

TEXT = "Hello, world! The parser (v2) reads 3 files; it fails: 'no such key'."


def test_encode_is_deterministic_across_instances():
    assert Tokenizer().encode(TEXT) == Tokenizer().encode(TEXT)
    assert Tokenizer(key=b"other").encode(TEXT) != Tokenizer().encode(TEXT)


def test_ids_are_in_range_and_avoid_special_ids():
    tok = Tokenizer(vocab_size=1000)
    ids = tok.encode(TEXT * 3)
    assert all(2 <= i < 1000 for i in ids)
    assert tok.eos_token_id == 1


def test_round_trip_reproduces_words_and_punctuation():
    tok = Tokenizer()
    ids = tok.encode(TEXT)
    assert tok.split(tok.decode(ids)) == tok.split(TEXT)
    assert tok.decode(tok.encode("a, b.")) == "a, b."


def test_same_word_same_id_in_any_context():
    tok = Tokenizer()
    a = tok.encode("the cat sat on the mat")
    assert a[0] == a[4]
    assert tok.token_id("cat") == a[1]


def test_unknown_ids_decode_to_deterministic_placeholders():
    tok = Tokenizer()
    text = tok.decode([5000, 5001, 5000])
    words = text.split(" ")
    assert words[0] == words[2] == placeholder_word(5000)
    assert words[1] != words[0]
    assert all(w.isalpha() for w in words)
    assert Tokenizer().decode([5000, 5001, 5000]) == text


def test_special_ids_have_no_text_and_out_of_range_ids_are_rejected():
    tok = Tokenizer(vocab_size=100)
    ids = tok.encode("stop")
    assert tok.decode([*ids, tok.eos_token_id]) == "stop"
    with pytest.raises(ValueError, match="token id 100"):
        tok.decode([100])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer(vocab_size=2)
    with pytest.raises(TypeError, match="text must be a string"):
        Tokenizer().encode(b"bytes")  # type: ignore[arg-type]


def test_remembered_words_are_bounded_by_vocab():
    tok = Tokenizer(vocab_size=50)
    tok.encode(" ".join(f"w{i}" for i in range(500)))
    assert tok.known_words() <= 48
