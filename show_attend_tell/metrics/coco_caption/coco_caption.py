"""coco-caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optionally SPICE) as an `evaluate` module.

This file is both the `evaluate` metric (``evaluate.load("<this folder>")``) and the one implementation
of the scores that ``show_attend_tell.metrics.compute_caption_metrics`` calls. `evaluate` copies this
file alone into its module cache and imports it from there, so it must stay self-contained: it imports
only the standard library at the top, `evaluate`/`datasets` when they are installed (the scores work
without them, which the training loop relies on) and `pycocoevalcap` lazily, inside the functions.

Definitions follow the MS-COCO caption evaluation code (pycocoevalcap 1.2):

* captions are tokenised by ``pycocoevalcap.tokenizer.PTBTokenizer``'s Stanford PTB tokeniser
  (Java; lower-cased, punctuation tokens dropped). Scores are official only with it: without Java
  they are refused, unless the caller asks for ``tokenizer="approximate"`` (a pure-Python imitation,
  for quick looks such as per-epoch validation; its scores are not comparable with published ones);
* BLEU-1..4 is corpus-level with the closest reference length for the brevity penalty
  (pycocoevalcap's ``BleuScorer``);
* METEOR 1.5 (``-l en -norm``) through the jar shipped with pycocoevalcap, corpus-level
  (the aggregate of all segment statistics, not the mean of segment scores);
* ROUGE-L is the mean over images of the LCS F-measure (beta 1.2), with precision and recall each
  taken from the reference that maximises it;
* CIDEr (not CIDEr-D) is pycocoevalcap's ``CiderScorer`` (n=4, sigma=6), document frequencies taken
  over the references of the evaluated corpus;
* SPICE 1.0 with the jar shipped with pycocoevalcap, when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

try:
    import datasets
    import evaluate
except ImportError:  # pragma: no cover - the scoring functions below do not need them
    datasets = None
    evaluate = None

__all__ = [
    "DEFAULT_JAVA_TIMEOUT",
    "DEFAULT_METRICS",
    "JAVA_INSTALL_HINT",
    "METRIC_NAMES",
    "MetricUnavailableWarning",
    "compute_scores",
    "java_available",
    "ptb_like_tokenize",
]

METRIC_NAMES = ("bleu", "meteor", "rouge", "cider", "spice")
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
# Seconds each Java subprocess (PTB tokeniser, METEOR, SPICE) may run. METEOR alone needs ~5-8 s to
# start (it loads a paraphrase table) and a few seconds per thousand captions, so this only has to
# catch a stuck process, not bound a normal run.
DEFAULT_JAVA_TIMEOUT = 600.0
JAVA_INSTALL_HINT = (
    "Install a Java runtime (8 or newer) and put `java` on PATH, e.g. "
    "`sudo apt-get install default-jre-headless` on Debian/Ubuntu, `brew install openjdk` on macOS "
    "or `conda install -c conda-forge openjdk`."
)
_PYCOCOEVALCAP_HINT = "pip install pycocoevalcap  (or: pip install 'show-attend-tell[eval]')"
_METRIC_ALIASES = {"rouge_l": "rouge", "rougel": "rouge", "bleu4": "bleu"}
#: "ptb": the official tokenisation (Stanford PTB tokeniser, Java); "approximate": `ptb_like_tokenize`.
_TOKENIZERS = ("ptb", "approximate")

# Tokens that pycocoevalcap's PTBTokenizer drops after tokenising. The bracket names are upper-case
# there, but the tokeniser runs with -lowerCase, so "-lrb-" etc. are in fact kept in coco-caption's
# scores; we keep them too, to give the same numbers.
_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


class MetricUnavailableWarning(UserWarning):
    """A requested metric could not be computed (e.g. no Java for METEOR); the others were."""


class _JavaFailure(RuntimeError):
    """A Java subprocess failed, timed out or answered something unexpected."""


# ----------------------------------------------------------------------------------------------
# Text cleaning and tokenisation
# ----------------------------------------------------------------------------------------------

# Characters that Java's line reader or the PTB lexer treat as line breaks or that cannot be encoded:
# C* (controls, format characters, surrogates, private use, unassigned) and Z* (separators).
# Every one becomes a plain space, so one caption is always exactly one line for the Java tools
# (a newline inside a caption would otherwise make METEOR wait forever for the rest of its input).
_SPACE_CATEGORIES = ("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")


def _clean_char(ch: str) -> str:
    if ch == "\u00ad":  # soft hyphen: the PTB lexer deletes it (joins the word)
        return ""
    if ord(ch) > 0xFFFF:  # outside the BMP: PTB 3.4.1 reports it "untokenizable" and drops it
        return " "
    if unicodedata.category(ch) in _SPACE_CATEGORIES:
        return " "
    return ch


_NEEDS_CLEANING = re.compile(r"[^\x21-\x7e ]")


def clean_text(text: str) -> str:
    """Return ``text`` on one line: controls, separators and unencodable characters become spaces,
    runs of spaces collapse to one, and the ends are stripped."""
    if _NEEDS_CLEANING.search(text):
        text = "".join(_clean_char(ch) for ch in text)
    return " ".join(text.split())


# --- pure-Python approximation of the Stanford PTB tokeniser (as used by coco-caption) ---------
#
# Why: pycocoevalcap's PTBTokenizer starts a JVM (and writes a temporary file into its own package
# folder). BLEU every epoch, and machines without Java, must not depend on that. The rules below
# reproduce what Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase) followed by
# pycocoevalcap's punctuation filter outputs for ordinary captions (letters, digits and common
# punctuation), which tests/test_metrics.py checks against the jar. Exotic inputs (SGML tags,
# emoticons, URLs with odd punctuation, rare clitics like "y'all") can tokenise differently.

_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_TOKENS = frozenset(name.strip() for name in _BRACKETS.values())
_CHAR_MAP = str.maketrans(
    {
        **_BRACKETS,
        # Curly single quotes and primes act as apostrophes / single quotes in the PTB lexer.
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        # Double quotes of any kind become `` or '' tokens, which the punctuation filter drops.
        '"': " ",
        "\u201c": " ",
        "\u201d": " ",
        "\u201f": " ",
        "\u00ab": " ",
        "\u00bb": " ",
        # Dashes become "--" tokens (dropped); the ellipsis becomes "..." (dropped).
        "\u2012": " -- ",
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2015": " -- ",
        "\u2026": " ... ",
        # Vulgar fractions are spelled out.
        "\u00bc": " 1/4 ",
        "\u00bd": " 1/2 ",
        "\u00be": " 3/4 ",
    }
)
# Characters that always stand alone as a token (kept, since they are not in _PUNCTUATION).
_ALWAYS_SPLIT = re.compile(r"([*+=$%&\\|~^<>;])")
_BANG_QUERY = re.compile(r"[!?]+")  # "!!!" or "?!" is one token, as in PTB
_DASHES = re.compile(r"-{2,}")
_COMMA = re.compile(r"(?<!\d),|,(?!\d)")  # "1,000" stays a number
_COLON = re.compile(r":(?!//)")  # "http://" stays; digits around the colon are checked below
_HASH_DIGIT = re.compile(r"#(?=\d)")
_N_BETWEEN = re.compile(r"(?<=\w)('n')(?=\w)")  # "rock'n'roll" -> rock 'n' roll
_ACRONYM = re.compile(r"[^\W\d_](?:\.[^\W\d_])*")  # "a", "u.s", "e.g" (the final period is added)
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")
_HASHTAG = re.compile(r"#[^\W\d_]\w*")
_DECADE = re.compile(r"'\d\d(?!\d)")
_LEADING_APOSTROPHE_WORDS = frozenset(["'s", "'re", "'ve", "'ll", "'d", "'m", "'em", "'n'", "'n", "'cause"])
_SPECIAL_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
    "'tis": ("'t", "is"),
    "'twas": ("'t", "was"),
}
# Words that keep their final period in CoreNLP 3.4.1 (checked one by one against the jar).
# fmt: off
_ABBREVIATIONS = frozenset(
    [
        "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "co", "corp", "inc", "ltd", "vs", "etc", "mt",
        "ave", "blvd", "rd", "ft", "sq", "gen", "gov", "sen", "rep", "lt", "col", "capt", "sgt", "bros",
        "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
        "mon", "tue", "wed", "thu", "fri", "esq", "messrs", "mme", "mlle", "rev", "hon", "adm", "maj",
        "cmdr", "pvt", "ste", "ct", "assn", "univ", "intl", "natl", "al", "cf", "ph",
    ]
)
# fmt: on


def _colon(match: re.Match[str]) -> str:
    text, i = match.string, match.start()
    if 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
        return ":"  # times and ratios ("3:30") stay one token
    return " : "


def _split_symbols(text: str) -> str:
    """Put spaces around the punctuation and symbols that PTB always makes a token of their own."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        # Other Unicode symbols/punctuation ("©", "→", "¿") are single tokens; ASCII ones are handled
        # by the specific rules, which know when a character belongs to a word ("t-shirt", "3.5").
        if ord(ch) > 0x7F and (cat[0] == "S" or cat[0] == "P"):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def _split_word(word: str) -> list[str]:
    """Tokenise one whitespace-free, lower-cased chunk."""
    if not word:
        return []
    if word in _SPECIAL_WORDS:
        return list(_SPECIAL_WORDS[word])
    if word in _BRACKET_TOKENS or word in _LEADING_APOSTROPHE_WORDS:
        return [word]
    hashtag = _HASHTAG.match(word)
    if hashtag:  # "#tag" is a token of its own, whatever follows it is tokenised separately
        return [hashtag.group(), *_split_word(word[hashtag.end() :])]
    head: list[str] = []
    tail: list[str] = []
    # Leading punctuation.
    while word:
        first = word[0]
        if first == "'":
            if _DECADE.match(word) or word.rstrip(".") in _LEADING_APOSTROPHE_WORDS:
                break  # "'80s", "'90", a clitic on its own ("'s.")
            head.append("'")
            word = word[1:]
        elif first in "`/":
            head.append(first)
            word = word[1:]
        elif first == "-" and not (len(word) > 1 and word[1].isdigit()):
            head.append("-")
            word = word[1:]
        elif first == "." and not (len(word) > 1 and word[1].isdigit()):
            dots = len(word) - len(word.lstrip("."))
            head.extend(["..."] if dots >= 3 else ["."] * dots)
            word = word[dots:]
        else:
            break
    # Trailing punctuation.
    while word:
        last = word[-1]
        if last == ".":
            dots = len(word) - len(word.rstrip("."))
            core = word[:-dots]
            if core and (core in _ABBREVIATIONS or _ACRONYM.fullmatch(core)):
                # "mr.", "u.s.", "a." keep their period; further periods are separate (dropped) tokens.
                tail.extend(["."] * (dots - 1))
                tail.append(core + ".")
                core = ""
            else:
                tail.extend(["..."] if dots >= 3 else ["."] * dots)
            word = core
        elif last in "'`-/@":
            tail.append(last)
            word = word[:-1]
        else:
            break
    clitics: list[str] = []
    while word and (match := _CLITIC.fullmatch(word)):  # "he'll's" -> he 'll 's
        word, clitic = match.groups()
        clitics.append(clitic)
    if word:
        head.extend(_SPECIAL_WORDS.get(word, (word,)))
    return head + clitics[::-1] + tail[::-1]


