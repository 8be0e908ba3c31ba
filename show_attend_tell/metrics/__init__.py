"""Caption metrics with the MS-COCO definitions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE).

The implementation lives in ``coco_caption/coco_caption.py``, which is also an `evaluate` module
(``load_metric()`` / ``evaluate.load(METRIC_PATH)``). `evaluate` copies that file alone into its cache,
so it cannot import this package; instead this package loads that file by path, and both entry points
run the very same code.

Example::

    from show_attend_tell.metrics import compute_caption_metrics

    compute_caption_metrics(["a dog runs on the grass"], [["a dog is running on grass", "a brown dog runs"]])
    # {'bleu_1': ..., 'bleu_2': ..., 'bleu_3': ..., 'bleu_4': ..., 'meteor': ..., 'rouge_l': ..., 'cider': ...}

Scores are official only with coco-caption's tokenisation, the Stanford PTB tokeniser, which runs Java
(as METEOR and SPICE do): by default a machine without Java gets a one-line RuntimeError saying what to
install, never other numbers. ``tokenizer="approximate"`` tokenises with a pure-Python imitation
(:func:`ptb_like_tokenize`) and never starts Java for BLEU/ROUGE-L/CIDEr: for quick looks such as per-epoch
validation, and whoever reports such scores labels them (:data:`TOKENIZATION_LABELS`).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_PATH",
    "TOKENIZATION_LABELS",
    "MetricUnavailableWarning",
    "compute_caption_metrics",
    "java_available",
    "load_metric",
    "ptb_like_tokenize",
]

#: Folder of the `evaluate` module (``evaluate.load(str(METRIC_PATH))`` works offline).
METRIC_PATH = Path(__file__).resolve().parent / "coco_caption"
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
#: How reports name each `tokenizer` of :func:`compute_caption_metrics`; the approximate one is a warning.
TOKENIZATION_LABELS = {
    "ptb": "official coco-caption tokenisation (Stanford PTB tokeniser, Java)",
    "approximate": "APPROXIMATE: pure-Python imitation of the PTB tokeniser, not comparable with published scores",
}
_IMPL_NAME = "show_attend_tell.metrics._coco_caption_impl"
_lock = threading.Lock()


def _impl() -> ModuleType:
    """The metric module file, imported once under a private name."""
    module = sys.modules.get(_IMPL_NAME)
    if module is not None:
        return module
    with _lock:
        module = sys.modules.get(_IMPL_NAME)
        if module is None:
            spec = importlib.util.spec_from_file_location(_IMPL_NAME, METRIC_PATH / "coco_caption.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[_IMPL_NAME] = module  # before exec, as the import system does
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[_IMPL_NAME]
                raise
    return module


def compute_caption_metrics(
    predictions: list[str],
    references: list[list[str]],
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    spice: bool = False,
    meteor_timeout: float | None = 600.0,
    tokenizer: str = "ptb",
) -> dict[str, float]:
    """Corpus-level coco-caption scores of generated captions against their references.

    Args:
        predictions: one generated caption per image.
        references: for each prediction, its reference captions (any number, at least one).
        metrics: which scores to compute, among "bleu", "meteor", "rouge", "cider" (and "spice").
            ``("bleu",)`` with ``tokenizer="approximate"`` is cheap and never starts Java.
        spice: also compute SPICE; it needs Java and Stanford CoreNLP 3.6.0 and raises a
            RuntimeError explaining what is missing otherwise.
        meteor_timeout: seconds each Java subprocess (PTB tokeniser, METEOR, SPICE) may run before it
            is killed (None: no limit); a METEOR timeout leaves METEOR out with a warning.
        tokenizer: "ptb" (default): the Stanford PTB tokeniser, as coco-caption runs it (Java); or
            "approximate": the pure-Python :func:`ptb_like_tokenize`, whose scores are approximate and
            must be labelled so wherever they are reported (see :data:`TOKENIZATION_LABELS`).

    Returns:
        A dict with ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (and ``spice``) for the
        requested metrics, plain floats: BLEU, METEOR, ROUGE-L and SPICE in [0, 1], CIDEr >= 0
        (up to 10). METEOR is missing from the dict, with a :class:`MetricUnavailableWarning`, when it
        could not run (no Java, a crash or the timeout).

    Raises:
        ValueError: the lists have different lengths, are empty, a prediction has no reference, or a
            metric name is unknown.
        RuntimeError: the official tokenisation cannot run (no Java, or the tokeniser failed), or only
            METEOR was asked for and it cannot run.
        TypeError: an entry is not a string.
    """
    return _impl().compute_scores(
        predictions,
        references,
        metrics,
        spice=spice,
        java_timeout=meteor_timeout,
        tokenizer=tokenizer,
    )


def load_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the coco-caption metric folder (works offline); ``kwargs`` go to
    ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``experiment_id``)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), **kwargs)


def java_available() -> bool:
    """Whether a working ``java`` is on PATH (METEOR, SPICE and the reference PTB tokeniser need it)."""
    return bool(_impl().java_available())


def ptb_like_tokenize(text: str) -> str:
    """Tokenise one caption as coco-caption does (lower-cased, PTB splitting, punctuation dropped),
    in pure Python; the tokens are joined by single spaces."""
    return str(_impl().ptb_like_tokenize(text))


def __getattr__(name: str) -> Any:
    # The warning class is defined in the metric file; expose it without importing that file eagerly.
    if name == "MetricUnavailableWarning":
        return _impl().MetricUnavailableWarning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
