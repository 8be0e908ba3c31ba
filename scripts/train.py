#!/usr/bin/env python
"""Train Show, Attend and Tell with Accelerate.

    python scripts/train.py --dataset flickr30k --output-dir runs/flickr30k      # the specification's run
    accelerate launch scripts/train.py --dataset flickr30k --output-dir runs/f30k  # several GPUs/processes
    python scripts/train.py --dataset synthetic --model-size small --fine-tune-encoder --fine-tune-stages all \
        --output-dir runs/shapes                                                  # a small model on the CPU

The file reads top to bottom: options and their checks, data, model, the training loop, validation,
saving. Accelerate picks the device (a GPU when there is one) and runs the same code on one or many
processes; the reusable pieces (batching, feature cache, checkpoint folders) are in
`show_attend_tell/training/`.

Batches. `--batch-size` counts captions per process and forward pass. A batch holds
`batch_size // captions_per_image` images and `--captions-per-image` (default 5) captions of each: with the
defaults, 12 images x 5 captions = 60 captions. Each image goes through the encoder once per batch and all
its captions attend over the same features. An epoch visits every image once, so with 5 captions per
image it sees every caption of Flickr30K once, like the specification's epoch. The effective batch is
`captions x processes x --gradient-accumulation-steps`.

Output folder (`--output-dir`):
    model/            the complete model folder (best validation BLEU-4; the last weights without validation)
                      that `AutoModel.from_pretrained(..., trust_remote_code=True)` and `pipeline` load
    checkpoints/      `checkpoint-<step>/`: `accelerator.save_state` (safetensors) + training_state.json
    logs/             TensorBoard (loss, lr, top-5 accuracy, validation BLEU-4)
    metrics.json, training_args.json
    feature_cache/    with --cache-features

Resuming. `--resume-from-checkpoint latest|DIR` restores the weights, the optimizer and where training
stood, down to the batch within the epoch. Batch order and caption choice depend only on
(seed, epoch, position), and the random generator that drives dropout is re-seeded from
(seed, epoch, batch, process) before every batch, so a run that is interrupted and resumed ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, is_tensorboard_available
from datasets import Image
from tqdm.auto import tqdm

from show_attend_tell import (
    ShowAttendTellForConditionalGeneration,
    ShowAttendTellImageProcessor,
    ShowAttendTellProcessor,
    ShowAttendTellTokenizer,
)
from show_attend_tell.data import DatasetDownloadError, load_caption_dataset
from show_attend_tell.image_processing_show_attend_tell import load_image
from show_attend_tell.saving import recover_directory, save_model_folder
from show_attend_tell.training import (
    MODEL_SIZES,
    CaptionBatchCollator,
    CaptionTrainingDataset,
    CheckpointError,
    DataError,
    EpochBatchSampler,
    FeatureCache,
    FrozenEncoderFeatures,
    build_model_config,
    check_training_rows,
    feature_cache_key,
    generate_captions,
    list_checkpoints,
    mix_seed,
    model_size,
    read_training_state,
    remove_stale_temporaries,
    usable_captions,
    write_checkpoint,
    write_text_atomic,
)
from show_attend_tell.training.checkpoint import describe_write_error
from show_attend_tell.training.options import HelpFormatter, UsageError, check_args

# Options that must not change when a run is resumed: they decide the model or which batches it sees.
RESUME_INVARIANTS = (
    "dataset", "data_dir", "dataset_option", "train_split", "max_train_samples", "captions_per_image",
    "batch_size", "gradient_accumulation_steps", "min_word_freq", "max_caption_words", "model_size",
    "image_size", "embed_dim", "attention_dim", "decoder_dim", "dropout", "encoded_image_size",
    "fine_tune_encoder", "fine_tune_stages", "seed",
)  # fmt: skip
# Below this many images seen, a run of bad images is not yet "most of the dataset".
MIN_IMAGES_BEFORE_BAD_DATA_STOP = 50


class TrainingError(Exception):
    """Training cannot go on; the message says why and what to do."""


# ==================================================================================================
# Options
# ==================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train Show, Attend and Tell (runs on one or many processes with `accelerate launch`).",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic | flickr30k (datasets hub, Karpathy splits) | karpathy/parquet/imagefolder (with "
        "--data-dir) | a path: Karpathy split JSON, parquet file or folder, image folder with metadata",
    )
    data.add_argument("--data-dir", help="local copy of the data for the named sources")
    data.add_argument(
        "--image-dir", help="image folder of a Karpathy split JSON (default: images/ next to it)"
    )
    data.add_argument("--dataset-cache-dir", help="cache of the datasets library / of the synthetic data")
    data.add_argument(
        "--dataset-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the dataset loader, repeatable; e.g. num_train=400 or image_size=64 for synthetic",
    )
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
    return parser.parse_args(argv)


# ==================================================================================================
# Helpers that run on the main process and tell the others how it went
# ==================================================================================================


def on_main_process(accelerator: Accelerator, what: str, work) -> Any:
    """
    Runs `work()` on the main process only (the others must not write the same files), then shares the
    outcome: if it failed, every process raises the same TrainingError instead of the others waiting
    forever for a process that has stopped.
    """
    outcome: list[Any] = [None, None]
    unexpected = None
    if accelerator.is_main_process:
        try:
            outcome[0] = work()
        except CheckpointError as error:
            outcome[1] = str(error)
        except Exception as error:
            reason = describe_write_error(error)  # a full disk, a missing permission: one line
            if reason is not None:
                outcome[1] = f"could not {what}: {reason}"
            else:  # a bug: the main process shows its traceback, the others stop too
                outcome[1], unexpected = f"could not {what}: {type(error).__name__}: {error}", error
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if unexpected is not None:
        raise unexpected
    if outcome[1] is not None:
        raise TrainingError(outcome[1])
    return outcome[0]


def log(accelerator: Accelerator, message: str) -> None:
    """A line on the main process's console that does not break the progress bar."""
    if accelerator.is_main_process:
        tqdm.write(message)


