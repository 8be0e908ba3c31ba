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
costs one encoder pass, not three), under `torch.inference_mode` and optionally bf16 autocast. This file is
the command line; what it does is `show_attend_tell.evaluation.evaluate(args)`, built from that module's steps
(its docstring describes the report that `--output` writes). Scores use coco-caption's own tokenisation, the
Stanford PTB tokeniser, which needs Java (as METEOR does). Without Java the script says so in one line and stops
before any work, rather than print other numbers; with `--approximate-tokenization` it scores with a pure-Python imitation instead, leaves METEOR
out, and labels the scores approximate in the table, the JSON and the model card.

With `--predictions FILE` the one entry of the report's "results" and "predictions" is named "predictions". Such
a report is itself accepted by `--predictions` (`--predictions-entry beam_3` picks the beam size), so captions can
be scored again, e.g. with METEOR once Java is installed, without generating them again.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from show_attend_tell import evaluation
from show_attend_tell.data import add_dataset_option_argument, parse_dataset_options
from show_attend_tell.device import add_device_argument
from show_attend_tell.evaluation import EvaluationError
from show_attend_tell.hub import add_decoding_option_arguments, add_trust_remote_code_argument
from show_attend_tell.metrics import DEFAULT_METRICS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CARD = REPO_ROOT / "model_card.md"
PROG = "evaluate_captions.py"

# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options: what to score (a model or a predictions file), the data, captioning, scoring and output."""
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

    add_trust_remote_code_argument(parser)
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
    add_dataset_option_argument(data)
    data.add_argument("--split", default="test", help="train, validation (val) or test (default %(default)s)")
    data.add_argument("--max-samples", type=int, help="evaluate only the first N images of the split")
    _add_captioning_options(parser.add_argument_group("captioning"))
    _add_scoring_options(parser.add_argument_group("scoring and output"))
    return parser


def _add_captioning_options(decoding: argparse._ArgumentGroup) -> None:
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
    add_device_argument(decoding)
    decoding.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")
    add_decoding_option_arguments(decoding)


def _add_scoring_options(scoring: argparse._ArgumentGroup) -> None:
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: numbers in range, paths that exist, `--dataset-option`s parsed."""
    parser = build_parser()
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
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return evaluation.evaluate(args)
    except EvaluationError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
