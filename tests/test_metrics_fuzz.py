"""Property tests for the coco-caption metrics: any text gives scores in range and never hangs.

BLEU, ROUGE-L and CIDEr (pure Python) run on every example; the Java paths (PTB tokeniser, METEOR)
on a few examples only, since each METEOR start costs ~5 s.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from show_attend_tell import metrics as caption_metrics
from show_attend_tell.metrics import compute_caption_metrics, java_available, ptb_like_tokenize

impl = caption_metrics._impl()
needs_java = pytest.mark.skipif(not java_available(), reason="needs a Java runtime")

# Caption-like words mixed with the characters that break naive pipelines: line breaks of every kind,
# METEOR's field separator, punctuation the tokeniser drops, brackets, non-ASCII and astral characters.
WORDS = ["a", "dog", "man", "runs", "on", "the", "grass", "red", "shirt", "two", "people", "sitting"]
AWKWARD = [
    "\n",
    "\r\n",
    "\t",
    "\x0b",
    "\x85",
    "\u2028",
    "|||",
    "|",
    ".",
    "...",
    ",",
    "'s",
    "n't",
    "(",
    ")",
    '"',
]
AWKWARD += [
    "-",
    "--",
    "—",
    "…",
    "é",
    "猫",
    "😀",
    "\x00",
    "\u200b",
    "\u00ad",
    " ",
    "  ",
    "Mr.",
    "U.S.",
    "1,000",
]
piece = st.one_of(st.sampled_from(WORDS), st.sampled_from(AWKWARD), st.text(max_size=8))
caption = st.lists(piece, max_size=25).map(
    lambda parts: " ".join(parts) if parts and len(parts) % 2 else "".join(parts)
)
any_caption = st.one_of(caption, st.text(max_size=60))


def corpora(min_size: int, max_size: int) -> st.SearchStrategy[tuple[list[str], list[list[str]]]]:
    """(predictions, references) with one list of 1 to 4 references per prediction."""
    return st.integers(min_value=min_size, max_value=max_size).flatmap(
        lambda n: st.tuples(
            st.lists(any_caption, min_size=n, max_size=n),
            st.lists(st.lists(any_caption, min_size=1, max_size=4), min_size=n, max_size=n),
        )
    )


corpus = corpora(1, 6)

RANGE_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_range(scores: dict[str, float]) -> None:
    for key, value in scores.items():
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        upper = 10.0 + 1e-9 if key == "cider" else 1.0
        assert 0.0 <= value <= upper, (key, value)


@RANGE_SETTINGS
@given(corpus)
def test_pure_python_metrics_are_in_range(data):
    predictions, references = data
    scores = compute_caption_metrics(
        predictions, references, metrics=("bleu", "rouge", "cider"), tokenizer="approximate"
    )
    assert set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}
    check_range(scores)


@settings(max_examples=60, deadline=None)
@given(corpus, st.randoms(use_true_random=False))
def test_corpus_scores_do_not_depend_on_order(data, rng):
    predictions, references = data
    order = list(range(len(predictions)))
    rng.shuffle(order)
    first = compute_caption_metrics(
        predictions, references, metrics=("bleu", "rouge", "cider"), tokenizer="approximate"
    )
    second = compute_caption_metrics(
        [predictions[i] for i in order],
        [references[i] for i in order],
        metrics=("bleu", "rouge", "cider"),
        tokenizer="approximate",
    )
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == pytest.approx(second[key], rel=1e-9, abs=1e-12), key


@settings(max_examples=200, deadline=None)
@given(any_caption)
def test_python_tokenizer_output_is_clean(text):
    tokens = ptb_like_tokenize(text)
    assert tokens == tokens.strip()
    parts = tokens.split(" ") if tokens else []
    assert all(parts), "no empty tokens (double spaces)"
    assert not any(ch.isspace() and ch != " " for ch in tokens)
    assert not set(parts) & {".", ",", "!", "?", ";", ":", "-", "--", "...", "'", "''", "`", "``"}


token_lists = st.lists(st.sampled_from(["a", "b", "c", "d", ""]), max_size=14)


@settings(max_examples=300, deadline=None)
@given(token_lists, token_lists)
def test_fast_lcs_equals_pycocoevalcap(a, b):
    from pycocoevalcap.rouge.rouge import my_lcs

    assert impl._lcs_length(a, b) == my_lcs(a, b)


@settings(max_examples=100, deadline=None)
@given(corpus)
def test_rouge_l_equals_pycocoevalcap(data):
    from pycocoevalcap.rouge.rouge import Rouge

    predictions, references = data
    hyps = [ptb_like_tokenize(p) for p in predictions]
    refs = [[ptb_like_tokenize(r) for r in rs] for rs in references]
    expected, _ = Rouge().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    )
    assert impl._rouge_l(refs, hyps) == pytest.approx(float(expected), abs=1e-12)


def test_long_random_captions_finish():
    # Thousands of tokens per caption: pycocoevalcap's quadratic LCS table would take minutes here.
    rng = random.Random(0)
    long_caption = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    predictions = [long_caption(5000), long_caption(3), ""]
    references = [[long_caption(4000), long_caption(10)], [long_caption(3)], [long_caption(7)]]
    check_range(
        compute_caption_metrics(
            predictions, references, metrics=("bleu", "rouge", "cider"), tokenizer="approximate"
        )
    )


@needs_java
@settings(max_examples=8, deadline=None)
@given(st.lists(any_caption, min_size=1, max_size=30))
def test_ptb_tokenizer_keeps_one_line_per_caption(texts):
    tokens = impl._ptb_tokenize(texts, impl._find_java(), 60)
    assert len(tokens) == len(texts)
    assert all("\n" not in t and "\r" not in t for t in tokens)
    for text, tok in zip(texts, tokens, strict=True):
        if not impl.clean_text(text):
            assert tok == ""


@needs_java
@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(corpora(5, 30))  # each example starts METEOR (~5 s), so make each one count
def test_meteor_is_in_range_and_does_not_hang(data):
    predictions, references = data
    scores = compute_caption_metrics(predictions, references, metrics=("meteor", "bleu"), meteor_timeout=120)
    assert "meteor" in scores, "METEOR was dropped"
    check_range(scores)