# ==================================================================================================
# Data
# ==================================================================================================


def load_splits(args: argparse.Namespace, validate: bool):
    """The training split and (when validating) the validation split, as `datasets.Dataset`s."""
    splits = [args.train_split, *([args.val_split] if validate else [])]
    try:
        dataset = load_caption_dataset(
            args.dataset,
            data_dir=args.data_dir,
            image_dir=args.image_dir,
            cache_dir=args.dataset_cache_dir,
            seed=args.seed if args.dataset.strip().lower() == "synthetic" else 0,
            splits=splits,
            **args.dataset_options,
        )
    except DatasetDownloadError as error:  # no network: say how to get the files, in this script's options
        raise DataError(f"cannot load --dataset {args.dataset}: {error.command_line_message()}") from None
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise DataError(f"cannot load --dataset {args.dataset}: {error}") from None
    train_split = dataset[args.train_split]
    if args.max_train_samples is not None:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
    val_split = dataset[args.val_split] if validate else None
    if val_split is not None and args.max_val_samples is not None:
        val_split = val_split.select(range(min(args.max_val_samples, len(val_split))))
    return train_split, val_split


def build_processor(args: argparse.Namespace, train_captions: list[list[str]], image_size: int):
    """The word map from the *training* captions only (counting validation or test words would leak them)."""
    tokenizer = ShowAttendTellTokenizer.train_from_captions(
        (caption for captions in train_captions for caption in captions),
        min_freq=args.min_word_freq,
        model_max_length=args.max_caption_words + 2,
    )
    return ShowAttendTellProcessor(ShowAttendTellImageProcessor(size=image_size), tokenizer)


# ==================================================================================================
# Model
# ==================================================================================================


