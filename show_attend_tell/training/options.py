"""Checks of `scripts/train.py`'s command line that need no data and no model, so that a typo fails in a
second rather than after an hour of data loading."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..data import canonical_split
from ..data.loading import NAMED_SOURCES
from .checkpoint import CheckpointError, list_checkpoints, resolve_checkpoint


class UsageError(Exception):
    """A bad command line, found before any work starts."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones ("default: None" says nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], False):
            return action.help or ""
        return super()._get_help_string(action)


def parse_dataset_options(items: list[str]) -> dict[str, Any]:
    """`["num_train=400", "use_cache=false"]` -> `{"num_train": 400, "use_cache": False}`."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--dataset-option expects KEY=VALUE, got {item!r}")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        options[key.strip()] = value
    return options


def check_args(args: argparse.Namespace) -> None:
    """
    Validates the options of `scripts/train.py` in place: numbers in range, split names (made canonical),
    paths that exist, `--dataset-option`s (parsed into `args.dataset_options`), and the checkpoint to resume
    (`args.resume_path`, None for a fresh start).

    Raises:
        UsageError: with a message naming the option and what to do.
    """
    positive = {
        "--batch-size": args.batch_size,
        "--captions-per-image": args.captions_per_image,
        "--epochs": args.epochs,
        "--gradient-accumulation-steps": args.gradient_accumulation_steps,
        "--min-word-freq": args.min_word_freq,
        "--max-caption-words": args.max_caption_words,
        "--keep-checkpoints": args.keep_checkpoints,
        "--val-num-beams": args.val_num_beams,
        "--val-batch-size": args.val_batch_size,
        "--log-steps": args.log_steps,
        "--lr-decay-patience": args.lr_decay_patience,
        "--early-stopping-patience": args.early_stopping_patience,
    }
    optional_positive = {
        "--max-train-samples": args.max_train_samples,
        "--max-steps": args.max_steps,
        "--max-train-images": args.max_train_images,
        "--max-minutes": args.max_minutes,
        "--image-size": args.image_size,
        "--embed-dim": args.embed_dim,
        "--attention-dim": args.attention_dim,
        "--decoder-dim": args.decoder_dim,
        "--encoded-image-size": args.encoded_image_size,
        "--val-max-new-tokens": args.val_max_new_tokens,
    }
    for name, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if not value > 0:
            raise UsageError(f"{name} must be positive, got {value}")
    for name, value in {
        "--decoder-lr": args.decoder_lr,
        "--encoder-lr": args.encoder_lr,
        "--lr-decay-factor": args.lr_decay_factor,
    }.items():
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{name} must be a positive number, got {value}")
    for name, value in {
        "--num-workers": args.num_workers,
        "--check-images": args.check_images,
        "--checkpoint-steps": args.checkpoint_steps,
        "--grad-clip": args.grad_clip,
        "--alpha-c": args.alpha_c,
        "--max-val-samples": args.max_val_samples if args.max_val_samples is not None else 0,
    }.items():
        if value < 0:
            raise UsageError(f"{name} must not be negative, got {value}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.batch_size < args.captions_per_image:
        raise UsageError(
            f"--batch-size {args.batch_size} is smaller than --captions-per-image {args.captions_per_image}: "
            "a batch needs room for at least one image's captions"
        )
    if args.fine_tune_stages != "all" and not (
        args.fine_tune_stages.isdigit() and int(args.fine_tune_stages) > 0
    ):
        raise UsageError(
            f"--fine-tune-stages must be a positive number or 'all', got {args.fine_tune_stages!r}"
        )
    if args.cache_features and args.fine_tune_encoder:
        raise UsageError("--cache-features needs a frozen encoder: its features change when it is fine-tuned")

    try:
        args.train_split = canonical_split(args.train_split, where="--train-split")
        args.val_split = canonical_split(args.val_split, where="--val-split")
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.train_split == args.val_split:
        raise UsageError(f"--train-split and --val-split are both {args.train_split!r}")
    args.dataset_options = parse_dataset_options(args.dataset_option)

    source = args.dataset.strip().lower()
    if source in ("karpathy", "parquet", "imagefolder") and args.data_dir is None:
        raise UsageError(f"--dataset {source} needs --data-dir (the files to read)")
    if source not in NAMED_SOURCES and not Path(args.dataset).expanduser().exists():
        raise UsageError(
            f"--dataset {args.dataset!r}: no such file or folder (named sources: {', '.join(NAMED_SOURCES)})"
        )
    for name, value in (("--data-dir", args.data_dir), ("--image-dir", args.image_dir)):
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"{name} {value}: no such folder")

    output = Path(args.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output-dir {output} exists and is not a folder")
    checkpoints = output / "checkpoints"
    args.resume_path = None
    if args.resume_from_checkpoint:
        try:
            args.resume_path = resolve_checkpoint(args.resume_from_checkpoint, checkpoints)
        except CheckpointError as error:
            raise UsageError(str(error)) from None
    elif list_checkpoints(checkpoints) and not args.overwrite_output_dir:
        raise UsageError(
            f"{output} already holds checkpoints of an earlier run: pass --resume-from-checkpoint latest to "
            "continue it, --overwrite-output-dir to start afresh, or another --output-dir"
        )


__all__ = ["HelpFormatter", "UsageError", "check_args", "parse_dataset_options"]
