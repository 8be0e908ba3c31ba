"""The command line of training (`scripts/train.py`): its options, and the checks that need no data and no
model, so that a typo fails in a second rather than after an hour of data loading."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..data import add_dataset_option_argument, canonical_split, parse_dataset_options
from ..data.loading import NAMED_SOURCES
from .checkpoint import CheckpointError, list_checkpoints, resolve_checkpoint
from .model_sizes import MODEL_SIZES


class UsageError(Exception):
    """A bad command line, found before any work starts."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones ("default: None" says nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], False):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `scripts/train.py` (and of `train()` from Python: parse, `check_args`, call)."""
    parser = argparse.ArgumentParser(
        description="Train Show, Attend and Tell (runs on one or many processes with `accelerate launch`).",
        formatter_class=HelpFormatter,
    )
    add_data_and_model_options(parser)
    add_training_and_output_options(parser)
    return parser


def add_data_and_model_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="flickr30k",  # the same default as scripts/evaluate_captions.py
        help="flickr30k (datasets hub, Karpathy splits) | synthetic | karpathy/parquet/imagefolder (with "
        "--data-dir) | a path: Karpathy split JSON, parquet file or folder, image folder with metadata",
    )
    data.add_argument("--data-dir", help="local copy of the data for the named sources")
    data.add_argument(
        "--image-dir", help="image folder of a Karpathy split JSON (default: images/ next to it)"
    )
    data.add_argument("--dataset-cache-dir", help="cache of the datasets library / of the synthetic data")
    add_dataset_option_argument(data)
    data.add_argument("--train-split", default="train", help="split to train on (val, dev... accepted)")
    data.add_argument("--val-split", default="validation", help="split validated on after every epoch")
    data.add_argument("--max-train-samples", type=int, help="train on the first N images only")
    data.add_argument("--max-val-samples", type=int, help="validate on the first N images (0: no validation)")
    data.add_argument("--captions-per-image", type=int, default=5, help="caption rows per image in a batch")
    data.add_argument("--min-word-freq", type=int, default=5, help="rarer training words become <unk>")
    data.add_argument("--max-caption-words", type=int, default=50, help="longer captions are truncated")
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding images")
    data.add_argument(
        "--check-images",
        type=int,
        default=200,
        help="images decoded before training to catch a broken dataset",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-size",
        choices=MODEL_SIZES,
        default="full",
        help="full: the specification's model; small: the demo's; tiny: tests",
    )
    model.add_argument("--image-size", type=int, help="side the pictures are resized to (default: per size)")
    model.add_argument("--embed-dim", type=int, help="word embedding size (default: per --model-size)")
    model.add_argument("--attention-dim", type=int, help="attention network size (default: per size)")
    model.add_argument("--decoder-dim", type=int, help="LSTM size (default: per size)")
    model.add_argument("--dropout", type=float, help="dropout before the output layer (default: per size)")
    model.add_argument("--encoded-image-size", type=int, help="side of the grid the decoder attends over")
    model.add_argument(
        "--no-pretrained-encoder",
        action="store_true",
        help="do not load torchvision's ImageNet weights into the encoder (they exist for --model-size full)",
    )
    model.add_argument("--fine-tune-encoder", action="store_true", help="train the encoder's last stages too")
    model.add_argument(
        "--fine-tune-stages", default="3", help="stages trained by --fine-tune-encoder, or 'all'"
    )


def add_training_and_output_options(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    optim.add_argument("--batch-size", type=int, default=64, help="captions per process and forward pass")
    optim.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="batches per optimizer step"
    )
    optim.add_argument("--decoder-lr", type=float, default=4e-4, help="Adam learning rate of the decoder")
    optim.add_argument("--encoder-lr", type=float, default=1e-4, help="... of the encoder, when fine-tuned")
    optim.add_argument("--alpha-c", type=float, default=1.0, help="weight of the doubly-stochastic penalty")
    optim.add_argument("--grad-clip", type=float, default=5.0, help="clip gradients to +-this value (0: off)")
    optim.add_argument(
        "--lr-decay-patience", type=int, default=8, help="epochs without BLEU-4 gain per decay"
    )
    optim.add_argument("--lr-decay-factor", type=float, default=0.8, help="learning-rate factor per decay")
    optim.add_argument("--early-stopping-patience", type=int, default=20, help="epochs without BLEU-4 gain")
    optim.add_argument(
        "--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="fp16: GPUs only"
    )
    optim.add_argument("--seed", type=int, default=42, help="weights, batch order, captions, dropout")

    budget = parser.add_argument_group("budget (whichever comes first; totals over resumed runs)")
    budget.add_argument("--max-steps", type=int, help="optimizer steps")
    budget.add_argument("--max-train-images", type=int, help="images trained on (a fixed amount of work)")
    budget.add_argument("--max-minutes", type=float, help="wall-clock minutes of training")

    val = parser.add_argument_group("validation (every epoch, by real decoding)")
    val.add_argument("--val-num-beams", type=int, default=1, help="1: greedy")
    val.add_argument("--val-batch-size", type=int, default=32, help="images per generate() call")
    val.add_argument("--val-max-new-tokens", type=int, help="default: --max-caption-words + 1")

    out = parser.add_argument_group("output and checkpoints")
    out.add_argument(
        "--output-dir", default="runs/show-attend-tell", help="model/, checkpoints/, logs/, metrics.json"
    )
    out.add_argument(
        "--overwrite-output-dir", action="store_true", help="start afresh over earlier checkpoints"
    )
    out.add_argument("--checkpoint-steps", type=int, default=500, help="also at every epoch end; 0: never")
    out.add_argument("--keep-checkpoints", type=int, default=3, help="the newest K are kept")
    out.add_argument("--resume-from-checkpoint", metavar="latest|DIR", help="continue a run where it stopped")
    out.add_argument(
        "--cache-features", action="store_true", help="frozen encoder: keep its features on disk"
    )
    out.add_argument("--feature-cache-dir", help="default: OUTPUT/feature_cache")
    out.add_argument(
        "--report-to", choices=("tensorboard", "none"), default="tensorboard", help="logs/ tracker"
    )
    out.add_argument("--log-steps", type=int, default=10, help="log the training loss every N steps")


def check_numbers(args: argparse.Namespace) -> None:
    """Numbers in range: counts positive, learning rates finite, dropout a probability."""
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


def check_args(args: argparse.Namespace) -> None:
    """
    Validates the options of `scripts/train.py` in place: numbers in range, split names (made canonical),
    paths that exist, `--dataset-option`s (parsed into `args.dataset_options`), and the checkpoint to resume
    (`args.resume_path`, None for a fresh start).

    Raises:
        UsageError: with a message naming the option and what to do.
    """
    check_numbers(args)
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
    try:
        args.dataset_options = parse_dataset_options(args.dataset_option)
    except ValueError as error:
        raise UsageError(str(error)) from None

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


__all__ = ["HelpFormatter", "UsageError", "build_parser", "check_args"]
