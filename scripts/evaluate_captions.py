#!/usr/bin/env python
"""Score a Show, Attend and Tell model with the coco-caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr).

    # caption the Flickr30K test split with beams 1, 3 and 5, print a table, write the scores and captions
    python scripts/evaluate_captions.py --model outputs/model --dataset flickr30k --split test \\
        --num-beams 1 3 5 --output outputs/eval/results.json

    # score captions made elsewhere (JSON lines with image_id and caption, e.g. from scripts/caption.py)
    python scripts/evaluate_captions.py --predictions test.jsonl --dataset flickr30k --split test

    # also put the scores into model_card.md (model-index metadata and results table)
    python scripts/evaluate_captions.py --model outputs/model --dataset flickr30k --update-model-card

    # quick look on the embedded synthetic data
    python scripts/evaluate_captions.py --model outputs/demo/model --dataset synthetic --max-samples 50

How it works: DataLoader workers decode and preprocess the pictures; the main process runs the encoder
once per batch and `model.generate()` once per beam size on the same features (so `--num-beams 1 3 5`
costs one encoder pass, not three), under `torch.inference_mode` and optionally bf16 autocast. Captions
are decoded with the processor's `batch_decode`, which drops <start>, <end> and <pad>. The scores are
corpus-level, computed by `show_attend_tell.metrics.compute_caption_metrics` (pycocoevalcap definitions)
with coco-caption's own tokenisation, the Stanford PTB tokeniser, which needs Java (as METEOR does). Without
Java the script says so in one line and stops before any work, rather than print other numbers; with
`--approximate-tokenization` it scores with a pure-Python imitation instead, leaves METEOR out, and labels the
scores approximate in the table, the JSON (`"tokenization": "approximate"`) and the model card.

The JSON written by `--output`:

    {"model": ..., "dataset": ..., "split": ..., "num_images": N,
     "tokenization": "ptb",                # or "approximate" (--approximate-tokenization): not official scores
     "results": {"beam_1": {"bleu_1": ..., ..., "cider": ...}, "beam_3": {...}},   # fractions (CIDEr 0-10)
     "predictions": {"beam_1": [{"image_id", "caption", "references"}, ...], ...},
     "retrieval": {"recall@1": ..., ...},                                        # with --retrieval only
     "settings": {...}, "timings": {...}, "warnings": [...], "versions": {...}}

With `--predictions FILE` the one entry of "results" and "predictions" is named "predictions". Such a
results file is itself accepted by `--predictions` (`--predictions-entry beam_3` picks the beam size), so
captions can be scored again, e.g. with METEOR once Java is installed, without generating them again.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CARD = REPO_ROOT / "model_card.md"
PROG = "evaluate_captions.py"

METRIC_CHOICES = ("bleu", "meteor", "rouge", "cider")
# (key in the scores, column name in the table), in the paper's order.
TABLE_COLUMNS = [
    ("bleu_1", "BLEU-1"),
    ("bleu_2", "BLEU-2"),
    ("bleu_3", "BLEU-3"),
    ("bleu_4", "BLEU-4"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("cider", "CIDEr"),
]
RETRIEVAL_KS = (1, 5, 10)
PREDICTIONS_LABEL = "predictions"  # the results entry of a --predictions run


class EvaluationError(Exception):
    """A problem with the inputs that the user can fix; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Caption a dataset split and score it with BLEU-1..4, METEOR, ROUGE-L and CIDEr.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a saved model folder (or Hub repository) to caption with")
    source.add_argument(
        "--predictions",
        type=Path,
        help="score this file instead of running a model: JSON lines with image_id and caption "
        "(or a JSON array of such objects, the coco-caption results format)",
    )

    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own code files (*_show_attend_tell.py) instead of this package's classes: "
        "only for folders you trust (default: never)",
    )
    parser.add_argument(
        "--predictions-entry",
        metavar="LABEL",
        help="with --predictions of a results file from this script: which captions to score, e.g. beam_3",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="flickr30k",
        help="flickr30k (default), synthetic, or a path (see load_caption_dataset)",
    )
    data.add_argument("--data-dir", help="local copy of the data for the named sources")
    data.add_argument("--image-dir", help="image folder of a Karpathy split JSON")
    data.add_argument("--cache-dir", help="datasets cache (or the synthetic data's cache)")
    data.add_argument(
        "--dataset-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra option for the dataset loader, e.g. image_size=64 or revision=main (repeatable; "
        "VALUE is read as JSON when it parses, else as a string)",
    )
    data.add_argument("--split", default="test", help="train, validation (val) or test (default %(default)s)")
    data.add_argument("--max-samples", type=int, help="evaluate only the first N images of the split")

    decoding = parser.add_argument_group("captioning")
    decoding.add_argument(
        "--num-beams", type=int, nargs="+", default=[3], help="beam sizes to evaluate (default 3)"
    )
    decoding.add_argument(
        "--batch-size", type=int, default=32, help="images per generate() call (default %(default)s)"
    )
    decoding.add_argument(
        "--max-new-tokens", type=int, default=51, help="longest caption, <end> included (default %(default)s)"
    )
    decoding.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader processes that read the images (default %(default)s)",
    )
    decoding.add_argument(
        "--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:1, ..."
    )
    decoding.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")
    decoding.add_argument(
        "--fuse-attention",
        action="store_true",
        help="compile the attention scores into one kernel (torch.compile: about 10 s once, then faster)",
    )
    decoding.add_argument(
        "--capture-steps",
        action="store_true",
        help="on a GPU, record each decoding step once as a CUDA graph and replay it (same captions; every row "
        "is decoded to the end)",
    )

    scoring = parser.add_argument_group("scoring and output")
    scoring.add_argument(
        "--metrics",
        nargs="+",
        choices=METRIC_CHOICES,
        default=list(METRIC_CHOICES),
        help="scores to compute (default: all four)",
    )
    scoring.add_argument(
        "--meteor-timeout",
        type=float,
        default=600.0,
        help="seconds METEOR's Java process may run (default %(default)g)",
    )
    scoring.add_argument(
        "--approximate-tokenization",
        action="store_true",
        help="without Java: tokenise with a pure-Python imitation of coco-caption's PTB tokeniser and leave METEOR "
        "out; the scores are labelled approximate (table, JSON, model card) and are not comparable with "
        "published ones",
    )
    scoring.add_argument(
        "--output", type=Path, help="write the scores, captions and settings to this JSON file"
    )
    scoring.add_argument(
        "--update-model-card",
        type=Path,
        nargs="?",
        const=DEFAULT_CARD,
        metavar="PATH",
        help=f"write the scores into a model card's model-index and results table (default {DEFAULT_CARD.name})",
    )
    scoring.add_argument(
        "--card-beams",
        choices=("best", "all"),
        default="best",
        help="beam sizes written into the card: the best by BLEU-4 (default) or all",
    )
    scoring.add_argument(
        "--retrieval", action="store_true", help="also report text-to-image Recall@1/5/10 on the split"
    )
    scoring.add_argument("--retrieval-batch-size", type=int, help="decoder rows per forward for --retrieval")
    scoring.add_argument("--no-progress", action="store_true", help="no progress bar")

    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_samples", "retrieval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be 0 or more, got {args.num_workers}")
    if any(beams < 1 for beams in args.num_beams):
        parser.error(f"--num-beams must be at least 1, got {args.num_beams}")
    args.num_beams = sorted(set(args.num_beams))
    args.metrics = [name for name in METRIC_CHOICES if name in args.metrics]
    if args.model is not None and not Path(args.model).exists() and looks_like_path(args.model):
        parser.error(f"--model {args.model}: no such folder")
    if args.predictions is not None and args.retrieval:
        parser.error("--retrieval needs a model (--model), not a predictions file")
    if args.update_model_card is not None and not args.update_model_card.is_file():
        parser.error(f"--update-model-card: {args.update_model_card} not found")
    try:
        args.dataset_options = parse_dataset_options(args.dataset_option)
    except ValueError as error:
        parser.error(f"--dataset-option: {error}")
    return args


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub repository id ("user/name")."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name


