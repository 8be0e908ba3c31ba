"""coco-caption metrics: values against independent references, the evaluate module, failure modes.

Reference values come from code that does not go through our wrapper: nltk's corpus BLEU, the METEOR
jar called directly in file mode, pycocoevalcap's own classes (PTBTokenizer, Bleu, Meteor, Rouge,
Cider), and CIDEr values worked out by hand.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

from show_attend_tell import metrics as caption_metrics
from show_attend_tell.metrics import (
    DEFAULT_METRICS,
    METRIC_PATH,
    compute_caption_metrics,
    java_available,
    load_metric,
    ptb_like_tokenize,
)

impl = caption_metrics._impl()
needs_java = pytest.mark.skipif(not java_available(), reason="needs a Java runtime")
NO_JAVA_METRICS = ("bleu", "rouge", "cider")

PREDICTIONS = [
    "A man in a red shirt is riding a brown horse.",
    "Two dogs are playing with a ball on the grass",
    "A woman sitting on a bench reads a book.",
    "a child jumps into the swimming pool",
    "A group of people standing in front of a building.",
]
REFERENCES = [
    [
        "A man wearing a red shirt rides a horse.",
        "A person on a brown horse.",
        "A man is riding a horse in a field.",
    ],
    [
        "Two dogs play with a ball in the grass.",
        "Two brown dogs are chasing a ball.",
        "Dogs playing outside.",
    ],
    ["A woman reads a book while sitting on a bench.", "A lady sits on a park bench reading."],
    ["A young boy jumps into a pool.", "A child is jumping into the swimming pool.", "A kid in the water."],
    [
        "People stand in front of a large building.",
        "A crowd of people outside a building.",
        "Several people standing near a building.",
    ],
]


def run_with_deadline(fn, seconds: float):
    """Run ``fn()`` in a thread; fail (instead of hanging the test session) if it takes too long."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised in the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]


def assert_in_range(scores: dict[str, float]) -> None:
    for key, value in scores.items():
        assert isinstance(value, float), key
        assert math.isfinite(value), key
        if key == "cider":
            assert 0.0 <= value <= 10.0 + 1e-9
        else:
            assert 0.0 <= value <= 1.0, key


def fake_java(tmp_path: Path, body: str) -> Path:
    """A folder holding a `java` script that answers `-version` and then does ``body``."""
    folder = tmp_path / "fakejava"
    folder.mkdir()
    script = folder / "java"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "-version" ]; then exit 0; fi\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


# ------------------------------------------------------------------------------------------ BLEU


def test_identical_hypotheses_and_references_give_bleu_one():
    refs = [[p] for p in PREDICTIONS]
    scores = compute_caption_metrics(PREDICTIONS, refs, metrics=NO_JAVA_METRICS, tokenizer="approximate")
    for n in range(1, 5):
        # coco's BleuScorer adds 1e-15 / 1e-9 to avoid 0/0, so "1" is 1 - O(1e-10).
        assert scores[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-8)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}


BLEU_PREDICTIONS = [
    "a man rides a brown horse",  # 6 tokens: refs of 5 and 7 tokens tie, the shorter one counts
    "two dogs play with a ball",
    "a woman reads a book",
    "a child jumps into the pool",
]
BLEU_REFERENCES = [
    ["a man riding a horse", "a man is riding a brown horse"],
    ["two dogs play with a ball in the grass", "two brown dogs are chasing a red ball"],
    ["a woman reads a book on a bench", "a lady is reading a book in the park"],
    ["a young child jumps into the swimming pool", "a kid jumps into the pool"],
]


