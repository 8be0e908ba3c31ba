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
costs one encoder pass, not three), under `torch.inference_mode` and optionally bf16 autocast. The scoring,
the table, the JSON report and the model card are `show_attend_tell.evaluation` (its docstring describes the
report that `--output` writes), with coco-caption's own tokenisation, the Stanford PTB tokeniser, which needs
Java (as METEOR does). Without Java the script says so in one line and stops before any work, rather than print
other numbers; with `--approximate-tokenization` it scores with a pure-Python imitation instead, leaves METEOR
out, and labels the scores approximate in the table, the JSON and the model card.

With `--predictions FILE` the one entry of the report's "results" and "predictions" is named "predictions". Such
a report is itself accepted by `--predictions` (`--predictions-entry beam_3` picks the beam size), so captions can
be scored again, e.g. with METEOR once Java is installed, without generating them again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from show_attend_tell import evaluation
from show_attend_tell.data import DATASET_OPTION_HELP, DatasetDownloadError, parse_dataset_options
from show_attend_tell.evaluation import PREDICTIONS_LABEL, EvaluationError
from show_attend_tell.metrics import DEFAULT_METRICS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CARD = REPO_ROOT / "model_card.md"
PROG = "evaluate_captions.py"

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
        help=DATASET_OPTION_HELP,
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
        choices=DEFAULT_METRICS,
        default=list(DEFAULT_METRICS),
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
    args.metrics = [name for name in DEFAULT_METRICS if name in args.metrics]
    if args.model is not None and not Path(args.model).exists() and looks_like_path(args.model):
        parser.error(f"--model {args.model}: no such folder")
    if args.predictions is not None and args.retrieval:
        parser.error("--retrieval needs a model (--model), not a predictions file")
    if args.update_model_card is not None and not args.update_model_card.is_file():
        parser.error(f"--update-model-card: {args.update_model_card} not found")
    try:
        args.dataset_options = parse_dataset_options(args.dataset_option)
    except ValueError as error:
        parser.error(str(error))
    return args


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub repository id ("user/name")."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name


# --------------------------------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------------------------------


def prepare_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """
    The device, and the model and processor of --model on it with the decoding options asked for, loaded as every
    script loads one (`load_model_and_processor`: the folder's code files run only with --trust-remote-code).
    """
    import torch

    from show_attend_tell.device import pick_device
    from show_attend_tell.hub import load_model_and_processor, set_decoding_options

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
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except EvaluationError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tokenizer = evaluation.choose_tokenization(args.approximate_tokenization)  # before any work
    try:
        rows = evaluation.load_split(
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
    references = evaluation.references_by_id(rows)
    where = f"the {args.split} split of {args.dataset}"
    print(f"{where}: {len(references)} images, {sum(map(len, references.values()))} reference captions")
    timings: dict[str, Any] = {"data_seconds": time.perf_counter() - started}

    # Captions: {results entry: captions in the split's order}.
    retrieval = device = None
    if args.predictions is not None:
        captions = {
            PREDICTIONS_LABEL: evaluation.read_predictions(
                args.predictions, references, where, args.predictions_entry
            )
        }
    else:
        device, model, processor = prepare_model(args)
        by_beams, caption_timings = caption_split(model, processor, rows, args, device)
        captions = {f"beam_{beams}": texts for beams, texts in by_beams.items()}
        timings.update(caption_timings)
        if args.retrieval:
            retrieval, timings["retrieval_seconds"] = evaluation.run_retrieval(
                model,
                processor,
                rows,
                batch_size=args.retrieval_batch_size,
                bf16=args.bf16,
                progress=not args.no_progress,
            )

    # One corpus per beam size. A failure (e.g. only METEOR asked for and no Java) still writes the captions
    # below, so that they need not be generated again.
    scores = evaluation.score_captions(
        captions, references, metrics=args.metrics, meteor_timeout=args.meteor_timeout, tokenizer=tokenizer
    )
    timings.update(scores.timings, total_seconds=time.perf_counter() - started)
    for message in scores.warnings:
        print(f"warning: {message}", file=sys.stderr)
    if scores.results:
        print()
        print(evaluation.format_table(scores.results, retrieval, tokenizer))
    if len(scores.results) > 1 and all("bleu_4" in s for s in scores.results.values()):
        print(f"best by BLEU-4: {evaluation.best_label(scores.results).replace('beam_', 'beam ')}")

    report = evaluation.build_report(
        model=args.model,
        dataset=args.dataset,
        split=args.split,
        references=references,
        captions=captions,
        scores=scores,
        tokenizer=tokenizer,
        settings=report_settings(args, device),
        timings=timings,
        retrieval=retrieval,
    )
    if args.output is not None:
        evaluation.write_report(args.output, report)
        print(f"results written to {args.output}")
    if scores.error is not None:
        raise scores.error
    if args.update_model_card is not None:
        evaluation.update_model_card(args.update_model_card, report, beams=args.card_beams)
        print(f"model card updated: {args.update_model_card}")
    return 0


def report_settings(args: argparse.Namespace, device: Any) -> dict[str, Any]:
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


if __name__ == "__main__":
    sys.exit(main())