def ptb_like_tokenize(text: str) -> str:
    """Tokenise a caption like coco-caption does, without Java.

    Lower-cases, splits like Stanford's PTB tokeniser (clitics such as ``'s`` and ``n't`` apart,
    brackets as ``-lrb-``/``-rrb-``, hyphenated words and decimal numbers kept whole) and drops the
    punctuation tokens that pycocoevalcap drops. Returns the tokens joined by single spaces.
    """
    text = clean_text(text).lower().translate(_CHAR_MAP)
    text = _DASHES.sub(" -- ", text)
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    text = _BANG_QUERY.sub(r" \g<0> ", text)
    text = _COMMA.sub(" , ", text)
    text = _COLON.sub(_colon, text)
    text = _HASH_DIGIT.sub("# ", text)
    text = _N_BETWEEN.sub(r" \1 ", text)
    text = _split_symbols(text)
    tokens = [tok for chunk in text.split() for tok in _split_word(chunk)]
    return " ".join(tok for tok in tokens if tok not in _PUNCTUATION)


# ----------------------------------------------------------------------------------------------
# Java
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _java_runs(java: str) -> bool:
    # A `java` on PATH can be a stub that only prints "no Java runtime" (macOS) or a broken install:
    # run it once per path rather than trusting its presence.
    try:
        proc = subprocess.run(
            [java, "-version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _find_java() -> str | None:
    java = shutil.which("java")
    if java is None or not _java_runs(java):
        return None
    return java


def java_available() -> bool:
    """Whether a working ``java`` is on PATH (needed for METEOR, SPICE and the PTB tokeniser)."""
    return _find_java() is not None


def _pycocoevalcap_dir(*parts: str) -> str:
    # pycocoevalcap is a namespace package (no __init__.py, so no __file__): ask the import system.
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"coco-caption metrics need pycocoevalcap: {_PYCOCOEVALCAP_HINT}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *parts)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{os.path.join(*parts)} is missing from pycocoevalcap; reinstall it: {_PYCOCOEVALCAP_HINT}"
    )


def _ptb_tokenize(texts: list[str], java: str, timeout: float | None) -> list[str]:
    """Stanford PTB tokenisation exactly as pycocoevalcap runs it (same jar and flags), but fed
    through stdin with a timeout and without writing into the installed package."""
    jar = _pycocoevalcap_dir("tokenizer", "stanford-corenlp-3.4.1.jar")
    lines = [clean_text(t) for t in texts]
    # Empty lines are not sent: they would only be echoed, and dropping them removes any doubt
    # about how the lexer counts blank lines.
    nonempty = [i for i, line in enumerate(lines) if line]
    out = [""] * len(lines)
    if not nonempty:
        return out
    payload = "".join(lines[i] + "\n" for i in nonempty).encode("utf-8")
    cmd = [
        java,
        "-Dfile.encoding=UTF-8",
        "-cp",
        jar,
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
        "-encoding",
        "UTF-8",
    ]
    try:
        proc = subprocess.run(cmd, input=payload, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise _JavaFailure(f"the PTB tokeniser did not finish within {timeout:g} s") from err
    except OSError as err:
        raise _JavaFailure(f"could not start the PTB tokeniser: {err}") from err
    if proc.returncode != 0:
        raise _JavaFailure(f"the PTB tokeniser failed: {_tail(proc.stderr)}")
    result = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if result and result[-1] == "":
        result.pop()
    if len(result) != len(nonempty):
        raise _JavaFailure(f"the PTB tokeniser returned {len(result)} lines for {len(nonempty)} captions")
    for i, line in zip(nonempty, result, strict=True):
        out[i] = " ".join(tok for tok in line.split() if tok not in _PUNCTUATION)
    return out


def _tail(data: bytes, limit: int = 2000) -> str:
    text = " ".join(data.decode("utf-8", errors="replace").split())  # one line: errors are printed as one
    return text[-limit:] if text else "(no error output)"


def _meteor(references: list[list[str]], hypotheses: list[str], java: str, timeout: float | None) -> float:
    """Corpus METEOR 1.5 with pycocoevalcap's jar and settings, through a subprocess that is always
    closed here (pycocoevalcap's wrapper closes it in ``__del__``, which can hang at interpreter
    exit) and killed by a watchdog if it takes longer than ``timeout`` seconds."""
    jar_dir = _pycocoevalcap_dir("meteor")
    cmd = [
        java,
        "-Xmx2G",
        "-Dfile.encoding=UTF-8",
        "-jar",
        "meteor-1.5.jar",
        "-",
        "-",
        "-stdio",
        "-l",
        "en",
        "-norm",
    ]

    def field(text: str) -> str:
        # "|||" separates fields in METEOR's protocol and a line break ends the request; the inputs
        # are already one-line tokenised captions, this removes the field separator character.
        return " ".join(text.replace("|", " ").split())

    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
            )
        except OSError as err:
            raise _JavaFailure(f"could not start METEOR: {err}") from err
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        # Every blocking read or write below returns once the process is killed, so the watchdog
        # bounds the whole exchange, Java start-up included.
        watchdog = threading.Timer(timeout, kill) if timeout is not None else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        assert proc.stdin is not None and proc.stdout is not None

        def ask(line: str) -> str:
            proc.stdin.write(line.encode("utf-8") + b"\n")
            proc.stdin.flush()
            return read()

        def read() -> str:
            answer = proc.stdout.readline()
            if not answer:
                raise EOFError
            return answer.decode("utf-8", errors="replace").strip()

        try:
            # One request, one answer line: writing everything first could fill both pipes and
            # deadlock once METEOR's output is not read.
            stats = [
                ask("SCORE ||| " + " ||| ".join(field(r) for r in refs) + " ||| " + field(hyp))
                for refs, hyp in zip(references, hypotheses, strict=True)
            ]
            ask("EVAL ||| " + " ||| ".join(stats))  # first segment score
            for _ in range(len(stats) - 1):
                read()  # the other segment scores
            score = float(read())  # the corpus score, from all segment statistics together
        except (OSError, EOFError, ValueError) as err:
            if timed_out.is_set():
                raise _JavaFailure(f"METEOR did not finish within {timeout:g} s and was stopped") from err
            proc.kill()
            proc.wait()
            stderr.seek(0)
            raise _JavaFailure(f"METEOR failed ({type(err).__name__}): {_tail(stderr.read())}") from err
        finally:
            if watchdog is not None:
                watchdog.cancel()
            _close(proc)
    return 0.0 if math.isnan(score) else min(max(score, 0.0), 1.0)


def _close(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass  # a broken pipe on close means the process is gone already
    try:
        proc.wait(timeout=5)  # METEOR exits at end of input
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _spice_jars() -> tuple[str, list[str]]:
    spice_dir = _pycocoevalcap_dir("spice")
    lib = os.path.join(spice_dir, "lib")
    needed = [os.path.join(lib, f"stanford-corenlp-3.6.0{suffix}.jar") for suffix in ("", "-models")]
    return spice_dir, [path for path in needed if not os.path.exists(path)]


def _check_spice_jars() -> str:
    """Return SPICE's folder, or raise a RuntimeError saying which files are missing and how to get them."""
    spice_dir, missing = _spice_jars()
    if missing:
        # pycocoevalcap would silently download ~400 MB here; say what is needed instead.
        raise RuntimeError(
            "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap does not ship: missing "
            + ", ".join(missing)
            + '. Download it once with `python -c "from pycocoevalcap.spice.get_stanford_models import '
            'get_stanford_models; get_stanford_models()"` (about 400 MB from nlp.stanford.edu), or copy '
            "stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar from "
            "stanford-corenlp-full-2015-12-09.zip into that folder; or call without spice=True."
        )
    return spice_dir


def _spice(references: list[list[str]], hypotheses: list[str], java: str, timeout: float | None) -> float:
    """Mean SPICE F-score with pycocoevalcap's jar, run with a timeout and temporary files outside
    the installed package. Captions without any scene-graph tuple (F undefined) count as 0."""
    spice_dir = _check_spice_jars()
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        in_file, out_file = os.path.join(tmp, "input.json"), os.path.join(tmp, "output.json")
        data = [
            {"image_id": i, "test": hyp, "refs": refs}
            for i, (refs, hyp) in enumerate(zip(references, hypotheses, strict=True))
        ]
        with open(in_file, "w", encoding="utf-8") as f:
            json.dump(data, f)
        cmd = [java, "-Xmx8G", "-Dfile.encoding=UTF-8", "-jar", "spice-1.0.jar", in_file]
        cmd += ["-out", out_file, "-subset", "-silent"]
        try:
            proc = subprocess.run(
                cmd,
                cwd=spice_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"SPICE did not finish within {timeout:g} s") from err
        if proc.returncode != 0 or not os.path.exists(out_file):
            raise RuntimeError(f"SPICE failed (exit status {proc.returncode}): {_tail(proc.stderr)}")
        with open(out_file, encoding="utf-8") as f:
            results = json.load(f)
    scores = []
    for item in results:
        try:
            value = float(item["scores"]["All"]["f"])
        except (KeyError, TypeError, ValueError):
            value = float("nan")
        scores.append(0.0 if math.isnan(value) else value)
    return sum(scores) / len(scores) if scores else 0.0


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def _bleu(references: list[list[str]], hypotheses: list[str]) -> list[float]:
    try:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    except ImportError as err:
        raise ImportError(f"BLEU needs pycocoevalcap: {_PYCOCOEVALCAP_HINT}") from err
    scorer = BleuScorer(n=4)
    for refs, hyp in zip(references, hypotheses, strict=True):
        scorer += (hyp, refs)
    # pycocoevalcap's Bleu wrapper calls this with verbose=1, which prints to stdout.
    scores, _ = scorer.compute_score(option="closest", verbose=0)
    return [min(max(float(s), 0.0), 1.0) for s in scores]


def _cider(references: list[list[str]], hypotheses: list[str]) -> float:
    try:
        from pycocoevalcap.cider.cider_scorer import CiderScorer
    except ImportError as err:
        raise ImportError(f"CIDEr needs pycocoevalcap: {_PYCOCOEVALCAP_HINT}") from err
    if not any(ref.split() for refs in references for ref in refs):
        # No reference n-gram at all: every similarity is 0, and CiderScorer would fail on max([]).
        return 0.0
    scorer = CiderScorer(n=4, sigma=6.0)
    for refs, hyp in zip(references, hypotheses, strict=True):
        scorer += (hyp, refs)
    score, _ = scorer.compute_score()
    return max(float(score), 0.0)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyrö): O(len(a) *
    len(b) / machine word) instead of pycocoevalcap's quadratic table, which takes minutes and
    gigabytes for long inputs. Same result as ``pycocoevalcap.rouge.rouge.my_lcs``."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _rouge_l(references: list[list[str]], hypotheses: list[str], beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE-L: per image, precision and recall are each maximised over references,
    F with beta 1.2; the corpus score is the mean over images."""
    total = 0.0
    for refs, hyp in zip(references, hypotheses, strict=True):
        # split(" ") rather than split(): an empty caption counts as one empty token there.
        candidate = hyp.split(" ")
        prec_max = rec_max = 0.0
        for ref in refs:
            tokens = ref.split(" ")
            lcs = _lcs_length(candidate, tokens)
            prec_max = max(prec_max, lcs / len(candidate))
            rec_max = max(rec_max, lcs / len(tokens))
        if prec_max and rec_max:
            total += (1 + beta**2) * prec_max * rec_max / (rec_max + beta**2 * prec_max)
    return total / len(hypotheses)


def _validate(
    predictions: Sequence[str], references: Sequence[Sequence[str] | str]
) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per image), not a single string")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists: "
            "give one list of reference captions per prediction"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(f"prediction {i} is a {type(prediction).__name__}, expected a string")
    refs_out = []
    for i, refs in enumerate(references):
        # A bare string is accepted as the only reference of that prediction.
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"prediction {i} has no reference caption")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"a reference of prediction {i} is a {type(ref).__name__}, expected a string")
        refs_out.append(refs)
    return predictions, refs_out


def _select_metrics(metrics: Iterable[str] | str, spice: bool) -> list[str]:
    if isinstance(metrics, str):  # metrics=("bleu") is a string, not a tuple
        metrics = [metrics]
    chosen = set()
    for name in metrics:
        key = _METRIC_ALIASES.get(str(name).lower(), str(name).lower())
        if key not in METRIC_NAMES:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
        chosen.add(key)
    if spice:
        chosen.add("spice")
    if not chosen:
        raise ValueError("no metric requested")
    return [name for name in METRIC_NAMES if name in chosen]


def _warn_unavailable(message: str) -> None:
    warnings.warn(message, MetricUnavailableWarning, stacklevel=3)


def compute_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    metrics: Iterable[str] | str = DEFAULT_METRICS,
    *,
    spice: bool = False,
    java_timeout: float | None = DEFAULT_JAVA_TIMEOUT,
    tokenizer: str = "ptb",
) -> dict[str, float]:
    """Corpus-level coco-caption scores of ``predictions`` against ``references``.

    Args:
        predictions: one generated caption per image.
        references: for each prediction, a list of reference captions (a bare string counts as one).
        metrics: any of "bleu", "meteor", "rouge", "cider", "spice".
        spice: also compute SPICE (needs Java and Stanford CoreNLP 3.6.0; raises if unavailable).
        java_timeout: seconds each Java subprocess may run before it is killed (None: no limit).
        tokenizer: "ptb" (default: Stanford PTB tokeniser in Java, exactly coco-caption; a RuntimeError
            when Java is missing or the tokeniser fails, never other numbers) or "approximate"
            (:func:`ptb_like_tokenize`, pure Python, never starts Java for BLEU/ROUGE/CIDEr; scores that
            the caller must label as approximate).

    Returns:
        ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider``, ``spice`` (those requested) as
        floats; all in [0, 1] except CIDEr (0 to 10 per caption). If METEOR cannot run (no Java, a
        crash, the timeout), it is left out with a :class:`MetricUnavailableWarning` and the other
        scores are still returned.
    """
    preds, refs = _validate(predictions, references)
    wanted = _select_metrics(metrics, spice)
    if java_timeout is not None and not java_timeout > 0:
        raise ValueError(f"the Java timeout must be positive (or None for no limit), got {java_timeout!r}")
    if tokenizer not in _TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {_TOKENIZERS}, got {tokenizer!r}")
    needs_java = tokenizer == "ptb" or "meteor" in wanted or "spice" in wanted
    java = _find_java() if needs_java else None

    if "spice" in wanted:
        if java is None:
            raise RuntimeError(
                f"SPICE needs Java, and no working `java` was found on PATH. {JAVA_INSTALL_HINT}"
            )
        _check_spice_jars()
    if tokenizer == "ptb" and java is None:
        raise RuntimeError(
            "the official coco-caption tokenisation (Stanford PTB tokeniser) runs Java, and no working `java` "
            f"was found on PATH. {JAVA_INSTALL_HINT} (tokenizer='approximate' gives approximate scores "
            "without Java, not comparable with published ones.)"
        )
    if "meteor" in wanted and java is None:
        wanted.remove("meteor")
        message = f"METEOR needs Java, and no working `java` was found on PATH. {JAVA_INSTALL_HINT}"
        if not wanted:
            raise RuntimeError(message)
        _warn_unavailable(message + " METEOR is left out; the other scores were computed.")

    # Tokenise every caption once, predictions first.
    texts = preds + [r for rs in refs for r in rs]
    if tokenizer == "ptb":
        assert java is not None
        try:
            tokens = _ptb_tokenize(texts, java, java_timeout)
        except _JavaFailure as err:
            # No quiet fallback to the approximation: the same call must never give other numbers.
            raise RuntimeError(f"{err}; no scores were computed") from err
    else:
        tokens = [ptb_like_tokenize(t) for t in texts]
    hyps_tok = tokens[: len(preds)]
    refs_tok, start = [], len(preds)
    for rs in refs:
        refs_tok.append(tokens[start : start + len(rs)])
        start += len(rs)

    scores: dict[str, float] = {}
    if "bleu" in wanted:
        for n, value in enumerate(_bleu(refs_tok, hyps_tok), start=1):
            scores[f"bleu_{n}"] = value
    if "meteor" in wanted:
        assert java is not None
        try:
            scores["meteor"] = _meteor(refs_tok, hyps_tok, java, java_timeout)
        except _JavaFailure as err:
            _warn_unavailable(f"{err}. METEOR is left out; the other scores were computed.")
    if "rouge" in wanted:
        scores["rouge_l"] = _rouge_l(refs_tok, hyps_tok)
    if "cider" in wanted:
        scores["cider"] = _cider(refs_tok, hyps_tok)
    if "spice" in wanted:
        assert java is not None
        scores["spice"] = _spice(refs_tok, hyps_tok, java, java_timeout)
    return scores


# ----------------------------------------------------------------------------------------------
# The `evaluate` module
# ----------------------------------------------------------------------------------------------

_CITATION = """\
@inproceedings{papineni2002bleu, title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing}, booktitle={ACL}, year={2002}}
@inproceedings{denkowski2014meteor, title={Meteor Universal: Language Specific Translation Evaluation for
  Any Target Language}, author={Denkowski, Michael and Lavie, Alon}, booktitle={WMT}, year={2014}}
