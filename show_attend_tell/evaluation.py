"""Score a captioner on a dataset split with the coco-caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr).

What `scripts/evaluate_captions.py` does, callable from Python::

    from show_attend_tell import evaluation

    tokenizer = evaluation.choose_tokenization()    # "ptb"; without Java an EvaluationError (one line)
    rows = evaluation.load_split("synthetic", "test", max_samples=50)
    references = evaluation.references_by_id(rows)  # image_id -> reference captions, in the split's order
    captions = {"predictions": evaluation.read_predictions("test.jsonl", references)}
    # or captions made now, one entry per beam size: {"beam_1": [...], "beam_3": [...]}
    captions, timings = evaluation.caption_split(model, processor, rows, num_beams=(1, 3))
    scores = evaluation.score_captions(captions, references, tokenizer=tokenizer)
    print(evaluation.format_table(scores.results, tokenizer=tokenizer))
    report = evaluation.build_report(
        model=None, dataset="synthetic", split="test", references=references, captions=captions,
        scores=scores, tokenizer=tokenizer, settings={}, timings={},
    )
    evaluation.write_report("outputs/eval/results.json", report)
    evaluation.update_model_card("model_card.md", report)

Scores are official only with coco-caption's own tokenisation, the Stanford PTB tokeniser, which runs Java.
`choose_tokenization(approximate=True)` picks a pure-Python imitation instead; such scores leave METEOR out and
are labelled approximate in the table, the report (`"tokenization": "approximate"`) and the model card.

The report (`build_report`, the JSON that `scripts/evaluate_captions.py --output` writes)::

    {"model": ..., "dataset": ..., "split": ..., "num_images": N,
     "tokenization": "ptb",                # or "approximate": not official scores
     "results": {"beam_1": {"bleu_1": ..., ..., "cider": ...}, "beam_3": {...}},   # fractions (CIDEr 0-10)
     "predictions": {"beam_1": [{"image_id", "caption", "references"}, ...], ...},
     "retrieval": {"recall@1": ..., ...},                                        # when given
     "settings": {...}, "timings": {...}, "warnings": [...], "versions": {...}}

The entries of "results" are named `beam_N` for captions made with N beams and `predictions` for captions read
from a file. `read_predictions` accepts such a report too, so captions can be scored again (e.g. with METEOR once
Java is installed) without being generated again; `show_attend_tell.hub` reads it for the model card.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic
from .data import DatasetDownloadError, canonical_split, load_caption_dataset
from .metrics import DEFAULT_METRICS, TOKENIZATION_LABELS, compute_caption_metrics, java_available

#: (key in the scores, column name in the table), in the paper's order.
TABLE_COLUMNS = (
    ("bleu_1", "BLEU-1"),
    ("bleu_2", "BLEU-2"),
    ("bleu_3", "BLEU-3"),
    ("bleu_4", "BLEU-4"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("cider", "CIDEr"),
)
RETRIEVAL_KS = (1, 5, 10)
#: The results entry of captions read from a file (captions made with N beams are "beam_N").
PREDICTIONS_LABEL = "predictions"


class EvaluationError(Exception):
    """A problem with the inputs that the user can fix; its message is one line."""


# --------------------------------------------------------------------------------------------------
# The split and its references
# --------------------------------------------------------------------------------------------------


def load_split(
    dataset: str | os.PathLike,
    split: str = "test",
    *,
    data_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """
    One split of a caption dataset (`load_caption_dataset`'s sources and `options`) as a `datasets.Dataset`
    with image, captions and image_id; `max_samples` keeps the first N images.

    Raises:
        EvaluationError: an unknown split or source, missing files, an empty split.
        DatasetDownloadError: the hub could not be reached (its `command_line_message()` names the scripts'
            options that load a local copy instead).
    """
    try:
        split = canonical_split(split)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    options = dict(options or {})
    if str(dataset).strip().lower() == "synthetic":
        # Synthetic pictures are generated per split and index, so the other splits need not be made.
        for other in ("train", "validation", "test"):
            if other != split:
                options.setdefault(f"num_{other}", 0)
    try:
        loaded = load_caption_dataset(
            dataset,
            data_dir=data_dir,
            image_dir=image_dir,
            cache_dir=cache_dir,
            splits=[split],
            max_samples_per_split=max_samples,
            **options,
        )
    except (ValueError, FileNotFoundError) as error:
        raise EvaluationError(f"dataset {os.fspath(dataset)}: {error}") from None
    rows = loaded[split]
    if len(rows) == 0:
        raise EvaluationError(f"the {split} split of {os.fspath(dataset)} is empty")
    return rows


def references_by_id(rows: Any) -> dict[str, list[str]]:
    """image_id -> its non-empty reference captions, in the split's order; ids must be unique."""
    references: dict[str, list[str]] = {}
    for image_id, captions in zip(rows["image_id"], rows["captions"], strict=True):
        image_id = str(image_id)
        if image_id in references:
            raise EvaluationError(f"the dataset has image_id {image_id!r} twice; ids must be unique")
        captions = [c for c in captions or [] if isinstance(c, str) and c.strip()]
        if not captions:
            raise EvaluationError(f"image {image_id!r} has no reference caption")
        references[image_id] = captions
    return references


# --------------------------------------------------------------------------------------------------
# Captioning the split
# --------------------------------------------------------------------------------------------------


def caption_split(
    model: Any,
    processor: Any,
    rows: Any,
    *,
    num_beams: Sequence[int] = (3,),
    batch_size: int = 32,
    max_new_tokens: int = 51,
    num_workers: int = 0,
    bf16: bool = False,
    progress: bool = True,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """
    Captions every image of `rows` (a split) with each beam size, on the model's device: returns
    ({"beam_N": captions in row order, each on one line}, timings). The pictures are read in `num_workers`
    DataLoader workers (`captioning.picture_batches`); each batch gets one encoder pass, shared by every beam
    size's `captioning.caption_batch`, so `num_beams=(1, 3, 5)` costs one encoder pass, not three.

    Raises:
        EvaluationError: a picture cannot be read (named by its image_id and row).
    """
    import torch
    from tqdm.auto import tqdm

    from .captioning import caption_batch, picture_batches

    device = model.device
    batches = picture_batches(
        rows,
        processor.image_processor,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    captions: dict[int, list[str | None]] = {beams: [None] * len(rows) for beams in num_beams}
    timings: dict[str, float] = {"encode_seconds": 0.0, "data_wait_seconds": 0.0}
    timings.update({f"generate_seconds_beam_{beams}": 0.0 for beams in num_beams})

    def synchronize() -> None:  # so that GPU time is charged to the step that spent it
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    bar = tqdm(
        total=len(rows), unit="img", desc=f"captioning (beams {list(num_beams)})", disable=not progress
    )
    started = time.perf_counter()
    with torch.inference_mode(), autocast, bar:
        waited = time.perf_counter()
        for batch in batches:
            timings["data_wait_seconds"] += time.perf_counter() - waited
            if batch.failed:
                first = batch.failed[0]
                more = f" (and {len(batch.failed) - 1} more in this batch)" if len(batch.failed) > 1 else ""
                raise EvaluationError(
                    f"image {first.key!r} (row {first.index}) cannot be read: {first.error}{more}"
                )

            # One encoder pass per batch, shared by every beam size.
            tick = time.perf_counter()
            pixel_values = batch.pixel_values.to(device, model.dtype, non_blocking=True)
            encoder_outputs = model.get_encoder()(pixel_values, return_dict=True)
            synchronize()
            timings["encode_seconds"] += time.perf_counter() - tick

            for beams in num_beams:
                tick = time.perf_counter()
                results = caption_batch(
                    model,
                    processor.tokenizer,
                    encoder_outputs=encoder_outputs,
                    num_beams=beams,
                    num_return_sequences=1,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                )
                timings[f"generate_seconds_beam_{beams}"] += time.perf_counter() - tick
                for index, result in zip(batch.positions, results, strict=True):
                    captions[beams][index] = " ".join(result.caption.split())  # one line, single spaces
            bar.update(len(batch.positions))
            waited = time.perf_counter()
    timings["captioning_seconds"] = time.perf_counter() - started
    timings["images_per_second"] = len(rows) / max(timings["captioning_seconds"], 1e-9)
    missing = [i for i, text in enumerate(captions[num_beams[0]]) if text is None]
    if missing:  # cannot happen with a sequential sampler; guard against silent gaps anyway
        examples = [str(rows["image_id"][i]) for i in missing[:3]]
        raise RuntimeError(f"{len(missing)} images were not captioned, e.g. {examples}")
    return {f"beam_{beams}": list(texts) for beams, texts in captions.items()}, timings


# --------------------------------------------------------------------------------------------------
# A predictions file
# --------------------------------------------------------------------------------------------------


def read_predictions(
    path: str | os.PathLike,
    references: Mapping[str, list[str]],
    where: str = "the split",
    entry: str | None = None,
) -> list[str]:
    """Captions of a predictions file, in the order of `references` (the split's order), each on one line.

    The file holds one JSON object per line, {"image_id": ..., "caption": ...} (other keys are ignored),
    or one JSON array of such objects, or is a report of `build_report` (`entry` picks its results entry,
    e.g. "beam_3", when it holds several). Every image of the split needs exactly one caption; `where` names
    the split in the errors.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise EvaluationError(f"--predictions {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise EvaluationError(f"--predictions {path}: not UTF-8 text ({error.reason})") from None
    entries = _prediction_entries(path, text, entry)
    if not entries:
        raise EvaluationError(f"{path}: no predictions in the file")

    captions: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    for label, row in entries:
        image_id, caption = _prediction_of(label, row)
        if image_id in captions:
            raise EvaluationError(f"{label}: image_id {image_id!r} again (first at {first_seen[image_id]})")
        if image_id not in references:
            raise EvaluationError(
                f"{label}: unknown image_id {image_id!r}: {where} has no such image "
                f"({len(references)} images, e.g. {list(references)[:3]}; --max-samples keeps only the first N)"
            )
        captions[image_id] = caption
        first_seen[image_id] = label.split(": ", 1)[1]

    missing = [image_id for image_id in references if image_id not in captions]
    if missing:
        raise EvaluationError(
            f"{path}: no caption for {len(missing)} of the {len(references)} images of {where}, "
            f"e.g. {missing[:5]}"
        )
    # One line with single spaces: a newline in a hypothesis makes METEOR wait forever.
    return [" ".join(captions[image_id].split()) for image_id in references]


def _prediction_entries(path: Path, text: str, entry: str | None) -> list[tuple[str, Any]]:
    """(how an error names it, the parsed value) of each prediction. A file that parses as a whole into a list
    is a JSON array, into an object with "predictions" a report; else it is JSON lines."""
    whole: Any = None
    if text.lstrip().startswith(("[", "{")):
        with contextlib.suppress(json.JSONDecodeError):
            whole = json.loads(text)
    if isinstance(whole, list):
        return [(f"{path}: entry {n}", value) for n, value in enumerate(whole, start=1)]
    if isinstance(whole, dict) and isinstance(whole.get("predictions"), dict):
        available = list(whole["predictions"])
        if entry is None and len(available) == 1:
            entry = available[0]
        if entry not in available:
            raise EvaluationError(
                f"{path} is a results file with captions for {available}: pick one with --predictions-entry"
            )
        rows = whole["predictions"][entry]
        return [(f"{path}: predictions.{entry} entry {n}", value) for n, value in enumerate(rows, start=1)]
    # JSON lines are separated by "\n" only: str.splitlines() would also cut at U+2028, U+0085 and the other
    # Unicode line breaks, which JSON strings may hold unescaped.
    entries = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise EvaluationError(
                f"{path}: line {number}: not valid JSON ({error.msg}); expected JSON lines, one object "
                'per line like {"image_id": "...", "caption": "..."}, or a JSON array of such objects'
            ) from None
    return entries


def _prediction_of(label: str, row: Any) -> tuple[str, str]:
    """The (image_id, caption) of one parsed prediction, or an EvaluationError naming it by `label`."""
    if not isinstance(row, dict):
        raise EvaluationError(f"{label}: expected a JSON object with image_id and caption, got {row!r:.60}")
    if "image_id" not in row:
        raise EvaluationError(f"{label}: no image_id")
    image_id = str(row["image_id"])
    caption = row.get("caption")
    if caption is None:
        reason = f" (the captioning run reported: {row['error']})" if "error" in row else ""
        raise EvaluationError(f"{label}: image {image_id!r} has no caption{reason}")
    if not isinstance(caption, str):
        raise EvaluationError(
            f"{label}: the caption of {image_id!r} is a {type(caption).__name__}, not a string"
        )
    return image_id, caption


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def choose_tokenization(approximate: bool = False) -> str:
    """
    The `tokenizer` of the scores: the official one ("ptb"), or "approximate" when asked for. Without Java
    and without `approximate`, an EvaluationError (one line): call it before any work, as there are no
    official scores to give.
    """
    if approximate:
        return "approximate"
    if not java_available():
        raise EvaluationError(
            "no working `java` on PATH: official scores need coco-caption's PTB tokeniser, which runs Java "
            "(e.g. `sudo apt-get install default-jre-headless`); or pass --approximate-tokenization for scores "
            "labelled approximate"
        )
    return "ptb"


@dataclass
class Scores:
    """What `score_captions` found: one entry of `results` per captions entry scored, in order."""

    results: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The metric's warnings, each once (e.g. METEOR left out for want of Java).
    warnings: list[str] = field(default_factory=list)
    #: Seconds of scoring per entry, as "scoring_seconds_<entry>".
    timings: dict[str, float] = field(default_factory=dict)
    #: The scoring that failed (e.g. only METEOR asked for and no Java); `results` holds the entries before it.
    error: EvaluationError | None = None


def score_captions(
    captions: Mapping[str, Sequence[str]],
    references: Mapping[str, list[str]],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    meteor_timeout: float = 600.0,
    tokenizer: str = "ptb",
) -> Scores:
    """
    Corpus scores (`compute_caption_metrics`) of each entry of `captions` (e.g. {"beam_3": [...]}, captions
    in the order of `references`). A failing entry stops the scoring and is returned as `Scores.error`, not
    raised, so that the captions can still be written before it is reported.
    """
    reference_lists = list(references.values())
    scores = Scores()
    for label, texts in captions.items():
        tick = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                scores.results[label] = compute_caption_metrics(
                    list(texts),
                    reference_lists,
                    metrics=metrics,
                    meteor_timeout=meteor_timeout,
                    tokenizer=tokenizer,
                )
            except (RuntimeError, ImportError) as error:  # e.g. only METEOR asked for and no Java
                scores.error = EvaluationError(str(error))
        for message in (str(w.message) for w in caught if issubclass(w.category, UserWarning)):
            if message not in scores.warnings:
                scores.warnings.append(message)
        if scores.error is not None:
            break
        scores.timings[f"scoring_seconds_{label}"] = time.perf_counter() - tick
    return scores


def best_label(results: Mapping[str, Mapping[str, float]]) -> str:
    """The results entry with the highest BLEU-4 (the first one when BLEU was not computed)."""
    labels = list(results)
    if not all("bleu_4" in results[label] for label in labels):
        return labels[0]
    return max(labels, key=lambda label: results[label]["bleu_4"])


def format_table(
    results: Mapping[str, Mapping[str, float]],
    retrieval: Mapping[str, Any] | None = None,
    tokenizer: str = "ptb",
) -> str:
    """
    Beam size x metric, in percent with one decimal as in the paper (CIDEr x 100 too); approximate scores
    say so above the table and in every row; then Recall@K of `retrieval` when given.
    """
    approximate = tokenizer == "approximate"
    columns = [(key, name) for key, name in TABLE_COLUMNS if any(key in s for s in results.values())]
    rows = [["Decoding", *(name for _, name in columns)]]
    for label, scores in results.items():
        decoding = label.replace("beam_", "beam ") if label.startswith("beam_") else label
        decoding += " (approx.)" if approximate else ""
        rows.append([decoding, *(f"{100 * scores[key]:.1f}" if key in scores else "-" for key, _ in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"scores: {TOKENIZATION_LABELS[tokenizer]}"] if approximate else []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    if retrieval:
        recalls = "  ".join(f"R@{k} {100 * retrieval[f'recall@{k}']:.1f}" for k in RETRIEVAL_KS)
        lines.append("")
        lines.append(
            f"text->image retrieval ({retrieval['num_queries']} captions, {retrieval['num_images']} images): "
            f"{recalls}  median rank {retrieval['median_rank']:g}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------


def run_retrieval(
    model: Any,
    processor: Any,
    rows: Any,
    *,
    batch_size: int | None = None,
    bf16: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], float]:
    """Text-to-image Recall@1/5/10 over the split (`show_attend_tell.retrieval.retrieval_recall`), and seconds."""
    import torch

    from .retrieval import retrieval_recall

    kwargs = {"batch_size": batch_size} if batch_size else {}
    autocast = (
        torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    tick = time.perf_counter()
    with torch.inference_mode(), autocast:
        recall = retrieval_recall(model, processor, rows, ks=RETRIEVAL_KS, progress=progress, **kwargs)
    return dict(recall), time.perf_counter() - tick


# --------------------------------------------------------------------------------------------------
# The report and the model card
# --------------------------------------------------------------------------------------------------


def build_report(
    *,
    model: str | None,
    dataset: str,
    split: str,
    references: Mapping[str, list[str]],
    captions: Mapping[str, Sequence[str]],
    scores: Scores,
    tokenizer: str,
    settings: Mapping[str, Any],
    timings: Mapping[str, Any],
    retrieval: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report described in this module's docstring: scores, every caption with its references,
    the settings (with the tokenisation's label added), timings, warnings and package versions."""
    report: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "split": split,
        "num_images": len(references),
        "tokenization": tokenizer,
        "results": scores.results,
        "predictions": {
            label: [
                {"image_id": image_id, "caption": caption, "references": references[image_id]}
                for image_id, caption in zip(references, texts, strict=True)
            ]
            for label, texts in captions.items()
        },
        "settings": {**settings, "tokenization": TOKENIZATION_LABELS[tokenizer]},
        "timings": dict(timings),
        "warnings": scores.warnings,
        "versions": versions(),
    }
    if retrieval is not None:
        report["retrieval"] = dict(retrieval)
    return report


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Writes the report as indented JSON, atomically (a reader sees the old file or the whole new one)."""
    write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def card_results(report: Mapping[str, Any], beams: str = "best") -> dict[str, Any]:
    """
    The part of a report that a model card shows (what `show_attend_tell.hub.render_model_card` reads): its
    results entries, all of them or (`beams="best"`) the best by BLEU-4, and the facts about how they were
    made (dataset, split, tokenisation, the first N images); not the captions, settings or local paths.
    """
    if beams not in ("best", "all"):
        raise ValueError(f"beams must be 'best' or 'all', got {beams!r}")
    results = report["results"]
    labels = [best_label(results)] if beams == "best" else list(results)
    settings = report.get("settings") or {}
    return {
        "dataset": report["dataset"],
        "split": report["split"],
        "num_images": report["num_images"],
        "tokenization": report["tokenization"],
        "results": {label: dict(results[label]) for label in labels},
        "settings": {"max_samples": settings.get("max_samples")},
    }


def update_model_card(card_path: str | os.PathLike, report: Mapping[str, Any], beams: str = "best") -> None:
    """Rewrites a model card's model-index metadata and results table with the report's scores (`card_results`);
    the rest of the card is kept."""
    from .hub import render_model_card

    card_path = Path(card_path)
    card = render_model_card(card_path.read_text(encoding="utf-8"), eval_results=card_results(report, beams))
    write_text_atomic(card_path, card if card.endswith("\n") else card + "\n")


# --------------------------------------------------------------------------------------------------
# The command line's run (scripts/evaluate_captions.py)
# --------------------------------------------------------------------------------------------------


def prepare_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """
    The device, and the model and processor of --model on it with the decoding options asked for, loaded as every
    script loads one (`load_model_and_processor`: the folder's code files run only with --trust-remote-code).
    """
    import torch

    from .device import pick_device
    from .hub import load_model_and_processor, set_decoding_options

    try:
        device = pick_device(args.device)
    except ValueError as error:
        raise EvaluationError(f"--device {error}") from None
    if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EvaluationError("--bf16: this GPU does not support bfloat16")
    try:
        model, processor = load_model_and_processor(
            args.model, device=device, trust_remote_code=args.trust_remote_code
        )
    except OSError as error:
        raise EvaluationError(f"--model {args.model}: cannot load it ({error})") from None
    if not hasattr(model, "generate"):
        raise EvaluationError(f"--model {args.model}: {type(model).__name__} cannot generate captions")
    try:
        set_decoding_options(
            model, fuse_attention_scores=args.fuse_attention, capture_steps=args.capture_steps
        )
    except ValueError as error:
        raise EvaluationError(f"--model {args.model}: {error}") from None
    print(f"model {args.model} on {device}{' (bf16 autocast)' if args.bf16 else ''}")
    return device, model, processor


def evaluate(args: argparse.Namespace) -> int:
    """
    What `scripts/evaluate_captions.py` does with its parsed command line (`args` holds its options): captions
    the split (or reads `--predictions`), scores it, prints the table, writes the report and updates the card;
    0 when done. Raises EvaluationError (one line) for what the user can fix.
    """
    started = time.perf_counter()
    tokenizer = choose_tokenization(args.approximate_tokenization)  # before any work
    try:
        rows = load_split(
            args.dataset,
            args.split,
            data_dir=args.data_dir,
            image_dir=args.image_dir,
            cache_dir=args.cache_dir,
            max_samples=args.max_samples,
            options=args.dataset_options,
        )
    except DatasetDownloadError as error:  # no network: say how to get the files, in this script's options
        raise EvaluationError(f"--dataset {args.dataset}: {error.command_line_message()}") from None
    references = references_by_id(rows)
    where = f"the {args.split} split of {args.dataset}"
    print(f"{where}: {len(references)} images, {sum(map(len, references.values()))} reference captions")
    timings: dict[str, Any] = {"data_seconds": time.perf_counter() - started}

    # Captions: {results entry: captions in the split's order}.
    retrieval = device = None
    if args.predictions is not None:
        captions = {
            PREDICTIONS_LABEL: read_predictions(args.predictions, references, where, args.predictions_entry)
        }
    else:
        device, model, processor = prepare_model(args)
        captions, caption_timings = caption_split(
            model,
            processor,
            rows,
            num_beams=args.num_beams,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_workers=args.num_workers,
            bf16=args.bf16,
            progress=not args.no_progress,
        )
        timings.update(caption_timings)
        if args.retrieval:
            retrieval, timings["retrieval_seconds"] = run_retrieval(
                model,
                processor,
                rows,
                batch_size=args.retrieval_batch_size,
                bf16=args.bf16,
                progress=not args.no_progress,
            )

    # One corpus per beam size. A failure (e.g. only METEOR asked for and no Java) still writes the captions
    # below, so that they need not be generated again.
    scores = score_captions(
        captions, references, metrics=args.metrics, meteor_timeout=args.meteor_timeout, tokenizer=tokenizer
    )
    timings.update(scores.timings, total_seconds=time.perf_counter() - started)
    for message in scores.warnings:
        print(f"warning: {message}", file=sys.stderr)
    if scores.results:
        print()
        print(format_table(scores.results, retrieval, tokenizer))
    if len(scores.results) > 1 and all("bleu_4" in s for s in scores.results.values()):
        print(f"best by BLEU-4: {best_label(scores.results).replace('beam_', 'beam ')}")

    report = build_report(
        model=args.model,
        dataset=args.dataset,
        split=args.split,
        references=references,
        captions=captions,
        scores=scores,
        tokenizer=tokenizer,
        settings=_report_settings(args, device),
        timings=timings,
        retrieval=retrieval,
    )
    if args.output is not None:
        write_report(args.output, report)
        print(f"results written to {args.output}")
    if scores.error is not None:
        raise scores.error
    if args.update_model_card is not None:
        update_model_card(args.update_model_card, report, beams=args.card_beams)
        print(f"model card updated: {args.update_model_card}")
    return 0


def _report_settings(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """The options that made the report's numbers."""
    return {
        "predictions_file": str(args.predictions) if args.predictions is not None else None,
        "num_beams": args.num_beams if args.predictions is None else None,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "num_workers": args.num_workers,
        "device": str(device) if device is not None else None,
        "bf16": args.bf16,
        "fuse_attention": args.fuse_attention,
        "capture_steps": args.capture_steps,
        "metrics": args.metrics,
        "max_samples": args.max_samples,
        "data_dir": args.data_dir,
        "dataset_options": args.dataset_options,
    }


def versions() -> dict[str, str]:
    """Python's version and those of the packages that make the scores."""
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "pycocoevalcap", "show-attend-tell"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


__all__ = [
    "PREDICTIONS_LABEL",
    "RETRIEVAL_KS",
    "TABLE_COLUMNS",
    "EvaluationError",
    "Scores",
    "best_label",
    "build_report",
    "caption_split",
    "card_results",
    "choose_tokenization",
    "evaluate",
    "format_table",
    "load_split",
    "prepare_model",
    "read_predictions",
    "references_by_id",
    "run_retrieval",
    "score_captions",
    "update_model_card",
    "versions",
    "write_report",
]