@pytest.mark.parametrize("corpus", ["short-hypotheses", "mixed"])
def test_bleu_matches_nltk_corpus_bleu(corpus):
    from nltk.translate.bleu_score import corpus_bleu

    preds, refs = (
        (BLEU_PREDICTIONS, BLEU_REFERENCES) if corpus == "short-hypotheses" else (PREDICTIONS, REFERENCES)
    )
    # Same tokens for both: coco's BLEU splits the tokenised caption on spaces.
    hyp_tokens = [ptb_like_tokenize(p).split() for p in preds]
    ref_tokens = [[ptb_like_tokenize(r).split() for r in rs] for rs in refs]
    # Both are corpus-level (clipped n-gram counts and lengths summed over the corpus, then the
    # geometric mean of the 1..n precisions) with the closest reference length, ties going to the
    # shorter reference. They differ only where a precision is 0 (nltk: 0, coco: ~1e-6 from its
    # smoothing constants), so make sure every order has matches.
    for n in range(1, 5):
        matches = sum(
            1
            for hyp, rs in zip(hyp_tokens, ref_tokens, strict=True)
            for i in range(len(hyp) - n + 1)
            if any(tuple(hyp[i : i + n]) in {tuple(r[j : j + n]) for j in range(len(r))} for r in rs)
        )
        assert matches > 0
    if corpus == "short-hypotheses":
        # The brevity penalty is active here, so the closest-reference rule really matters.
        closest = [
            min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
            for h, rs in zip(hyp_tokens, ref_tokens, strict=True)
        ]
        assert sum(len(h) for h in hyp_tokens) < sum(closest)

    ours = compute_caption_metrics(preds, refs, metrics=("bleu",), tokenizer="approximate")
    for n in range(1, 5):
        expected = corpus_bleu(ref_tokens, hyp_tokens, weights=tuple([1.0 / n] * n))
        assert round(ours[f"bleu_{n}"], 4) == round(expected, 4), n
        assert ours[f"bleu_{n}"] == pytest.approx(expected, abs=1e-6), n


def test_approximate_bleu_never_starts_java(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("approximate BLEU must not start a subprocess")

    monkeypatch.setattr(impl.subprocess, "Popen", forbidden)
    monkeypatch.setattr(impl.subprocess, "run", forbidden)
    monkeypatch.setattr(impl, "_find_java", forbidden)
    scores = compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=("bleu",), tokenizer="approximate")
    assert sorted(scores) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]
    assert_in_range(scores)
    # A single name given as a string is not taken for a sequence of letters.
    assert compute_caption_metrics(PREDICTIONS, REFERENCES, metrics="bleu", tokenizer="approximate") == scores


# ----------------------------------------------------------------------------------------- CIDEr


def test_cider_of_a_corpus_of_identical_captions_is_zero():
    # Every n-gram occurs in the references of all N images, so its idf is log(N) - log(N) = 0:
    # every tf-idf vector is zero and CIDEr is 0, however good the captions.
    caption = "a dog runs on the grass"
    scores = compute_caption_metrics(
        [caption] * 6, [[caption, caption]] * 6, metrics=("cider",), tokenizer="approximate"
    )
    assert scores == {"cider": 0.0}


def test_cider_of_perfect_distinct_captions_is_ten():
    # Each hypothesis equals all its references and has n-grams no other image has: the cosine
    # similarity is 1 for n = 1..4 with no length penalty, so each image scores 10 * mean(1, 1, 1, 1).
    captions = ["a dog runs on the grass", "two cats sleep under a table", "a red car parked near trees"]
    scores = compute_caption_metrics(
        captions, [[c, c] for c in captions], metrics=("cider",), tokenizer="approximate"
    )
    assert scores["cider"] == pytest.approx(10.0)


def test_cider_with_only_empty_references_is_zero():
    scores = compute_caption_metrics(
        ["a dog", ""], [[""], ["", "..."]], metrics=NO_JAVA_METRICS, tokenizer="approximate"
    )
    assert scores["cider"] == 0.0
    assert_in_range(scores)


# ------------------------------------------------------------------------------ PTB tokenisation

PLAIN_CAPTIONS = [
    "A man in a red shirt is riding a brown horse.",
    "Two young, White males are outside near many bushes.",
    "A little girl climbing into a wooden playhouse .",
    "Several men in hard hats are operating a giant pulley system.",
    "A man's dog doesn't like the black-and-white cat!",
    "The children's toys (red and blue) are on the floor.",
    'A woman says "hello" to her friend; they smile.',
    "Workers look down from up above on a piece of equipment: a crane?",
    "Two dogs' tails wag... they're happy and won't stop.",
    "A boy in a t-shirt at 5 p.m. on St. Patrick's day in the U.S.",
    "A 3-year-old child holds 1,000 dollars and $5 - really -- wow",
    "I can't believe it's 3.5 feet tall / wide & long",
    "People gather at Mr. Smith's house, etc.",
    "a dog running through the snow with a stick in its mouth",
    "A man with glasses is wearing a beer can crocheted hat.",
    "`quoted` 'single' and [bracketed] {braced} words",
]


