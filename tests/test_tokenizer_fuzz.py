"""Property-based tests: the tokenizer takes any text without error and round-trips its own words."""

from __future__ import annotations

import pytest
from conftest import CAPTIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from show_attend_tell import ShowAttendTellTokenizer

TOKENIZER = ShowAttendTellTokenizer.train_from_captions(CAPTIONS, min_freq=5)
WORDS = [word for word in TOKENIZER.get_vocab() if not word.startswith("<")]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.text())
def test_any_unicode_text_encodes_and_decodes(text):
    ids = TOKENIZER(text, truncation=True)["input_ids"]
    assert ids[0] == TOKENIZER.bos_token_id and ids[-1] == TOKENIZER.eos_token_id
    assert len(ids) <= TOKENIZER.model_max_length
    assert all(0 <= i < len(TOKENIZER) for i in ids)
    decoded = TOKENIZER.decode(ids, skip_special_tokens=True)
    assert isinstance(decoded, str) and "\n" not in decoded
    # every decoded word is a vocabulary word or <unk>
    assert all(word in WORDS or word == "<unk>" for word in decoded.split())


@SETTINGS
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=50), st.sampled_from([" ", "  ", "\t", " , "]))
def test_in_vocabulary_text_round_trips(words, separator):
    text = separator.join(words)
    ids = TOKENIZER(text)["input_ids"]
    assert TOKENIZER.decode(ids, skip_special_tokens=True) == " ".join(words)


@SETTINGS
@given(st.lists(st.sampled_from(WORDS), max_size=30))
def test_case_and_punctuation_do_not_change_the_ids(words):
    text = " ".join(words)
    shouted = ", ".join(word.upper() for word in words) + "!"
    assert TOKENIZER(shouted)["input_ids"] == TOKENIZER(text)["input_ids"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "!!!", "\x00\x01", "🙂🙂", "ß" * 1000, "a\u200bb"])
def test_degenerate_text(text):
    ids = TOKENIZER(text, truncation=True)["input_ids"]
    assert ids[0] == TOKENIZER.bos_token_id and ids[-1] == TOKENIZER.eos_token_id
    TOKENIZER.decode(ids, skip_special_tokens=True)
