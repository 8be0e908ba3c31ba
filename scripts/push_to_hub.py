#!/usr/bin/env python
"""Publish a trained Show, Attend and Tell model on the Hugging Face Hub.

    python scripts/push_to_hub.py --model outputs/model --repo-id me/show-attend-tell \\
        --eval-results outputs/eval/results.json [--private]
    python scripts/push_to_hub.py --model outputs/model --repo-id me/show-attend-tell --dry-run hub-folder/

Assembles the complete repository folder (safetensors weights, config with the Auto-class map and the
image-to-text pipeline declaration, generation config, tokenizer, image processor, processor, the model's
code files, model_card.md rendered as README.md with Hub metadata and, given evaluation results, the
model-index and results table, and an example attention figure), loads it in a fresh Python process that
cannot import this package, and uploads it only if that works. `--dry-run OUT` writes and checks the folder
without uploading.

The card describes this checkpoint, not the paper's: its sizes and usage shapes come from the folder's
config and processor, its training data and hyperparameters from the `training_args.json` and
`metrics.json` that scripts/train.py writes into the model folder (a folder without them says its training
is not recorded). Scores from `scripts/evaluate_captions.py --approximate-tokenization` stay labelled approximate, and
an evaluation of the first N images (`--max-samples`) stays "test (first N)".

The token is read by huggingface_hub from where it keeps it (`HF_TOKEN`, or `hf auth login`); it is never
written into the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CARD = REPO_ROOT / "model_card.md"
PROG = "push_to_hub.py"


def make_api() -> Any:
    """The Hub client; fails early, with what to do, when no token is configured."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise SystemExit(
            f"{PROG}: error: no Hugging Face token found: run `hf auth login` or set HF_TOKEN "
            "(use --dry-run OUT to build the folder without uploading)"
        )
    return HfApi()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Assemble, check and upload a model repository.")
    parser.add_argument("--model", required=True, help="the trained model folder (safetensors weights)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. your-name/show-attend-tell")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--dry-run", type=Path, metavar="OUT", help="write and check the folder here; no upload"
    )
    parser.add_argument(
        "--eval-results", type=Path, help="evaluation JSON (scripts/evaluate_captions.py) for the card"
    )
    parser.add_argument("--example-image", type=Path, help="picture for the card's attention figure")
    parser.add_argument("--no-figure", action="store_true", help="do not draw the example attention figure")
    parser.add_argument("--card", type=Path, default=DEFAULT_CARD, help="model card template (model_card.md)")
    parser.add_argument("--commit-message", default="Upload Show, Attend and Tell model")
    args = parser.parse_args(argv)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        parser.error(f"--repo-id: {error}")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model} is not a folder")
    if not args.card.is_file():
        parser.error(f"--card {args.card} not found")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from show_attend_tell import hub
    from show_attend_tell.errors import one_line
    from show_attend_tell.image_processing_show_attend_tell import ImageLoadError, load_image

    eval_results = None
    if args.eval_results is not None:
        try:
            eval_results = json.loads(args.eval_results.read_text(encoding="utf-8"))
            hub.normalize_eval_results(eval_results)  # refuse a file the card cannot use, before any work
        except (OSError, ValueError) as error:
            print(f"{PROG}: error: --eval-results {args.eval_results}: {error}", file=sys.stderr)
            return 2
    figure_image = None
    if args.example_image is not None:
        try:
            figure_image = load_image(args.example_image)
        except ImageLoadError as error:
            print(f"{PROG}: error: --example-image {error}", file=sys.stderr)
            return 2
    api = None if args.dry_run else make_api()

    with tempfile.TemporaryDirectory(prefix="sat-hub-") as scratch:
        folder = args.dry_run if args.dry_run else Path(scratch) / "repository"
        try:
            hub.assemble_repository(
                args.model,
                folder,
                card_template=args.card.read_text(encoding="utf-8"),
                repo_id=args.repo_id,
                eval_results=eval_results,
                figure_image=figure_image,
                with_figure=not args.no_figure,
            )
        except (OSError, ValueError) as error:
            print(f"{PROG}: error: cannot read the model: {one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"{PROG}: assembled {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}",
            file=sys.stderr,
        )

        try:
            report = hub.check_folder_loads(folder)
        except RuntimeError as error:
            print(f"{PROG}: error: refusing to upload a folder that does not load: {error}", file=sys.stderr)
            return 1
        print(
            f"{PROG}: loads without this package ({report['model_class']}, {report['pipeline_class']}); "
            f"test caption: {report['caption']!r}",
            file=sys.stderr,
        )
        if args.dry_run:
            print(f"{PROG}: dry run: nothing uploaded; the folder is {folder}", file=sys.stderr)
            return 0
        url = hub.upload_folder(
            folder, args.repo_id, private=args.private, api=api, commit_message=args.commit_message
        )
    print(f"{PROG}: uploaded to {args.repo_id}: {url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
