"""The training loop: `train(args)` runs what `scripts/train.py`'s options say, on Accelerate.

Read top to bottom: the one object a run's functions share (`TrainingRun`: what was built at the start,
and where training stands), `train` (the whole run in a screen), then the functions it calls in that
order: setting up (accelerator, output folder, data, model, batches), one epoch, the end of an epoch, the
end of the run, and the helpers that write files from the main process. Accelerate picks the device and
runs the same code on one or many processes (plain data parallelism).

Resuming gives the same weights as a run that never stopped: batch order and caption choice depend only
on (seed, epoch, position), and the random generator that drives dropout is re-seeded from
(seed, epoch, batch, process) before every batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, is_tensorboard_available
from datasets import Dataset, Image
from tqdm.auto import tqdm

from ..atomic_files import write_text_atomic
from ..data import DatasetDownloadError, load_caption_dataset
from ..image_processing_show_attend_tell import ShowAttendTellImageProcessor, load_image
from ..modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
from ..processing_show_attend_tell import ShowAttendTellProcessor
from ..saving import recover_directory, save_model_folder
from ..tokenization_show_attend_tell import ShowAttendTellTokenizer
from .checkpoint import (
    CheckpointError,
    describe_write_error,
    list_checkpoints,
    read_training_state,
    remove_stale_temporaries,
    write_checkpoint,
)
from .data import (
    CaptionBatchCollator,
    CaptionTrainingDataset,
    DataError,
    EpochBatchSampler,
    RowCheck,
    check_training_rows,
    mix_seed,
    usable_captions,
)
from .evaluation import generate_captions
from .feature_cache import FeatureCache, FrozenEncoderFeatures, feature_cache_key
from .model_sizes import build_model_config, model_size
from .options import UsageError

# Options that must not change when a run is resumed: they decide the model or which batches it sees.
RESUME_INVARIANTS = (
    "dataset", "data_dir", "dataset_option", "train_split", "max_train_samples", "captions_per_image",
    "batch_size", "gradient_accumulation_steps", "min_word_freq", "max_caption_words", "model_size",
    "image_size", "embed_dim", "attention_dim", "decoder_dim", "dropout", "encoded_image_size",
    "fine_tune_encoder", "fine_tune_stages", "seed",
)  # fmt: skip
# Below this many images seen, a run of bad images is not yet "most of the dataset".
MIN_IMAGES_BEFORE_BAD_DATA_STOP = 50
# The fields of `TrainingRun` that say where training stands: saved in every checkpoint, restored on resume.
SAVED_FIELDS = (
    "global_step", "epoch", "batches_in_epoch", "images_seen", "train_seconds", "best_bleu_4", "best_epoch",
    "epochs_without_improvement", "bad_images", "image_visits", "bad_visits", "history",
)  # fmt: skip
# Budgets that stop a run in the middle of an epoch (the weights at the stop get a validation of their own).
BUDGET_STOPS = ("max_steps", "max_train_images", "max_minutes")


class TrainingError(Exception):
    """Training cannot go on; the message says why and what to do."""


# The errors that end a run with a one-line message (a bad command line is `UsageError`).
TRAINING_ERRORS = (DataError, CheckpointError, TrainingError)


@dataclasses.dataclass
class TrainingRun:
    """One run: what `start_run` builds once, then where training stands (`SAVED_FIELDS`)."""

    args: argparse.Namespace  # the command line, checked by `check_args`
    accelerator: Accelerator
    report_to: str  # "tensorboard" or "none"
    model: torch.nn.Module  # as prepared by Accelerate (wrapped in DDP on several processes)
    optimizer: torch.optim.Optimizer
    processor: ShowAttendTellProcessor
    rows: RowCheck  # which training rows are usable
    train_data: CaptionTrainingDataset
    sampler: EpochBatchSampler
    loader: torch.utils.data.DataLoader
    val_split: Dataset | None  # None: no validation
    frozen_features: FrozenEncoderFeatures | None  # with a frozen encoder, features come from outside forward
    feature_cache: FeatureCache | None  # --cache-features
    run_args: dict[str, Any]  # training_args.json
    clock_start: float = 0.0  # time.monotonic() when this process started training...
    seconds_before: float = 0.0  # ...and the training seconds of the runs it resumes

    # Where training stands.
    global_step: int = 0  # optimizer steps
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of this process already trained on in `epoch`
    images_seen: int = 0
    train_seconds: float = 0.0  # over all (resumed) runs
    best_bleu_4: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    bad_images: dict[str, str] = dataclasses.field(default_factory=dict)  # image_id -> why it is unreadable
    image_visits: int = 0  # images read, repeats over epochs included (for the "mostly bad" stop)
    bad_visits: int = 0
    history: dict[str, list] = dataclasses.field(
        default_factory=lambda: {"train": [], "validation": [], "log": []}
    )

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir).expanduser()

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"

    def saved_state(self) -> dict[str, Any]:
        """Where training stands, as plain JSON values (a copy: later steps do not change it)."""
        return json.loads(json.dumps({name: getattr(self, name) for name in SAVED_FIELDS}))

    def restore(self, saved: dict[str, Any]) -> None:
        for name in SAVED_FIELDS:
            if name in saved:
                setattr(self, name, saved[name])

    def elapsed(self) -> float:
        """Seconds of training, resumed runs included."""
        return self.seconds_before + time.monotonic() - self.clock_start


def train(args: argparse.Namespace) -> dict[str, Any]:
    """
    Trains as `args` say (`build_parser()`'s options, checked by `check_args`), writes the output folder
    (model/, checkpoints/, logs/, metrics.json, training_args.json) and returns what metrics.json holds.

    Raises:
        UsageError: settings that this run cannot use (a checkpoint of other settings, fp16 on a CPU...).
        DataError, CheckpointError, TrainingError: the run cannot go on; the message says why.
    """
    with tensorboard_thread_failures_left_to_the_loop():
        run = start_run(args)
        run.seconds_before, run.clock_start = run.train_seconds, time.monotonic()
        stop_reason = None
        for epoch in range(run.epoch, args.epochs):
            stop_reason, epoch_stats = train_epoch(run, epoch)
            if stop_reason is not None:
                break
            stop_reason = end_epoch(run, epoch, epoch_stats)
            if stop_reason is not None:
                break
        return finish(run, stop_reason or "epochs")


# ==================================================================================================
# Setting up
# ==================================================================================================


def start_run(args: argparse.Namespace) -> TrainingRun:
    """The accelerator, the output folder, data, word map, model, optimizer and batches; a resumed state."""
    accelerator, report_to = make_accelerator(args)
    output_dir = Path(args.output_dir).expanduser()
    on_main_process(
        accelerator, f"write to --output-dir {output_dir}", lambda: prepare_output_dir(args, accelerator)
    )
    with accelerator.main_process_first():  # the main process downloads or generates, the others reuse
        train_split, val_split = load_splits(args, validate=args.max_val_samples != 0)
    rows = check_training_rows(train_split, split=args.train_split, image_sample=args.check_images)
    log(accelerator, f"data: {rows.summary()}")
    if val_split is not None and len(val_split) == 0:
        log(accelerator, "the validation split is empty: no validation, the last weights are kept")
        val_split = None

    resumed = read_resumed_state(args, accelerator.num_processes)
    if resumed is not None:  # a resumed run uses the very word map its weights were trained with
        processor = ShowAttendTellProcessor.from_pretrained(args.resume_path / "processor")
    else:
        kept = train_split.select(rows.kept_rows).select_columns(["captions"])["captions"]
        processor = build_processor(args, [usable_captions(captions) for captions in kept])

    model = build_model(args, len(processor.tokenizer), accelerator)
    optimizer = build_optimizer(args, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    frozen_features, feature_cache = None, None
    if not any(p.requires_grad for p in accelerator.unwrap_model(model).encoder.parameters()):
        frozen_features, feature_cache = frozen_encoder(args, accelerator, model, processor, train_split)
    train_data, sampler, loader = make_batches(args, accelerator, train_split, rows, processor, feature_cache)

    run_args = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "num_processes": accelerator.num_processes,
                "images_per_batch": args.batch_size // args.captions_per_image}  # fmt: skip
    run = TrainingRun(
        args=args, accelerator=accelerator, report_to=report_to, model=model, optimizer=optimizer,
        processor=processor, rows=rows, train_data=train_data, sampler=sampler, loader=loader,
        val_split=val_split, frozen_features=frozen_features, feature_cache=feature_cache, run_args=run_args,
    )  # fmt: skip
    if resumed is not None:
        accelerator.load_state(str(args.resume_path))
        run.restore(resumed["state"])
        log(
            accelerator,
            f"resumed from {args.resume_path}: step {run.global_step}, epoch {run.epoch + 1}, "
            f"batch {run.batches_in_epoch} of {sampler.batches_per_process}",
        )
    args_text = json.dumps(run_args, indent=2)
    on_main_process(accelerator, "write training_args.json",
                    lambda: write_text_atomic(output_dir / "training_args.json", args_text))  # fmt: skip
    if report_to != "none":
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_args.items()}
        on_main_process(accelerator, logs_what(run), lambda: accelerator.init_trackers("logs", config=config))
    return run


def make_accelerator(args: argparse.Namespace) -> tuple[Accelerator, str]:
    """The accelerator (device, processes, mixed precision, tracker) and the tracker actually used."""
    report_to = args.report_to
    if report_to == "tensorboard" and not is_tensorboard_available():
        print("tensorboard is not installed: metrics go to metrics.json only (pip install tensorboard)")
        report_to = "none"
    try:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=None if report_to == "none" else report_to,
            project_dir=str(Path(args.output_dir).expanduser()),
        )
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--mixed-precision {args.mixed_precision}: {error}") from None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # Worded for train.py's users and for train(args) from Python alike: the choice is Accelerate's config.
        chosen = "DeepSpeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else "FSDP"
        raise UsageError(
            f"Accelerate is configured for {chosen}: training uses plain data parallelism (DDP), as the model "
            "fits on one device; choose multi-GPU in `accelerate config`"
        )
    world = accelerator.num_processes
    if int(os.environ.get("WORLD_SIZE", "1")) > world:  # each process would think it is alone
        raise UsageError(
            f"started as {os.environ['WORLD_SIZE']} processes, but Accelerate sees {world}: on a machine "
            "without GPUs, run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
            "scripts/train.py ...` (`accelerate launch --cpu` starts a single process)"
        )
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        log(
            accelerator,
            "--mixed-precision fp16 needs a GPU: on the CPU this run computes in float32 (bf16 works)",
        )
    return accelerator, report_to


def prepare_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Creates --output-dir, checks it is writable, and tidies what an earlier, killed run left there."""
    output_dir = Path(args.output_dir).expanduser()
    checkpoints_dir = output_dir / "checkpoints"
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
        pass  # fails now, not at the first checkpoint, when the folder is not writable
    if args.overwrite_output_dir and not args.resume_path and checkpoints_dir.exists():
        shutil.rmtree(checkpoints_dir)  # old checkpoints would mix with this run's under "latest"
    if remove_stale_temporaries(checkpoints_dir):
        log(accelerator, "removed the unfinished checkpoint folder of a run that was killed while saving")
    if recover_directory(output_dir / "model"):
        log(accelerator, f"put back {output_dir / 'model'}: a run was killed while replacing it")


def load_splits(args: argparse.Namespace, validate: bool) -> tuple[Dataset, Dataset | None]:
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
    except DatasetDownloadError as error:  # no network: say how to get the files, in the training options
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


def read_resumed_state(args: argparse.Namespace, num_processes: int) -> dict[str, Any] | None:
    """The training state of `--resume-from-checkpoint` (None for a fresh start), once it fits this run."""
    if not args.resume_path:
        return None
    resumed = read_training_state(args.resume_path)
    changed = [key for key in RESUME_INVARIANTS if resumed["args"].get(key) != getattr(args, key)]
    if changed:
        listed = "; ".join(
            f"--{key.replace('_', '-')}: {resumed['args'].get(key)!r} then, {getattr(args, key)!r} now"
            for key in changed
        )
        raise UsageError(f"cannot resume {args.resume_path} with different settings ({listed})")
    if resumed["num_processes"] != num_processes:
        raise UsageError(
            f"{args.resume_path} was written by {resumed['num_processes']} process(es); resume it with as "
            f"many (this run has {num_processes})"
        )
    return resumed


def image_size_of(args: argparse.Namespace) -> int:
    return args.image_size or model_size(args.model_size).image_size


def build_processor(args: argparse.Namespace, train_captions: list[list[str]]) -> ShowAttendTellProcessor:
    """The word map from the *training* captions only (counting validation or test words would leak them)."""
    tokenizer = ShowAttendTellTokenizer.train_from_captions(
        (caption for captions in train_captions for caption in captions),
        min_freq=args.min_word_freq,
        model_max_length=args.max_caption_words + 2,
    )
    return ShowAttendTellProcessor(ShowAttendTellImageProcessor(size=image_size_of(args)), tokenizer)


def build_model(
    args: argparse.Namespace, vocab_size: int, accelerator: Accelerator
) -> ShowAttendTellForConditionalGeneration:
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


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with the decoder's learning rate, and the encoder's for its trained stages."""
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    param_groups = [{"params": list(model.decoder.parameters()), "lr": args.decoder_lr}]
    if encoder_params:
        param_groups.append({"params": encoder_params, "lr": args.encoder_lr})
    return torch.optim.Adam(param_groups)


def frozen_encoder(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor: ShowAttendTellProcessor,
    train_split: Dataset,
) -> tuple[FrozenEncoderFeatures, FeatureCache | None]:
    """A frozen encoder's features, computed outside the model's forward and, with --cache-features, on disk."""
    encoder, image_size = accelerator.unwrap_model(model).encoder, image_size_of(args)
    with torch.no_grad():  # the native grid, e.g. (2048, 8, 8) for ResNet-101 at 256 px
        probe = torch.zeros(1, 3, image_size, image_size, device=accelerator.device)
        grid_shape = tuple(encoder.eval().encode_grid(probe)[0].shape[1:])
    feature_cache = None
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
        cache_root = Path(args.feature_cache_dir or Path(args.output_dir).expanduser() / "feature_cache")
        cache_root = cache_root.expanduser()
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
    return FrozenEncoderFeatures(encoder, grid_shape, feature_cache, accelerator.autocast), feature_cache


def make_batches(
    args: argparse.Namespace,
    accelerator: Accelerator,
    train_split: Dataset,
    rows: RowCheck,
    processor: ShowAttendTellProcessor,
    feature_cache: FeatureCache | None,
) -> tuple[CaptionTrainingDataset, EpochBatchSampler, torch.utils.data.DataLoader]:
    """Batches of `--batch-size // --captions-per-image` images with `--captions-per-image` captions each."""
    tokenizer = processor.tokenizer
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
    world, device = accelerator.num_processes, accelerator.device
    images_per_batch = args.batch_size // args.captions_per_image
    sampler = EpochBatchSampler(
        len(train_data),
        images_per_batch,
        seed=args.seed,
        num_processes=world,
        process_index=accelerator.process_index,
    )
    loader = torch.utils.data.DataLoader(
        train_data,
        batch_sampler=sampler,
        collate_fn=CaptionBatchCollator(tokenizer.pad_token_id, image_size_of(args)),
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
    return train_data, sampler, loader


def set_train_mode(model: torch.nn.Module) -> None:
    """Training mode, except for frozen encoder parts: their batch-norm statistics must not move either."""
    model.train()
    resnet = model.encoder.resnet
    for part in [resnet.embedder, *resnet.encoder.stages]:
        if not any(p.requires_grad for p in part.parameters()):
            part.eval()


# ==================================================================================================
# One epoch
# ==================================================================================================


def train_epoch(run: TrainingRun, epoch: int) -> tuple[str | None, torch.Tensor]:
    """
    One pass over the training images (from the batch a resumed run stopped at). Returns why training
    stops now (a budget), or None, and the epoch's sums: loss, batches, top-5 hits, targets.
    """
    args, accelerator = run.args, run.accelerator
    first_batch = run.batches_in_epoch if epoch == run.epoch else 0
    run.train_data.set_epoch(epoch)
    run.sampler.set_epoch(epoch, first_batch)  # resuming: skip the batches already trained on
    num_batches, accumulation = run.sampler.batches_per_process, args.gradient_accumulation_steps
    set_train_mode(accelerator.unwrap_model(run.model))
    epoch_stats = torch.zeros(4, device=accelerator.device)  # loss sum, batches, top-5 hits, targets
    log_stats = torch.zeros(4, device=accelerator.device)
    group_had_backward, stop_reason = False, None
    progress = tqdm(total=num_batches, initial=first_batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)  # fmt: skip
    for batch_index, batch in enumerate(run.loader, start=first_batch):
        progress.update(1)
        group_start = batch_index - batch_index % accumulation
        group_size = min(accumulation, num_batches - group_start)  # the last group may be shorter
        last_in_group = batch_index + 1 == group_start + group_size
        empty, over_time = count_batch(run, batch, run.elapsed())
        if not empty:  # (a batch whose images are all undecodable is skipped by every process)
            stats = forward_backward(run, batch, mix_seed(args.seed, epoch, batch_index, accelerator.process_index),
                                     group_size, last_in_group)  # fmt: skip
            log_stats += stats
            epoch_stats += stats
            group_had_backward = True
        if not last_in_group:
            continue
        optimizer_step(run, group_had_backward)
        group_had_backward = False
        run.global_step, run.epoch, run.batches_in_epoch = run.global_step + 1, epoch, batch_index + 1
        run.train_seconds = run.elapsed()
        if run.global_step % args.log_steps == 0:
            log_training(run, log_stats, progress, epoch)
        stop_reason = budget_spent(run, over_time)
        if stop_reason is not None:
            break
        if args.checkpoint_steps and run.global_step % args.checkpoint_steps == 0:
            save_checkpoint(run)
    progress.close()
    if accelerator.num_processes > 1:  # each process saw the undecodable images of its own batches only
        run.bad_images = {k: v for part in gather_object([run.bad_images]) for k, v in part.items()}
    return stop_reason, epoch_stats


def count_batch(run: TrainingRun, batch: dict[str, Any], elapsed: float) -> tuple[bool, bool]:
    """
    Counts the batch's images over all processes (so that every process takes the same decisions), and
    stops the run when most images read so far were undecodable. Returns (empty on every process, over
    the --max-minutes budget).
    """
    usable, bad = len(batch["rows"]), len(batch["bad_rows"])
    if bad:
        run.bad_images.update(zip(batch["bad_ids"], batch["bad_reasons"], strict=True))
        if run.feature_cache is not None:
            run.feature_cache.mark_bad(batch["bad_rows"])
    over_time = run.args.max_minutes is not None and elapsed >= run.args.max_minutes * 60
    flags = torch.tensor([usable, bad, usable == 0, over_time], device=run.accelerator.device)
    usable, bad, empty, over_time = run.accelerator.reduce(flags, "sum").tolist()
    run.images_seen += usable
    run.image_visits += usable + bad
    run.bad_visits += bad
    if run.image_visits >= MIN_IMAGES_BEFORE_BAD_DATA_STOP and run.bad_visits > run.image_visits / 2:
        example = next(iter(run.bad_images.items()), ("?", "?"))
        raise DataError(
            f"{run.bad_visits} of {run.image_visits} images read so far could not be decoded "
            f"(e.g. image_id {example[0]!r}: {example[1]}); stopping instead of training on what is left"
        )
    return bool(empty), bool(over_time)


def forward_backward(
    run: TrainingRun, batch: dict[str, Any], seed: int, group_size: int, last_in_group: bool
) -> torch.Tensor:
    """The loss of one batch and its gradients (summed over the accumulation group); returns its statistics."""
    accelerator, model, device = run.accelerator, run.model, run.accelerator.device
    torch.manual_seed(seed)  # dropout, reproducibly
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    # Gradients are exchanged between processes once per optimizer step, at the group's last batch.
    with contextlib.nullcontext() if last_in_group else accelerator.no_sync(model), accelerator.autocast():
        if run.frozen_features is not None:
            features = run.frozen_features(batch, device)
            outputs = model(encoder_outputs=(features,), input_ids=input_ids, labels=labels)
        else:
            outputs = model(pixel_values=batch["pixel_values"].to(device), input_ids=input_ids, labels=labels)
        accelerator.backward(outputs.loss / group_size)
    with torch.no_grad():
        targets = labels != -100
        top5 = (outputs.logits.topk(5, dim=-1).indices == labels.unsqueeze(-1)).any(-1) & targets
        return torch.stack([outputs.loss.detach().float(), torch.ones((), device=device),
                            top5.sum().float(), targets.sum().float()])  # fmt: skip


def optimizer_step(run: TrainingRun, had_backward: bool) -> None:
    if had_backward:
        if run.args.grad_clip > 0:
            # Each gradient value clipped to +-grad_clip, as in the specification's implementation.
            params = [p for group in run.optimizer.param_groups for p in group["params"]]
            run.accelerator.clip_grad_value_(params, run.args.grad_clip)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def log_training(run: TrainingRun, log_stats: torch.Tensor, progress: tqdm, epoch: int) -> None:
    """The mean loss and top-5 accuracy since the last log line: metrics.json, the progress bar, TensorBoard."""
    loss_sum, batches, hits, targets = run.accelerator.reduce(log_stats, "sum").tolist()
    log_stats.zero_()
    if not batches:
        return
    entry = {"step": run.global_step, "epoch": epoch + 1, "loss": loss_sum / batches,
             "top5_accuracy": hits / max(targets, 1), "lr": run.optimizer.param_groups[0]["lr"],
             "images_seen": run.images_seen}  # fmt: skip
    run.history["log"].append(entry)
    progress.set_postfix(loss=f"{entry['loss']:.3f}", top5=f"{entry['top5_accuracy']:.3f}")
    track(run, {f"train/{k}": entry[k] for k in ("loss", "top5_accuracy", "lr")}, run.global_step)


def budget_spent(run: TrainingRun, over_time: bool) -> str | None:
    """Which budget (`BUDGET_STOPS`) this step used up, if any."""
    if run.args.max_steps is not None and run.global_step >= run.args.max_steps:
        return "max_steps"
    if run.args.max_train_images is not None and run.images_seen >= run.args.max_train_images:
        return "max_train_images"
    return "max_minutes" if over_time else None


# ==================================================================================================
# The end of an epoch, the end of the run
# ==================================================================================================


def end_epoch(run: TrainingRun, epoch: int, epoch_stats: torch.Tensor) -> str | None:
    """The epoch's record, validation (the best model folder), the learning-rate schedule, a checkpoint."""
    args, accelerator = run.args, run.accelerator
    loss_sum, batches, hits, targets = accelerator.reduce(epoch_stats, "sum").tolist()
    frozen = run.frozen_features
    record = {"epoch": epoch + 1, "step": run.global_step, "loss": loss_sum / max(batches, 1),
              "top5_accuracy": hits / max(targets, 1), "lr": run.optimizer.param_groups[0]["lr"],
              "images_seen": run.images_seen, "seconds": round(run.train_seconds, 2),
              "images_encoded": frozen.images_encoded if frozen else None}  # fmt: skip
    if frozen is not None:
        frozen.images_encoded = 0
    run.history["train"].append(record)
    message = f"epoch {epoch + 1}: loss {record['loss']:.4f}, top-5 accuracy {record['top5_accuracy']:.4f}"
    if run.val_split is not None:
        scores = validate(run)
        run.history["validation"].append({"epoch": epoch + 1, "step": run.global_step, **scores})
        track(run, {"val/bleu_4_approx": scores["bleu_4_approx"]}, run.global_step)
        message += f", validation BLEU-4 (approx.) {scores['bleu_4_approx']:.4f}"
        if run.best_bleu_4 is None or scores["bleu_4_approx"] > run.best_bleu_4:
            run.best_bleu_4, run.best_epoch, run.epochs_without_improvement = (
                scores["bleu_4_approx"],
                epoch + 1,
                0,
            )
            save_model(run, f"best validation BLEU-4 (approx.) {scores['bleu_4_approx']:.4f}")
        else:
            run.epochs_without_improvement += 1
            message += f" (best {run.best_bleu_4:.4f}, {run.epochs_without_improvement} epochs ago)"
    log(accelerator, message)
    run.epoch, run.batches_in_epoch = epoch + 1, 0
    # The specification's schedule: lr x 0.8 after every 8 epochs without improvement, stop after 20.
    stop_reason = None
    if run.epochs_without_improvement >= args.early_stopping_patience:
        stop_reason = "early_stopping"
    elif run.epochs_without_improvement and run.epochs_without_improvement % args.lr_decay_patience == 0:
        for group in run.optimizer.param_groups:
            group["lr"] *= args.lr_decay_factor
        log(
            accelerator,
            f"no BLEU-4 gain for {run.epochs_without_improvement} epochs: lr x {args.lr_decay_factor}",
        )
    write_metrics(run)
    if args.checkpoint_steps:
        save_checkpoint(run)
    return stop_reason


def finish(run: TrainingRun, stop_reason: str) -> dict[str, Any]:
    """The last checkpoint, model folder and metrics.json; checks that all processes hold the same weights."""
    args, accelerator = run.args, run.accelerator
    latest = list_checkpoints(run.output_dir / "checkpoints")
    if args.checkpoint_steps and (not latest or not latest[-1].name.endswith(f"{run.global_step:08d}")):
        save_checkpoint(run)
    if run.val_split is not None and stop_reason in BUDGET_STOPS:
        # Stopped by a budget in the middle of an epoch: these weights get a validation too. Not part of the
        # checkpoint above, so that a resumed run takes the same decisions as an uninterrupted one.
        scores = validate(run)
        run.history["validation"].append({"epoch": None, "step": run.global_step, **scores})
        log(accelerator, f"validation BLEU-4 (approx.) at the stop: {scores['bleu_4_approx']:.4f}")
        if run.best_bleu_4 is None or scores["bleu_4_approx"] > run.best_bleu_4:
            run.best_bleu_4, run.best_epoch = scores["bleu_4_approx"], None
            save_model(run, f"validation BLEU-4 (approx.) {scores['bleu_4_approx']:.4f} at the stop")
    if run.val_split is None or not run.model_dir.exists():
        save_model(run, "the last weights")
    final = write_metrics(run, stop_reason)

    # DDP keeps the weights of all processes equal; check it, and say so.
    checksum = parameter_checksum(accelerator.unwrap_model(run.model))
    print(f"process {accelerator.process_index}/{accelerator.num_processes}: finished, parameter checksum "
          f"{checksum}", flush=True)  # fmt: skip
    if len(set(gather_object([checksum]))) != 1:
        raise TrainingError("the processes ended with different weights")
    data = final["data"]
    best = "none (no validation)" if run.best_bleu_4 is None else f"{run.best_bleu_4:.4f}"
    log(
        accelerator,
        f"done ({stop_reason}): {run.global_step} steps, {run.images_seen} images in "
        f"{run.train_seconds:.0f} s; best validation BLEU-4 (approx.) {best}; skipped rows: "
        f"{data['skipped_empty_captions']} without captions, {data['skipped_undecodable_images']} undecodable "
        f"images\nmodel folder: {run.model_dir}\nmetrics: {run.output_dir / 'metrics.json'}",
    )
    if run.report_to != "none":  # closing writes the last events (end_training closes them again: a no-op)
        on_main_process(accelerator, logs_what(run), lambda: [t.finish() for t in accelerator.trackers])
    accelerator.end_training()
    return final


def validate(run: TrainingRun) -> dict[str, Any]:
    """
    Approximate BLEU-1..4 (`bleu_1_approx`..`bleu_4_approx`) of captions decoded by generate() for the
    validation images, shared out over processes: tokenised in Python (fast, no Java), so not comparable
    with published scores, which scripts/evaluate_captions.py computes.
    """
    from ..metrics import compute_caption_metrics

    args, accelerator, val_split = run.args, run.accelerator, run.val_split
    raw_images = val_split.cast_column("image", Image(decode=False))  # decoded here: one bad file = one row
    images, rows, bad = [], [], 0
    for row in range(accelerator.process_index, len(val_split), accelerator.num_processes):
        try:
            images.append(load_image(raw_images[row]["image"]))
            rows.append(row)
        except Exception:  # skipped like a bad training image
            bad += 1
    generated = generate_captions(
        accelerator.unwrap_model(run.model),
        run.processor,
        images,
        batch_size=args.val_batch_size,
        num_beams=args.val_num_beams,
        max_new_tokens=args.val_max_new_tokens or args.max_caption_words + 1,
        autocast=accelerator.autocast,
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


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ==================================================================================================
# Writing files: the main process writes, every process learns how it went
# ==================================================================================================


def on_main_process(accelerator: Accelerator, what: str, work: Callable[[], Any]) -> Any:
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


def save_checkpoint(run: TrainingRun) -> None:
    """checkpoints/checkpoint-<step>/: Accelerate's state, the processor and where training stands."""

    def fill(folder: Path) -> None:
        run.accelerator.save_state(str(folder), safe_serialization=True)
        run.processor.save_pretrained(folder / "processor")
        if run.feature_cache is not None:
            run.feature_cache.flush()

    saved = {"state": run.saved_state(), "args": run.run_args, "num_processes": run.accelerator.num_processes}
    path = on_main_process(
        run.accelerator,
        "write a checkpoint",
        lambda: write_checkpoint(
            run.output_dir / "checkpoints", run.global_step, fill, saved, keep_last=run.args.keep_checkpoints
        ),
    )
    log(run.accelerator, f"saved checkpoint {path}")


def metrics(run: TrainingRun, stopped: str | None = None) -> dict[str, Any]:
    """What metrics.json holds: progress, best score, why the run stopped, the data's problems, history."""
    undecodable = sorted(set(run.bad_images) | set(run.rows.bad_image_ids))
    return {
        "global_step": run.global_step,
        "epochs_completed": run.epoch,
        "images_seen": run.images_seen,
        "train_seconds": round(run.train_seconds, 2),
        "images_per_second": round(run.images_seen / max(run.train_seconds, 1e-9), 2),
        "best": {"bleu_4_approx": run.best_bleu_4, "epoch": run.best_epoch},
        "stopped_because": stopped,
        "data": {
            "train_rows": run.rows.total_rows,
            "skipped_empty_captions": len(run.rows.empty_caption_ids),
            "skipped_undecodable_images": len(undecodable),
            "empty_caption_ids": run.rows.empty_caption_ids[:100],
            "undecodable_image_ids": undecodable[:100],
            "truncated_captions": run.train_data.truncated_captions,
            "vocab_size": len(run.processor.tokenizer),
        },
        **run.history,
    }


def write_metrics(run: TrainingRun, stopped: str | None = None) -> dict[str, Any]:
    values = metrics(run, stopped)
    text = json.dumps(values, indent=2)
    on_main_process(
        run.accelerator,
        "write metrics.json",
        lambda: write_text_atomic(run.output_dir / "metrics.json", text),
    )
    return values


def save_model(run: TrainingRun, reason: str) -> None:
    """The complete model folder (replaced atomically), with training_args.json and metrics.json in it."""
    extra = {
        "training_args.json": json.dumps(run.run_args, indent=2),
        "metrics.json": json.dumps(metrics(run), indent=2),
    }
    unwrapped = run.accelerator.unwrap_model(run.model)
    on_main_process(
        run.accelerator,
        f"write the model folder {run.model_dir}",
        lambda: save_model_folder(run.model_dir, unwrapped, run.processor, extra_files=extra),
    )
    log(run.accelerator, f"saved the model folder {run.model_dir} ({reason})")


def logs_what(run: TrainingRun) -> str:
    return f"write the TensorBoard logs in {run.output_dir / 'logs'}"


def track(run: TrainingRun, values: dict[str, float], step: int) -> None:
    """Logs to TensorBoard; a log that cannot be written (a full disk) stops the run with one line."""
    if run.report_to != "none":
        on_main_process(run.accelerator, logs_what(run), lambda: run.accelerator.log(values, step=step))


@contextlib.contextmanager
def tensorboard_thread_failures_left_to_the_loop() -> Iterator[None]:
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


__all__ = [
    "RESUME_INVARIANTS",
    "TRAINING_ERRORS",
    "TrainingError",
    "TrainingRun",
    "build_model",
    "build_processor",
    "load_splits",
    "set_train_mode",
    "train",
    "validate",
]