@inproceedings{lin2004rouge, title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, year={2004}}
@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@article{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and others}, journal={arXiv:1504.00325}, year={2015}}
"""

_DESCRIPTION = """\
Image-captioning scores with the MS-COCO caption evaluation definitions (pycocoevalcap): corpus BLEU-1..4,
METEOR 1.5, ROUGE-L, CIDEr and optionally SPICE, each prediction scored against several references.
Captions are tokenised by the Stanford PTB tokeniser as coco-caption does, which needs Java (as METEOR
and SPICE do): without Java the scores are refused, unless tokenizer="approximate" is passed, which
tokenises with a pure-Python imitation and gives approximate scores (METEOR then left out with a warning).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of generated captions, one per image.
    references: list of lists of reference captions (a single string per prediction is also accepted).
    metrics: names among "bleu", "meteor", "rouge", "cider", "spice" (default: all but SPICE).
    spice: also compute SPICE (default False; needs Java and Stanford CoreNLP 3.6.0).
    meteor_timeout: seconds each Java subprocess may run (default 600).
    tokenizer: "ptb" (default, official; needs Java) or "approximate" (pure Python; label such scores).
Returns:
    dict with bleu_1, bleu_2, bleu_3, bleu_4, meteor, rouge_l, cider (and spice) as floats.