@needs_java
def test_python_tokenizer_matches_stanford_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # pycocoevalcap's own tokenizer (the jar + its punctuation filter) is the reference.
    reference = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PLAIN_CAPTIONS)})
    for i, caption in enumerate(PLAIN_CAPTIONS):
        assert ptb_like_tokenize(caption) == reference[i][0], caption


def test_python_tokenizer_examples():
    assert ptb_like_tokenize("A man's dog doesn't run.") == "a man 's dog does n't run"
    assert ptb_like_tokenize("Two (red) cars, 1,000 miles!") == "two -lrb- red -rrb- cars 1,000 miles"
    assert ptb_like_tokenize("line\nbreak\ttab  spaces ") == "line break tab spaces"
    assert ptb_like_tokenize("Café — naïve “quote” 😀") == "café naïve quote"
    assert ptb_like_tokenize("") == ""
    assert ptb_like_tokenize(" \n\t ... !") == ""


# ---------------------------------------------------------------------------------------- METEOR


@pytest.fixture(scope="module")
def full_scores():
    """All default metrics on the small corpus (PTB tokeniser + METEOR: starts Java twice)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", caption_metrics.MetricUnavailableWarning
        )  # no metric may be dropped here
        return compute_caption_metrics(PREDICTIONS, REFERENCES)


@needs_java
@pytest.mark.slow
def test_all_metrics_match_pycocoevalcap(full_scores):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The MS-COCO evaluation recipe (pycocoevalcap's COCOEvalCap) with its own classes.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts, res)
    finally:
        # Close it here: its __del__ can hang at interpreter exit.
        meteor_scorer.meteor_p.stdin.close()
        meteor_scorer.meteor_p.kill()
        meteor_scorer.meteor_p.wait()
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)

    expected = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
    expected.update(meteor=meteor, rouge_l=rouge, cider=cider)
    assert full_scores.keys() == expected.keys()
    for key, value in expected.items():
        assert full_scores[key] == pytest.approx(float(value), abs=1e-9), key
    assert_in_range(full_scores)


@needs_java
@pytest.mark.slow
def test_meteor_matches_the_jar_run_directly(tmp_path, full_scores):
    # METEOR 1.5's own command line in file mode (not the stdio protocol our wrapper uses), with the
    # captions tokenised by pycocoevalcap's PTB tokeniser as coco-caption does.
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(REFERENCES)})
    hyps = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    n_refs = max(len(rs) for rs in REFERENCES)
    (tmp_path / "hyp.txt").write_text("".join(hyps[i][0] + "\n" for i in range(len(PREDICTIONS))))
    with open(tmp_path / "ref.txt", "w") as f:
        for i in range(len(REFERENCES)):
            # -r N reads N lines per segment; repeating a reference does not change METEOR (best match).
            padded = (refs[i] * n_refs)[:n_refs]
            f.write("".join(r + "\n" for r in padded))
    jar_dir = Path(impl._pycocoevalcap_dir("meteor"))
    proc = subprocess.run(
        [
            *("java", "-Xmx2G", "-jar", str(jar_dir / "meteor-1.5.jar")),
            *(str(tmp_path / "hyp.txt"), str(tmp_path / "ref.txt")),
            *("-l", "en", "-norm", "-r", str(n_refs)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    final = [line for line in proc.stdout.splitlines() if line.startswith("Final score:")]
    assert len(final) == 1, proc.stdout[-2000:]
    expected = float(final[0].split(":")[1])
    assert full_scores["meteor"] == pytest.approx(expected, abs=1e-9)
    assert 0.2 < expected < 0.8  # a real, non-degenerate value


@needs_java
@pytest.mark.slow
def test_hard_inputs_with_meteor_finish():
    preds = [
        "a dog\nruns",  # a newline makes raw METEOR wait for ever
        "tab\tseparated\rcarriage",
        "",
        "ünïcödé 猫 caption 😀",
        "pipes ||| inside | the caption",
        "\u2028line\u2029separators\x0b\x0c\x85",
    ]
    refs = [["a dog runs"], ["tab separated"], ["", "something"], ["unicode caption"], ["pipes"], ["\n"]]
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error", caption_metrics.MetricUnavailableWarning)
        scores = run_with_deadline(lambda: compute_caption_metrics(preds, refs, meteor_timeout=120), 150)
    assert "meteor" in scores
    assert_in_range(scores)
    assert time.monotonic() - start < 150


# ------------------------------------------------------------------ missing / stuck Java: never other numbers


def test_every_score_uses_the_official_tokenisation_by_default(monkeypatch):
    # BLEU alone used to be tokenised in Python and BLEU next to METEOR by the Java tokeniser: the same
    # captions scored differently with the metrics asked for. Now every call tokenises with the PTB tokeniser.
    calls = []

    def recording(texts, java, timeout):
        calls.append(len(texts))
        return [ptb_like_tokenize(text) for text in texts]

    monkeypatch.setattr(impl, "_find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(impl, "_ptb_tokenize", recording)
    for metrics in (("bleu",), NO_JAVA_METRICS, ("cider",)):
        compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=metrics)
    expected = len(PREDICTIONS) + sum(map(len, REFERENCES))
    assert calls == [expected] * 3


@pytest.mark.parametrize("metrics", [("bleu",), NO_JAVA_METRICS, ("meteor",), DEFAULT_METRICS])
def test_without_java_scores_are_refused_in_one_line_that_says_what_to_install(
    tmp_path, monkeypatch, metrics
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    assert not java_available()
    with pytest.raises(RuntimeError, match="no working `java`") as info:
        compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=metrics)
    message = str(info.value)
    assert "\n" not in message and "default-jre-headless" in message and "tokenizer='approximate'" in message


def test_approximate_scores_are_the_same_with_and_without_java(tmp_path, monkeypatch):
    with_java = compute_caption_metrics(
        PREDICTIONS, REFERENCES, metrics=NO_JAVA_METRICS, tokenizer="approximate"
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    assert not java_available()
    assert compute_caption_metrics(
        PREDICTIONS, REFERENCES, metrics=NO_JAVA_METRICS, tokenizer="approximate"
    ) == (with_java)
    # METEOR cannot run without Java: left out with a warning that says what to install
    with pytest.warns(caption_metrics.MetricUnavailableWarning, match="default-jre-headless"):
        scores = compute_caption_metrics(PREDICTIONS, REFERENCES, tokenizer="approximate")
    assert scores == with_java
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=("meteor",), tokenizer="approximate")
    with pytest.raises(RuntimeError, match="SPICE needs Java"):
        compute_caption_metrics(
            PREDICTIONS, REFERENCES, metrics=("bleu",), spice=True, tokenizer="approximate"
        )


def test_a_broken_java_counts_as_missing(tmp_path, monkeypatch):
    folder = tmp_path / "stub"
    folder.mkdir()
    (folder / "java").write_text("#!/bin/sh\necho 'No Java runtime present' >&2\nexit 1\n")
    (folder / "java").chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))
    assert not java_available()


def test_stuck_java_is_stopped_by_the_timeout(tmp_path, monkeypatch):
    # A `java` that never answers: the PTB tokeniser gives up after the timeout, and no scores come back;
    # with the approximate tokenisation METEOR alone gives up and the other scores come back.
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(fake_java(tmp_path, f"exec {sleep} 60")))
    start = time.monotonic()
    with pytest.raises(
        RuntimeError, match="PTB tokeniser did not finish within 1 s; no scores were computed"
    ):
        run_with_deadline(lambda: compute_caption_metrics(PREDICTIONS, REFERENCES, meteor_timeout=1.0), 30)
    with pytest.warns(caption_metrics.MetricUnavailableWarning, match="METEOR did not finish within 1 s"):
        scores = run_with_deadline(
            lambda: compute_caption_metrics(
                PREDICTIONS, REFERENCES, meteor_timeout=1.0, tokenizer="approximate"
            ),
            30,
        )
    assert "meteor" not in scores and "bleu_4" in scores
    assert time.monotonic() - start < 15


def test_crashing_java_is_reported_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "PATH",
        str(
            fake_java(
                tmp_path, "echo 'Error: Could not create the Java VM.' >&2; echo 'Exiting.' >&2; exit 1"
            )
        ),
    )
    with pytest.raises(
        RuntimeError, match=r"PTB tokeniser failed: Error: Could not create the Java VM\. Exiting\."
    ) as info:
        run_with_deadline(lambda: compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=("bleu",)), 30)
    assert "\n" not in str(info.value)
    with pytest.warns(caption_metrics.MetricUnavailableWarning, match="Could not create the Java VM"):
        scores = run_with_deadline(
            lambda: compute_caption_metrics(PREDICTIONS, REFERENCES, tokenizer="approximate"), 30
        )
    assert "meteor" not in scores and "cider" in scores


def test_spice_unavailable_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(
        impl, "_spice_jars", lambda: ("/nowhere/spice", ["/nowhere/spice/lib/stanford-corenlp-3.6.0.jar"])
    )
    monkeypatch.setattr(impl, "_find_java", lambda: "/usr/bin/java")
    with pytest.raises(RuntimeError, match=r"Stanford CoreNLP 3\.6\.0") as info:
        compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=("bleu",), spice=True)
    assert "get_stanford_models" in str(info.value)


def test_spice_plumbing_with_a_stand_in_jar(tmp_path, monkeypatch):
    # SPICE itself needs a 400 MB download; a stand-in `java` that writes SPICE's output format checks
    # the command line and the averaging (an undefined F counts as 0).
    body = (
        'while [ $# -gt 0 ]; do if [ "$1" = "-out" ]; then out="$2"; fi; shift; done\n'
        'printf \'[{"image_id": 0, "scores": {"All": {"f": 0.5}}}, '
        '{"image_id": 1, "scores": {"All": {"f": NaN}}}]\' > "$out"'
    )
    monkeypatch.setenv("PATH", str(fake_java(tmp_path, body)))
    monkeypatch.setattr(impl, "_spice_jars", lambda: (str(tmp_path), []))
    scores = compute_caption_metrics(
        ["a dog", "a cat"], [["a dog"], ["a cat"]], metrics=("bleu",), spice=True, tokenizer="approximate"
    )
    assert scores["spice"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------- bad arguments


def test_mismatched_lengths_raise_value_error():
    with pytest.raises(ValueError, match="3 predictions but 2 reference lists"):
        compute_caption_metrics(["a", "b", "c"], [["a"], ["b"]], metrics=("bleu",), tokenizer="approximate")


@pytest.mark.parametrize(
    ("predictions", "references", "error"),
    [
        ([], [], ValueError),
        (["a"], [[]], ValueError),
        (["a"], [["a"]], None),
        ("a dog", [["a dog"]], TypeError),
        ([None], [["a"]], TypeError),
        (["a"], [[1]], TypeError),
    ],
)
def test_argument_checks(predictions, references, error):
    if error is None:
        assert (
            compute_caption_metrics(predictions, references, metrics=("bleu",), tokenizer="approximate")[
                "bleu_1"
            ]
            > 0.99
        )
    else:
        with pytest.raises(error):
            compute_caption_metrics(predictions, references, metrics=("bleu",), tokenizer="approximate")


def test_unknown_metric_and_tokenizer_raise():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_caption_metrics(["a"], [["a"]], metrics=("bleu", "wer"))
    with pytest.raises(ValueError, match="timeout"):
        compute_caption_metrics(["a"], [["a"]], metrics=("bleu",), meteor_timeout=0)
    with pytest.raises(ValueError, match="tokenizer"):
        compute_caption_metrics(["a"], [["a"]], metrics=("bleu",), tokenizer="spacy")


def test_a_bare_string_reference_counts_as_one_reference():
    nested = compute_caption_metrics(
        ["a dog runs", "a cat"], [["a dog runs"], ["a cat sleeps"]], metrics=NO_JAVA_METRICS
    )
    flat = compute_caption_metrics(
        ["a dog runs", "a cat"], ["a dog runs", "a cat sleeps"], metrics=NO_JAVA_METRICS
    )
    assert nested == flat


# ------------------------------------------------------------------------------------ hard inputs

HARD_PREDICTIONS = [
    "a dog\nruns\non grass",
    "\ttabs\tand\r\ncrlf",
    "",
    "   ",
    "ünïcödé — “quotes” 猫が好き 😀 \u200b\u00ad",
    "word " * 20000,  # very long
    "\x00\x01 control \x7f characters",
    "|||",
]
HARD_REFERENCES = [
    ["a dog runs on grass", ""],
    ["tabs and crlf"],
    ["an empty hypothesis"],
    [""],
    ["unicode quotes 猫が好き"],
    ["word " * 15000, "a word"],
    ["control characters"],
    ["|||", "pipes"],
]


def test_hard_inputs_finish_quickly_and_in_range():
    scores = run_with_deadline(
        lambda: compute_caption_metrics(
            HARD_PREDICTIONS, HARD_REFERENCES, metrics=NO_JAVA_METRICS, tokenizer="approximate"
        ),
        60,
    )
    assert_in_range(scores)
    # Every single prediction on its own too (one-image corpora are a corner case for CIDEr's idf).
    for pred, refs in zip(HARD_PREDICTIONS, HARD_REFERENCES, strict=True):
        one = run_with_deadline(
            lambda p=pred, r=refs: compute_caption_metrics(
                [p], [r], metrics=NO_JAVA_METRICS, tokenizer="approximate"
            ),
            30,
        )
        assert_in_range(one)


@needs_java
def test_hard_inputs_through_the_ptb_tokenizer():
    tokens = run_with_deadline(lambda: impl._ptb_tokenize(HARD_PREDICTIONS, impl._find_java(), 60), 90)
    assert len(tokens) == len(HARD_PREDICTIONS)
    assert tokens[0] == "a dog runs on grass"
    assert tokens[2] == tokens[3] == ""
    assert all("\n" not in t for t in tokens)


# ------------------------------------------------------------------------------- evaluate module


def test_evaluate_load_works_offline_and_agrees(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    module = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    assert type(module).__name__ == "CocoCaption"
    ours = compute_caption_metrics(PREDICTIONS, REFERENCES, metrics=NO_JAVA_METRICS, tokenizer="approximate")
    theirs = module.compute(
        predictions=PREDICTIONS, references=REFERENCES, metrics=list(NO_JAVA_METRICS), tokenizer="approximate"
    )
    assert theirs == ours
    assert theirs["bleu_4"] > 0.05  # nested references are really used (a wrong feature type gives 0)

    # load_metric() is the same thing, and batches accumulate.
    module = load_metric(keep_in_memory=True)
    for pred, refs in zip(PREDICTIONS, REFERENCES, strict=True):
        module.add(predictions=pred, references=refs)
    assert module.compute(metrics=list(NO_JAVA_METRICS), tokenizer="approximate") == ours

    # One reference per prediction as a plain string is accepted too.
    flat = module.compute(
        predictions=PREDICTIONS,
        references=[r[0] for r in REFERENCES],
        metrics=["bleu"],
        tokenizer="approximate",
    )
    assert flat == compute_caption_metrics(
        PREDICTIONS, [[r[0]] for r in REFERENCES], metrics=("bleu",), tokenizer="approximate"
    )

    with pytest.raises(ValueError):
        module.compute(predictions=[], references=[])
    with pytest.raises(ValueError):
        module.compute(predictions=PREDICTIONS, references=REFERENCES[:2])


def test_metric_file_is_self_contained():
    # evaluate copies this single file into its cache: it may not import our package or its siblings.
    source = (METRIC_PATH / "coco_caption.py").read_text()
    imported = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.lstrip().startswith(("import ", "from "))
    }
    assert not imported & {"show_attend_tell", "torch", "transformers", ""}  # "" = a relative import
    assert os.path.basename(METRIC_PATH) == "coco_caption"