def parse_dataset_options(items: Sequence[str]) -> dict[str, Any]:
    """["image_size=64", "revision=main"] -> {"image_size": 64, "revision": "main"}."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_split(args: argparse.Namespace) -> Any:
    """The requested split as a `datasets.Dataset` with image, captions and image_id."""
    from show_attend_tell.data import DatasetDownloadError, canonical_split, load_caption_dataset

    try:
        split = canonical_split(args.split)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    options = dict(args.dataset_options)
    if str(args.dataset).strip().lower() == "synthetic":
        # Synthetic pictures are generated per split and index, so the other splits need not be made.
        for other in ("train", "validation", "test"):
            if other != split:
                options.setdefault(f"num_{other}", 0)
    try:
        dataset = load_caption_dataset(
            args.dataset,
            data_dir=args.data_dir,
            image_dir=args.image_dir,
            cache_dir=args.cache_dir,
            splits=[split],
            max_samples_per_split=args.max_samples,
            **options,
        )
    except DatasetDownloadError as error:  # no network: say how to get the files, in this script's options
        raise EvaluationError(f"--dataset {args.dataset}: {error.command_line_message()}") from None
    except (ValueError, FileNotFoundError) as error:
        raise EvaluationError(f"--dataset {args.dataset}: {error}") from None
    rows = dataset[split]
    if len(rows) == 0:
        raise EvaluationError(f"the {split} split of {args.dataset} is empty")
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


def dataset_display_name(dataset: str) -> str:
    """How the card and table name the data: "Flickr30K" for the hub dataset, else the name given."""
    key = str(dataset).strip().lower()
    if key == "flickr30k":
        return "Flickr30K"
    return Path(dataset).name if os.sep in str(dataset) or "/" in str(dataset) else str(dataset)


# --------------------------------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------------------------------


def load_model(path: str, device: Any, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """
    The model and processor of a saved folder, loaded as every script loads one (`load_model_and_processor`:
    the folder's code files run only with `trust_remote_code`).
    """
    from show_attend_tell.hub import load_model_and_processor

    try:
        model, processor = load_model_and_processor(path, device=device, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise EvaluationError(f"--model {path}: cannot load it ({error})") from None
    if not hasattr(model, "generate"):
        raise EvaluationError(f"--model {path}: {type(model).__name__} cannot generate captions")
    return model, processor


def caption_split(
    model: Any, processor: Any, rows: Any, args: argparse.Namespace, device: Any
) -> tuple[dict[int, list[str]], dict[str, Any]]:
    """
    Captions every image of `rows` with each beam size; returns {beams: captions in row order}, timings.
    The pictures are read in DataLoader workers (`captioning.picture_batches`); each batch gets one encoder
    pass, shared by every beam size's `captioning.caption_batch`.
    """
    import torch
    from tqdm.auto import tqdm

    from show_attend_tell.captioning import caption_batch, picture_batches

    batches = picture_batches(
        rows,
        processor.image_processor,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    captions: dict[int, list[str | None]] = {beams: [None] * len(rows) for beams in args.num_beams}
    timings: dict[str, Any] = {"encode_seconds": 0.0, "data_wait_seconds": 0.0}
    timings.update({f"generate_seconds_beam_{beams}": 0.0 for beams in args.num_beams})

    def synchronize() -> None:  # so that GPU time is charged to the step that spent it
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if args.bf16
        else contextlib.nullcontext()
    )
    progress = tqdm(
        total=len(rows), unit="img", desc=f"captioning (beams {args.num_beams})", disable=args.no_progress
    )
    started = time.perf_counter()
    with torch.inference_mode(), autocast, progress:
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

            for beams in args.num_beams:
                tick = time.perf_counter()
                results = caption_batch(
                    model,
                    processor.tokenizer,
                    encoder_outputs=encoder_outputs,
                    num_beams=beams,
                    num_return_sequences=1,
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                )
                timings[f"generate_seconds_beam_{beams}"] += time.perf_counter() - tick
                for index, result in zip(batch.positions, results, strict=True):
                    captions[beams][index] = " ".join(result.caption.split())  # one line, single spaces
            progress.update(len(batch.positions))
            waited = time.perf_counter()
    timings["captioning_seconds"] = time.perf_counter() - started
    timings["images_per_second"] = len(rows) / max(timings["captioning_seconds"], 1e-9)
    missing = [i for i, text in enumerate(captions[args.num_beams[0]]) if text is None]
    if missing:  # cannot happen with a sequential sampler; guard against silent gaps anyway
        image_ids = rows["image_id"]
        examples = [str(image_ids[i]) for i in missing[:3]]
        raise RuntimeError(f"{len(missing)} images were not captioned, e.g. {examples}")
    return {beams: list(texts) for beams, texts in captions.items()}, timings


# --------------------------------------------------------------------------------------------------
# A predictions file
# --------------------------------------------------------------------------------------------------


def read_predictions(
    path: Path, references: dict[str, list[str]], where: str, entry: str | None = None
) -> list[str]:
    """Captions of a predictions file, in the order of `references` (the split's order).

    The file holds one JSON object per line, {"image_id": ..., "caption": ...} (other keys are ignored),
    or one JSON array of such objects, or is a results file written by this script (`entry` picks its
    beam size, e.g. "beam_3", when it holds several). Every image of the split needs exactly one caption.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise EvaluationError(f"--predictions {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise EvaluationError(f"--predictions {path}: not UTF-8 text ({error.reason})") from None

    # Each entry: (how an error names it, the parsed value). A file that parses as a whole into a list is
    # a JSON array, into an object with "predictions" one of our results files; else it is JSON lines.
    whole: Any = None
    if text.lstrip().startswith(("[", "{")):
        with contextlib.suppress(json.JSONDecodeError):
            whole = json.loads(text)
    entries: list[tuple[str, Any]] = []
    if isinstance(whole, list):
        entries = [(f"{path}: entry {n}", value) for n, value in enumerate(whole, start=1)]
    elif isinstance(whole, dict) and isinstance(whole.get("predictions"), dict):
        available = list(whole["predictions"])
        if entry is None and len(available) == 1:
            entry = available[0]
        if entry not in available:
            raise EvaluationError(
                f"{path} is a results file with captions for {available}: pick one with --predictions-entry"
            )
        rows = whole["predictions"][entry]
        entries = [(f"{path}: predictions.{entry} entry {n}", value) for n, value in enumerate(rows, start=1)]
    else:
        # JSON lines are separated by "\n" only: str.splitlines() would also cut at U+2028, U+0085 and
        # the other Unicode line breaks, which JSON strings may hold unescaped.
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
    if not entries:
        raise EvaluationError(f"{path}: no predictions in the file")

    captions: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    for label, row in entries:
        if not isinstance(row, dict):
            raise EvaluationError(
                f"{label}: expected a JSON object with image_id and caption, got {row!r:.60}"
            )
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
    return [" ".join(captions[image_id].split()) for image_id in references]


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def tokenization(args: argparse.Namespace) -> str:
    """
    The `tokenizer` of the scores: the official one ("ptb"), or "approximate" when asked for. Without Java and
    without the flag, an EvaluationError (one line) before any data is read or caption generated.
    """
    from show_attend_tell.metrics import java_available

    if args.approximate_tokenization:
        return "approximate"
    if not java_available():
        raise EvaluationError(
            "no working `java` on PATH: official scores need coco-caption's PTB tokeniser, which runs Java "
            "(e.g. `sudo apt-get install default-jre-headless`); or pass --approximate-tokenization for scores "
            "labelled approximate"
        )
    return "ptb"


def score(
    captions: list[str],
    references: list[list[str]],
    metrics: list[str],
    meteor_timeout: float,
    tokenizer: str = "ptb",
) -> tuple[dict[str, float], list[str]]:
    """Corpus scores and the metric's warnings (e.g. METEOR left out for want of Java)."""
    from show_attend_tell.metrics import compute_caption_metrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scores = compute_caption_metrics(
                captions, references, metrics=metrics, meteor_timeout=meteor_timeout, tokenizer=tokenizer
            )
        except (RuntimeError, ImportError) as error:  # e.g. only METEOR asked for and no Java
            raise EvaluationError(str(error)) from None
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return scores, messages


def best_label(results: dict[str, dict[str, float]]) -> str:
    """The results entry with the highest BLEU-4 (the first one when BLEU was not computed)."""
    labels = list(results)
    if not all("bleu_4" in results[label] for label in labels):
        return labels[0]
    return max(labels, key=lambda label: results[label]["bleu_4"])


def format_table(
    results: dict[str, dict[str, float]], retrieval: dict[str, Any] | None = None, tokenizer: str = "ptb"
) -> str:
    """
    Beam size x metric, in percent with one decimal as in the paper (CIDEr x 100 too); approximate scores
    say so above the table and in every row.
    """
    from show_attend_tell.metrics import TOKENIZATION_LABELS

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
# Model card
# --------------------------------------------------------------------------------------------------


def card_results(
    results: dict[str, dict[str, float]], dataset_name: str, split: str, which: str, tokenizer: str = "ptb"
) -> dict[str, Any]:
    """The results in the shape `show_attend_tell.hub.render_model_card` reads."""
    labels = [best_label(results)] if which == "best" else list(results)
    entries = []
    for label in labels:
        beams = int(label.removeprefix("beam_")) if label.startswith("beam_") else None
        entries.append({"num_beams": beams, "metrics": dict(results[label])})
    return {"dataset": dataset_name, "split": split, "tokenization": tokenizer, "results": entries}


def update_model_card(card_path: Path, eval_results: dict[str, Any]) -> None:
    """Rewrites the card's model-index metadata and results table with `eval_results` (hub.py's renderer)."""
    from show_attend_tell.atomic_files import write_text_atomic
    from show_attend_tell.hub import render_model_card

    card = render_model_card(card_path.read_text(encoding="utf-8"), eval_results=eval_results)
    write_text_atomic(card_path, card if card.endswith("\n") else card + "\n")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "pycocoevalcap", "show-attend-tell"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except EvaluationError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    timings: dict[str, Any] = {}
    tokenizer = tokenization(args)  # before any work: without Java there are no official scores to give

    rows = load_split(args)
    references = references_by_id(rows)
    image_ids = list(references)
    where = f"the {args.split} split of {args.dataset}"
    print(f"{where}: {len(image_ids)} images, {sum(map(len, references.values()))} reference captions")
    timings["data_seconds"] = time.perf_counter() - started

    # Captions: {label: captions in the split's order}.
    retrieval = None
    device = None
    if args.predictions is not None:
        captions = {
            PREDICTIONS_LABEL: read_predictions(args.predictions, references, where, args.predictions_entry)
        }
    else:
        import torch

        from show_attend_tell.device import pick_device

        try:
            device = pick_device(args.device)
        except ValueError as error:
            raise EvaluationError(f"--device {error}") from None
        if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise EvaluationError("--bf16: this GPU does not support bfloat16")
        model, processor = load_model(args.model, device, args.trust_remote_code)
        from show_attend_tell.hub import set_decoding_options

        try:
            set_decoding_options(
                model, fuse_attention_scores=args.fuse_attention, capture_steps=args.capture_steps
            )
        except ValueError as error:
            raise EvaluationError(f"--model {args.model}: {error}") from None
        print(f"model {args.model} on {device}{' (bf16 autocast)' if args.bf16 else ''}")
        by_beams, caption_timings = caption_split(model, processor, rows, args, device)
        captions = {f"beam_{beams}": texts for beams, texts in by_beams.items()}
        timings.update(caption_timings)
        if args.retrieval:
            retrieval, timings["retrieval_seconds"] = run_retrieval(model, processor, rows, args, device)

    # Scores, one corpus per beam size. A failure here (e.g. only METEOR asked for and no Java) still
    # writes the captions, so they need not be generated again.
    reference_lists = [references[image_id] for image_id in image_ids]
    results: dict[str, dict[str, float]] = {}
    messages: list[str] = []
    scoring_error = None
    for label, texts in captions.items():
        tick = time.perf_counter()
        try:
            results[label], caught = score(
                texts, reference_lists, args.metrics, args.meteor_timeout, tokenizer
            )
        except EvaluationError as error:
            scoring_error = error
            break
        timings[f"scoring_seconds_{label}"] = time.perf_counter() - tick
        messages += [m for m in caught if m not in messages]
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)
    timings["total_seconds"] = time.perf_counter() - started

    if results:
        print()
        print(format_table(results, retrieval, tokenizer))
    if len(results) > 1 and all("bleu_4" in s for s in results.values()):
        print(f"best by BLEU-4: {best_label(results).replace('beam_', 'beam ')}")

    from show_attend_tell.metrics import TOKENIZATION_LABELS

    report = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "num_images": len(image_ids),
        "tokenization": tokenizer,
        "results": results,
        "predictions": {
            label: [
                {"image_id": image_id, "caption": caption, "references": references[image_id]}
                for image_id, caption in zip(image_ids, texts, strict=True)
            ]
            for label, texts in captions.items()
        },
        "settings": {
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
            "tokenization": TOKENIZATION_LABELS[tokenizer],
        },
        "timings": timings,
        "warnings": messages,
        "versions": versions(),
    }
    if retrieval is not None:
        report["retrieval"] = retrieval
    if args.output is not None:
        from show_attend_tell.atomic_files import write_text_atomic

        write_text_atomic(args.output, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.output}")
    if scoring_error is not None:
        raise scoring_error

    if args.update_model_card is not None:
        split_name = args.split if args.max_samples is None else f"{args.split} (first {len(image_ids)})"
        eval_results = card_results(
            results, dataset_display_name(args.dataset), split_name, args.card_beams, tokenizer
        )
        update_model_card(args.update_model_card, eval_results)
        print(f"model card updated: {args.update_model_card}")
    return 0


def run_retrieval(
    model: Any, processor: Any, rows: Any, args: argparse.Namespace, device: Any
) -> tuple[dict, float]:
    """Text-to-image Recall@1/5/10 over the split (show_attend_tell.retrieval)."""
    import torch

    try:
        from show_attend_tell.retrieval import retrieval_recall
    except ImportError as error:
        raise EvaluationError(
            f"--retrieval needs show_attend_tell.retrieval.retrieval_recall ({error})"
        ) from None
    kwargs = {"batch_size": args.retrieval_batch_size} if args.retrieval_batch_size else {}
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if args.bf16
        else contextlib.nullcontext()
    )
    tick = time.perf_counter()
    with torch.inference_mode(), autocast:
        recall = retrieval_recall(
            model, processor, rows, ks=RETRIEVAL_KS, progress=not args.no_progress, **kwargs
        )
    return dict(recall), time.perf_counter() - tick


if __name__ == "__main__":
    sys.exit(main())