def build_model(args: argparse.Namespace, vocab_size: int, accelerator: Accelerator):
    """The model of `--model-size`, with ImageNet weights in its encoder when they exist, and frozen stages."""
    size = model_size(args.model_size)
    config = build_model_config(
        args.model_size,
        vocab_size=vocab_size,
        embed_dim=args.embed_dim,
        attention_dim=args.attention_dim,
        decoder_dim=args.decoder_dim,
        dropout=args.dropout,
        encoded_image_size=args.encoded_image_size,
        alpha_c=args.alpha_c,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = ShowAttendTellForConditionalGeneration(config)
    if size.has_imagenet_weights and not args.no_pretrained_encoder:
        try:
            with accelerator.main_process_first():  # one download, then the others read the file
                model.encoder.load_imagenet_weights(progress=accelerator.is_main_process)
        except Exception as error:  # no network, a proxy, a damaged file...
            raise TrainingError(
                f"could not load torchvision's ImageNet weights for the encoder ({type(error).__name__}: "
                f"{error}). Put the file into $TORCH_HOME/hub/checkpoints/ (see the README), or train without "
                "them: --no-pretrained-encoder"
            ) from None
    elif size.has_imagenet_weights:
        log(accelerator, "--no-pretrained-encoder: the encoder starts from random weights")
    stages = len(config.encoder_config.depths)
    if not args.fine_tune_encoder:
        model.encoder.set_trainable_stages(0)
    elif args.fine_tune_stages == "all":
        model.encoder.requires_grad_(True)  # the stem too
    else:
        model.encoder.set_trainable_stages(min(int(args.fine_tune_stages), stages))
    return model


def set_train_mode(model: torch.nn.Module) -> None:
    """Training mode, except for frozen encoder parts: their batch-norm statistics must not move either."""
    model.train()
    resnet = model.encoder.resnet
    for part in [resnet.embedder, *resnet.encoder.stages]:
        if not any(p.requires_grad for p in part.parameters()):
            part.eval()


# ==================================================================================================
# Validation
# ==================================================================================================


def validate(args, accelerator, model, processor, val_split) -> dict[str, Any]:
    """
    Approximate BLEU-1..4 (`bleu_1_approx`..`bleu_4_approx`) of captions decoded by generate() for the
    validation images, shared out over processes: tokenised in Python (fast, no Java), so not comparable
    with published scores, which scripts/evaluate_captions.py computes.
    """
    from show_attend_tell.metrics import compute_caption_metrics

    raw_images = val_split.cast_column("image", Image(decode=False))  # decoded here: one bad file = one row
    images, rows, bad = [], [], 0
    for row in range(accelerator.process_index, len(val_split), accelerator.num_processes):
        try:
            images.append(load_image(raw_images[row]["image"]))
            rows.append(row)
        except Exception:  # skipped like a bad training image
            bad += 1
    generated = generate_captions(
        accelerator.unwrap_model(model),
        processor,
        images,
        batch_size=args.val_batch_size,
        num_beams=args.val_num_beams,
        max_new_tokens=args.val_max_new_tokens or args.max_caption_words + 1,
        autocast=accelerator.autocast,
        device=accelerator.device,
    )
    pairs = sorted(gather_object(list(zip(rows, generated.captions, strict=True))))
    bad = sum(gather_object([bad]))
    scored = [(caption, usable_captions(val_split[row]["captions"])) for row, caption in pairs]
    scored = [(caption, references) for caption, references in scored if references]
    if not scored:
        return {"bleu_4_approx": 0.0, "images": 0, "undecodable_images": bad}
    bleu = compute_caption_metrics(
        [c for c, _ in scored], [r for _, r in scored], metrics=("bleu",), tokenizer="approximate"
    )
    scores = {f"{name}_approx": value for name, value in bleu.items()}
    examples = [{"row": row, "caption": caption} for row, caption in pairs[:3]]
    return {**scores, "images": len(scored), "undecodable_images": bad, "examples": examples}


# ==================================================================================================
# Training
# ==================================================================================================


def train(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir).expanduser()
    checkpoints_dir, model_dir = output_dir / "checkpoints", output_dir / "model"
    image_size = args.image_size or model_size(args.model_size).image_size

    # ---------------------------------------------------------------- Accelerate
    report_to = args.report_to
    if report_to == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed: metrics go to metrics.json only (pip install tensorboard)")
        report_to = "none"
    try:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=None if report_to == "none" else report_to,
            project_dir=str(output_dir),
        )
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--mixed-precision {args.mixed_precision}: {error}") from None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UsageError("this script uses plain data parallelism (DDP); the model fits on one device")
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if int(os.environ.get("WORLD_SIZE", "1")) > world:  # each process would think it is alone
        raise UsageError(
            f"started as {os.environ['WORLD_SIZE']} processes, but Accelerate sees {world}: on a machine "
            "without GPUs, run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
            "scripts/train.py ...` (`accelerate launch --cpu` starts a single process)"
        )
    if args.mixed_precision == "fp16" and device.type == "cpu":
        log(
            accelerator,
            "--mixed-precision fp16 needs a GPU: on the CPU this run computes in float32 (bf16 works)",
        )

    def prepare_output_dir() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass  # fails now, not at the first checkpoint, when the folder is not writable
        if args.overwrite_output_dir and not args.resume_path and checkpoints_dir.exists():
            shutil.rmtree(checkpoints_dir)  # old checkpoints would mix with this run's under "latest"
        if remove_stale_temporaries(checkpoints_dir):
            log(accelerator, "removed the unfinished checkpoint folder of a run that was killed while saving")
        if recover_directory(model_dir):
            log(accelerator, f"put back {model_dir}: a run was killed while replacing it")

    on_main_process(accelerator, f"write to --output-dir {output_dir}", prepare_output_dir)

    # ---------------------------------------------------------------- data
    with accelerator.main_process_first():  # the main process downloads or generates, the others reuse
        train_split, val_split = load_splits(args, validate=args.max_val_samples != 0)
    rows = check_training_rows(train_split, split=args.train_split, image_sample=args.check_images)
    log(accelerator, f"data: {rows.summary()}")
    if val_split is not None and len(val_split) == 0:
        log(accelerator, "the validation split is empty: no validation, the last weights are kept")
        val_split = None

    resumed = read_training_state(args.resume_path) if args.resume_path else None
    if resumed is not None:
        changed = [key for key in RESUME_INVARIANTS if resumed["args"].get(key) != getattr(args, key)]
        if changed:
            listed = "; ".join(
                f"--{key.replace('_', '-')}: {resumed['args'].get(key)!r} then, {getattr(args, key)!r} now"
                for key in changed
            )
            raise UsageError(f"cannot resume {args.resume_path} with different settings ({listed})")
        if resumed["num_processes"] != world:
            raise UsageError(
                f"{args.resume_path} was written by {resumed['num_processes']} process(es); resume it with as "
                f"many (this run has {world})"
            )
        # A resumed run uses the very word map its weights were trained with.
        processor = ShowAttendTellProcessor.from_pretrained(args.resume_path / "processor")
    else:
        kept = train_split.select(rows.kept_rows).select_columns(["captions"])["captions"]
        processor = build_processor(args, [usable_captions(captions) for captions in kept], image_size)
    tokenizer = processor.tokenizer

    # ---------------------------------------------------------------- model and optimizer
    model = build_model(args, len(tokenizer), accelerator)
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    param_groups = [{"params": list(model.decoder.parameters()), "lr": args.decoder_lr}]
    if encoder_params:
        param_groups.append({"params": encoder_params, "lr": args.encoder_lr})
    optimizer = torch.optim.Adam(param_groups)
    model, optimizer = accelerator.prepare(model, optimizer)
    encoder = accelerator.unwrap_model(model).encoder

    frozen_features = None  # with a frozen encoder, features are computed outside the model's forward
    feature_cache = None
    if not encoder_params:
        with torch.no_grad():  # the native grid, e.g. (2048, 8, 8) for ResNet-101 at 256 px
            grid_shape = encoder.eval().encode_grid(torch.zeros(1, 3, image_size, image_size, device=device))[
                0
            ]
        grid_shape = tuple(grid_shape.shape[1:])
        if args.cache_features:
            key = feature_cache_key(
                encoder.state_dict(),
                {
                    "dataset": train_split._fingerprint,
                    "rows": len(train_split),
                    "image_processor": processor.image_processor.to_dict(),
                    "mixed_precision": args.mixed_precision,
                },
            )
            cache_root = Path(args.feature_cache_dir or output_dir / "feature_cache").expanduser()
            on_main_process(
                accelerator,
                f"create the feature cache in {cache_root}",
                lambda: FeatureCache.create(
                    cache_root, key, len(train_split), grid_shape, {"dataset": args.dataset}
                ),
            )
            feature_cache = FeatureCache(cache_root / key, len(train_split), grid_shape)
            per_image = feature_cache.bytes_per_row
            log(
                accelerator,
                f"feature cache: {feature_cache.directory}, {per_image / 1024:.0f} KiB per image (float16, "
                f"{'x'.join(map(str, grid_shape))}): {per_image * len(train_split) / 2**30:.2f} GiB here, "
                f"{per_image * 29000 / 2**30:.1f} GiB for Flickr30K's 29,000 training images",
            )
        frozen_features = FrozenEncoderFeatures(encoder, grid_shape, feature_cache, accelerator.autocast)

    # ---------------------------------------------------------------- batches
    train_data = CaptionTrainingDataset(
        train_split,
        rows.kept_rows,
        tokenizer,
        processor.image_processor,
        captions_per_image=args.captions_per_image,
        seed=args.seed,
        max_caption_words=args.max_caption_words,
        feature_cache=feature_cache,
    )
    log(
        accelerator,
        f"word map: {len(tokenizer)} words (min frequency {args.min_word_freq}, training split only); "
        f"{train_data.truncated_captions} of {train_data.num_captions} training captions longer than "
        f"{args.max_caption_words} words were truncated",
    )
    images_per_batch = args.batch_size // args.captions_per_image
    sampler = EpochBatchSampler(
        len(train_data), images_per_batch, seed=args.seed, num_processes=world, process_index=rank
    )
    loader = torch.utils.data.DataLoader(
        train_data,
        batch_sampler=sampler,
        collate_fn=CaptionBatchCollator(tokenizer.pad_token_id, image_size),
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    accumulation = args.gradient_accumulation_steps
    captions_per_step = images_per_batch * args.captions_per_image * world * accumulation
    log(
        accelerator,
        f"batches: {images_per_batch} images x {args.captions_per_image} captions per forward pass, x {world} "
        f"process(es) x {accumulation} accumulation = {captions_per_step} captions per step, "
        f"{math.ceil(sampler.batches_per_process / accumulation)} steps per epoch; device {device}",
    )

    # ---------------------------------------------------------------- where training stands
    state: dict[str, Any] = {
        "global_step": 0,  # optimizer steps
        "epoch": 0,
        "batches_in_epoch": 0,  # batches of this process already trained on in `epoch`
        "images_seen": 0,
        "train_seconds": 0.0,
        "best_bleu_4": None,
        "best_epoch": None,
        "epochs_without_improvement": 0,
        "bad_images": {},  # image_id -> why it could not be decoded
        "image_visits": 0,  # images read, repeats over epochs included (for the "mostly bad" stop)
        "bad_visits": 0,
        "history": {"train": [], "validation": [], "log": []},
    }
    if resumed is not None:
        accelerator.load_state(str(args.resume_path))
        state.update(resumed["state"])
        log(
            accelerator,
            f"resumed from {args.resume_path}: step {state['global_step']}, epoch {state['epoch'] + 1}, "
            f"batch {state['batches_in_epoch']} of {sampler.batches_per_process}",
        )

    # ---------------------------------------------------------------- saving (main process only)
    run_args = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "num_processes": world, "images_per_batch": images_per_batch}  # fmt: skip

    def save_checkpoint() -> None:
        def fill(folder: Path) -> None:
            accelerator.save_state(str(folder), safe_serialization=True)
            processor.save_pretrained(folder / "processor")
            if feature_cache is not None:
                feature_cache.flush()

        checkpoint_state = json.loads(json.dumps({"state": state, "args": run_args, "num_processes": world}))
        path = on_main_process(
            accelerator,
            "write a checkpoint",
            lambda: write_checkpoint(
                checkpoints_dir, state["global_step"], fill, checkpoint_state, keep_last=args.keep_checkpoints
            ),
        )
        log(accelerator, f"saved checkpoint {path}")

    def metrics(stopped: str | None = None) -> dict[str, Any]:
        undecodable = sorted(set(state["bad_images"]) | set(rows.bad_image_ids))
        return {
            "global_step": state["global_step"],
            "epochs_completed": state["epoch"],
            "images_seen": state["images_seen"],
            "train_seconds": round(state["train_seconds"], 2),
            "images_per_second": round(state["images_seen"] / max(state["train_seconds"], 1e-9), 2),
            "best": {"bleu_4_approx": state["best_bleu_4"], "epoch": state["best_epoch"]},
            "stopped_because": stopped,
            "data": {
                "train_rows": rows.total_rows,
                "skipped_empty_captions": len(rows.empty_caption_ids),
                "skipped_undecodable_images": len(undecodable),
                "empty_caption_ids": rows.empty_caption_ids[:100],
                "undecodable_image_ids": undecodable[:100],
                "truncated_captions": train_data.truncated_captions,
                "vocab_size": len(tokenizer),
            },
            **state["history"],
        }

    def write_metrics(stopped: str | None = None) -> None:
        text = json.dumps(metrics(stopped), indent=2)
        on_main_process(
            accelerator, "write metrics.json", lambda: write_text_atomic(output_dir / "metrics.json", text)
        )

    def save_model(reason: str) -> None:
        extra = {
            "training_args.json": json.dumps(run_args, indent=2),
            "metrics.json": json.dumps(metrics(), indent=2),
        }
        unwrapped = accelerator.unwrap_model(model)
        on_main_process(
            accelerator,
            f"write the model folder {model_dir}",
            lambda: save_model_folder(model_dir, unwrapped, processor, extra_files=extra),
        )
        log(accelerator, f"saved the model folder {model_dir} ({reason})")

    args_text = json.dumps(run_args, indent=2)
    on_main_process(accelerator, "write training_args.json",
                    lambda: write_text_atomic(output_dir / "training_args.json", args_text))  # fmt: skip
    logs_what = f"write the TensorBoard logs in {output_dir / 'logs'}"
    if report_to != "none":
        tracker_config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_args.items()
        }
        on_main_process(
            accelerator, logs_what, lambda: accelerator.init_trackers("logs", config=tracker_config)
        )

    def track(values: dict[str, float], step: int) -> None:
        """Logs to TensorBoard; a log that cannot be written (a full disk) stops the run with one line."""
        if report_to != "none":
            on_main_process(accelerator, logs_what, lambda: accelerator.log(values, step=step))

    # ---------------------------------------------------------------- the loop
    params_to_clip = [p for group in param_groups for p in group["params"]]
    clock_start, seconds_before = time.monotonic(), state["train_seconds"]
    stop_reason = None
    for epoch in range(state["epoch"], args.epochs):
        first_batch = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        train_data.set_epoch(epoch)
        sampler.set_epoch(epoch, first_batch)  # resuming: skip the batches already trained on
        num_batches = sampler.batches_per_process
        set_train_mode(accelerator.unwrap_model(model))
        epoch_stats = torch.zeros(4, device=device)  # loss sum, batches, top-5 hits, targets
        log_stats = torch.zeros(4, device=device)
        group_had_backward = False
        progress = tqdm(total=num_batches, initial=first_batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                        disable=not accelerator.is_main_process, dynamic_ncols=True)  # fmt: skip
        for batch_index, batch in enumerate(loader, start=first_batch):
            progress.update(1)
            group_start = batch_index - batch_index % accumulation
            group_size = min(accumulation, num_batches - group_start)  # the last group may be shorter
            last_in_group = batch_index + 1 == group_start + group_size

            # Counts summed over the processes, so that every process takes the same decisions.
            usable, bad = len(batch["rows"]), len(batch["bad_rows"])
            if bad:
                state["bad_images"].update(zip(batch["bad_ids"], batch["bad_reasons"], strict=True))
                if feature_cache is not None:
                    feature_cache.mark_bad(batch["bad_rows"])
            elapsed = seconds_before + time.monotonic() - clock_start
            over_time = args.max_minutes is not None and elapsed >= args.max_minutes * 60
            flags = torch.tensor([usable, bad, usable == 0, over_time], device=device)
            usable, bad, empty, over_time = accelerator.reduce(flags, "sum").tolist()
            state["images_seen"] += usable
            state["image_visits"] += usable + bad
            state["bad_visits"] += bad
            if (
                state["image_visits"] >= MIN_IMAGES_BEFORE_BAD_DATA_STOP
                and state["bad_visits"] > state["image_visits"] / 2
            ):
                example = next(iter(state["bad_images"].items()), ("?", "?"))
                raise DataError(
                    f"{state['bad_visits']} of {state['image_visits']} images read so far could not be decoded "
                    f"(e.g. image_id {example[0]!r}: {example[1]}); stopping instead of training on what is left"
                )

            if not empty:  # (a batch whose images are all undecodable is skipped by every process)
                torch.manual_seed(mix_seed(args.seed, epoch, batch_index, rank))  # dropout, reproducibly
                input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                with (
                    contextlib.nullcontext() if last_in_group else accelerator.no_sync(model),
                    accelerator.autocast(),
                ):
                    if frozen_features is not None:
                        features = frozen_features(batch, device)
                        outputs = model(encoder_outputs=(features,), input_ids=input_ids, labels=labels)
                    else:
                        outputs = model(
                            pixel_values=batch["pixel_values"].to(device), input_ids=input_ids, labels=labels
                        )
                    accelerator.backward(outputs.loss / group_size)
                group_had_backward = True
                with torch.no_grad():
                    targets = labels != -100
                    top5 = (outputs.logits.topk(5, dim=-1).indices == labels.unsqueeze(-1)).any(-1) & targets
                    stats = torch.stack([outputs.loss.detach().float(), torch.ones((), device=device),
                                         top5.sum().float(), targets.sum().float()])  # fmt: skip
                    log_stats += stats
                    epoch_stats += stats
            if not last_in_group:
                continue

            # ---- an optimizer step
            if group_had_backward:
                if args.grad_clip > 0:
                    # Each gradient value clipped to +-grad_clip, as in the specification's implementation.
                    accelerator.clip_grad_value_(params_to_clip, args.grad_clip)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            group_had_backward = False
            state.update(global_step=state["global_step"] + 1, epoch=epoch, batches_in_epoch=batch_index + 1,
                         train_seconds=seconds_before + time.monotonic() - clock_start)  # fmt: skip
            step = state["global_step"]
            if step % args.log_steps == 0:
                loss_sum, batches, hits, targets = accelerator.reduce(log_stats, "sum").tolist()
                log_stats.zero_()
                if batches:
                    entry = {"step": step, "epoch": epoch + 1, "loss": loss_sum / batches,
                             "top5_accuracy": hits / max(targets, 1), "lr": optimizer.param_groups[0]["lr"],
                             "images_seen": state["images_seen"]}  # fmt: skip
                    state["history"]["log"].append(entry)
                    progress.set_postfix(loss=f"{entry['loss']:.3f}", top5=f"{entry['top5_accuracy']:.3f}")
                    track({f"train/{k}": entry[k] for k in ("loss", "top5_accuracy", "lr")}, step)

            if args.max_steps is not None and step >= args.max_steps:
                stop_reason = "max_steps"
            elif args.max_train_images is not None and state["images_seen"] >= args.max_train_images:
                stop_reason = "max_train_images"
            elif over_time:
                stop_reason = "max_minutes"
            if stop_reason is not None:
                break
            if args.checkpoint_steps and step % args.checkpoint_steps == 0:
                save_checkpoint()
        progress.close()
        if world > 1:  # each process saw the undecodable images of its own batches only
            state["bad_images"] = {
                k: v for part in gather_object([state["bad_images"]]) for k, v in part.items()
            }
        if stop_reason is not None:
            break

        # ---------------------------------------------------------------- end of an epoch
        loss_sum, batches, hits, targets = accelerator.reduce(epoch_stats, "sum").tolist()
        record = {"epoch": epoch + 1, "step": state["global_step"], "loss": loss_sum / max(batches, 1),
                  "top5_accuracy": hits / max(targets, 1), "lr": optimizer.param_groups[0]["lr"],
                  "images_seen": state["images_seen"], "seconds": round(state["train_seconds"], 2),
                  "images_encoded": frozen_features.images_encoded if frozen_features else None}  # fmt: skip
        if frozen_features is not None:
            frozen_features.images_encoded = 0
        state["history"]["train"].append(record)
        message = (
            f"epoch {epoch + 1}: loss {record['loss']:.4f}, top-5 accuracy {record['top5_accuracy']:.4f}"
        )
        if val_split is not None:
            scores = validate(args, accelerator, model, processor, val_split)
            state["history"]["validation"].append(
                {"epoch": epoch + 1, "step": state["global_step"], **scores}
            )
            track({"val/bleu_4_approx": scores["bleu_4_approx"]}, state["global_step"])
            message += f", validation BLEU-4 (approx.) {scores['bleu_4_approx']:.4f}"
            if state["best_bleu_4"] is None or scores["bleu_4_approx"] > state["best_bleu_4"]:
                state.update(
                    best_bleu_4=scores["bleu_4_approx"], best_epoch=epoch + 1, epochs_without_improvement=0
                )
                save_model(f"best validation BLEU-4 (approx.) {scores['bleu_4_approx']:.4f}")
            else:
                state["epochs_without_improvement"] += 1
                message += (
                    f" (best {state['best_bleu_4']:.4f}, {state['epochs_without_improvement']} epochs ago)"
                )
        log(accelerator, message)
        state.update(epoch=epoch + 1, batches_in_epoch=0)
        # The specification's schedule: lr x 0.8 after every 8 epochs without improvement, stop after 20.
        if state["epochs_without_improvement"] >= args.early_stopping_patience:
            stop_reason = "early_stopping"
        elif (
            state["epochs_without_improvement"]
            and state["epochs_without_improvement"] % args.lr_decay_patience == 0
        ):
            for group in optimizer.param_groups:
                group["lr"] *= args.lr_decay_factor
            log(
                accelerator,
                f"no BLEU-4 gain for {state['epochs_without_improvement']} epochs: lr x {args.lr_decay_factor}",
            )
        write_metrics()
        if args.checkpoint_steps:
            save_checkpoint()
        if stop_reason is not None:
            break
    stop_reason = stop_reason or "epochs"

    # ---------------------------------------------------------------- the end
    latest = list_checkpoints(checkpoints_dir)
    if args.checkpoint_steps and (not latest or not latest[-1].name.endswith(f"{state['global_step']:08d}")):
        save_checkpoint()
    if val_split is not None and stop_reason in ("max_steps", "max_train_images", "max_minutes"):
        # Stopped by a budget in the middle of an epoch: these weights get a validation too. Not part of the
        # checkpoint above, so that a resumed run takes the same decisions as an uninterrupted one.
        scores = validate(args, accelerator, model, processor, val_split)
        state["history"]["validation"].append({"epoch": None, "step": state["global_step"], **scores})
        log(accelerator, f"validation BLEU-4 (approx.) at the stop: {scores['bleu_4_approx']:.4f}")
        if state["best_bleu_4"] is None or scores["bleu_4_approx"] > state["best_bleu_4"]:
            state.update(best_bleu_4=scores["bleu_4_approx"], best_epoch=None)
            save_model(f"validation BLEU-4 (approx.) {scores['bleu_4_approx']:.4f} at the stop")
    if val_split is None or not model_dir.exists():
        save_model("the last weights")
    write_metrics(stop_reason)

    # DDP keeps the weights of all processes equal; check it, and say so.
    checksum = parameter_checksum(accelerator.unwrap_model(model))
    print(f"process {rank}/{world}: finished, parameter checksum {checksum}", flush=True)
    if len(set(gather_object([checksum]))) != 1:
        raise TrainingError("the processes ended with different weights")
    data = metrics()["data"]
    best = "none (no validation)" if state["best_bleu_4"] is None else f"{state['best_bleu_4']:.4f}"
    log(
        accelerator,
        f"done ({stop_reason}): {state['global_step']} steps, {state['images_seen']} images in "
        f"{state['train_seconds']:.0f} s; best validation BLEU-4 (approx.) {best}; skipped rows: "
        f"{data['skipped_empty_captions']} without captions, {data['skipped_undecodable_images']} undecodable "
        f"images\nmodel folder: {model_dir}\nmetrics: {output_dir / 'metrics.json'}",
    )
    if report_to != "none":  # closing writes the last events (end_training closes them again: a no-op)
        on_main_process(
            accelerator, logs_what, lambda: [tracker.finish() for tracker in accelerator.trackers]
        )
    accelerator.end_training()
    return 0


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def tensorboard_thread_failures_left_to_the_loop():
    """
    TensorBoard writes its event file in a thread of its own. When a write fails (a full disk), that thread
    dies printing a traceback, and the error comes back at the next `accelerator.log`, where `track` reports
    it in one line: while training, the thread's own traceback is left out. Other threads' exceptions, and
    TensorBoard's outside this block, are reported as before.
    """
    previous = threading.excepthook

    def hook(failure: threading.ExceptHookArgs) -> None:
        if isinstance(failure.exc_value, OSError) and type(failure.thread).__name__ == "_AsyncWriterThread":
            return
        previous(failure)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        with tensorboard_thread_failures_left_to_the_loop():
            return train(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