Examples:
    >>> metric = evaluate.load("path/to/show_attend_tell/metrics/coco_caption")
    >>> metric.compute(predictions=["a dog runs"], references=[["a dog runs", "a dog is running"]],
    ...                metrics=["bleu"])["bleu_1"]  # doctest: +SKIP
"""

if evaluate is not None:

    @evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
    class CocoCaption(evaluate.Metric):
        """coco-caption metrics (see the module docstring)."""

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                # References must be declared as a list of strings: with a plain string feature,
                # lists of references are not recognised and every score silently becomes 0.
                features=[
                    datasets.Features(
                        {
                            "predictions": datasets.Value("string"),
                            "references": datasets.Sequence(datasets.Value("string")),
                        }
                    ),
                    datasets.Features(
                        {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                    ),
                ],
                codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
                reference_urls=["https://arxiv.org/abs/1504.00325"],
            )

        def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict | None:
            """Compute the metrics (arguments below)."""
            # evaluate itself fails with an IndexError on an empty list (it infers the feature
            # type from the first example); say what is wrong instead. The docstring is needed:
            # evaluate appends the inputs description to it.
            if predictions is not None and len(predictions) == 0:
                raise ValueError("no predictions to score")
            return super().compute(predictions=predictions, references=references, **kwargs)

        def _compute(
            self,
            predictions: Sequence[str],
            references: Sequence[Sequence[str] | str],
            metrics: Iterable[str] | str = DEFAULT_METRICS,
            spice: bool = False,
            meteor_timeout: float | None = DEFAULT_JAVA_TIMEOUT,
            tokenizer: str = "ptb",
        ) -> dict[str, float]:
            return compute_scores(
                predictions,
                references,
                metrics,
                spice=spice,
                java_timeout=meteor_timeout,
                tokenizer=tokenizer,
            )
