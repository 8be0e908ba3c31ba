"""
Training benchmark: captions/s of a training step with a frozen encoder, measured against the classic
implementation in the same run.

Model: the full-size model (ResNet-101 encoder, 512-wide soft-attention LSTM decoder, vocabulary 10,000)
with random weights, 256 x 256 synthetic images, captions of about 15 tokens, a batch of `--batch-size 64`
captions formed as `scripts/train.py` forms it (64 // 5 = 12 images x 5 captions = 60 captions). The
encoder is frozen (`set_trainable_stages(0)`, eval mode); the decoder trains (dropout on), as in
`scripts/train.py`: forward, loss, backward, gradients clipped to +-5, an Adam step.

A random ResNet-101's features reach 1e5 and overflow float16 (the feature cache's format, which the
training code checks), so the encoder's batch-norm statistics are first calibrated on a few of the
benchmark's images: its features then have unit scale, and its speed is unchanged.

Variants (the same batches, captions and decoder in every one; only where the features come from differs):

- reference (the classic implementation): every caption's image goes through the encoder separately, i.e.
  one encoder pass per caption (60 per step), pooled to 14 x 14 in float32; the decoder then runs one row
  per encoded image, so the attention projection of the features is also computed once per caption. The
  reference gets this package's encoder call (same precision, same CPU chunking), so its ratio isolates
  what encoding once and caching save.
- ours, encode once: each image goes through the encoder once per batch (`FrozenEncoderFeatures`, the
  code `scripts/train.py` runs with a frozen encoder); its captions are the decoder rows `i*k ... i*k+k-1`
  and attend over the same features.
- ours, cached (`--cache-features`, later epochs): the native-grid float16 features are read from an
  on-disk cache (`FeatureCache`, filled beforehand by `FrozenEncoderFeatures` as a first epoch does),
  collated by `CaptionBatchCollator`, pooled to 14 x 14 by `FrozenEncoderFeatures`; no encoder runs.
  Reading the cache and collating are timed (they replace the encoder); decoding and collating images for
  the other two variants are not (DataLoader workers do that), which favours them.

"Ours" runs in every precision of `--dtypes` (float32 and bf16 autocast by default, like
`--mixed-precision bf16`); the reference runs in `--reference-dtype` (float32, as the classic
implementation does). Targets: cached >= 10x the reference's captions/s.

Timing: `--warmup` rounds (not counted), then `--steps` rounds; a round runs one training step of every
variant, in an order rotated from round to round, each on a different batch. Figures are medians over the
rounds; ratios are medians of the ratios within each round (other processes on the machine slow whole
stretches of time, which a ratio within a round cancels). CPU utilisation (process CPU time / wall time /
threads) is printed: well below 1 means other processes competed for the cores.

The cache is read from the page cache (where a 7 GB Flickr30K cache stays on a machine with enough
memory); `--cold-cache` drops the file from it before every cached step, so that the rows come from disk.

Run (CPU, 2 threads; about 70 s on an idle machine, longer when other processes share it):

    .venv/bin/python benchmarks/bench_train.py --threads 2 --json-out bench_train.json

Smoke test: `--quick` (one step per variant; `--model-size tiny` for a few seconds). On a machine with a GPU
the device is picked automatically (`--device cpu` forces the CPU); `--dtypes bf16` runs ours in bf16 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import calibrate_batchnorm, precision, setting, synchronize

from show_attend_tell import ShowAttendTellForConditionalGeneration
from show_attend_tell import modeling_show_attend_tell as modeling
from show_attend_tell.training import (
    CaptionBatchCollator,
    FeatureCache,
    FrozenEncoderFeatures,
    build_model_config,
    feature_cache_key,
    model_size,
)
from show_attend_tell.training.loop import set_train_mode

FLICKR30K_TRAIN_IMAGES = 29_000
GRAD_CLIP = 5.0  # scripts/train.py --grad-clip
DECODER_LR = 4e-4  # scripts/train.py --decoder-lr
TARGET_CACHED = 10.0


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


def make_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Normalised synthetic pictures with structure at two scales, (count, 3, size, size)."""
    coarse = F.interpolate(torch.randn(count, 3, 8, 8, generator=generator), size=size, mode="bilinear")
    fine = torch.randn(count, 3, size, size, generator=generator)
    return (coarse + 0.3 * fine).clamp(-2.5, 2.5)


def build_model(args, device: torch.device) -> tuple[ShowAttendTellForConditionalGeneration, int]:
    """The model of `--model-size` with a frozen, calibrated encoder, in the training loop's training mode."""
    torch.manual_seed(args.seed)
    config = build_model_config(args.model_size, vocab_size=args.vocab_size)
    image_size = model_size(args.model_size).image_size
    model = ShowAttendTellForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(args.seed + 1)
    calibrate_batchnorm(model.encoder.resnet, make_images(4, image_size, generator))
    model.encoder.set_trainable_stages(0)  # frozen, as scripts/train.py without --fine-tune-encoder
    model = model.to(device)
    set_train_mode(model)  # the training loop's: the frozen encoder's batch-norm statistics stay fixed
    return model, image_size


def make_captions(args, count: int, rng: np.random.Generator) -> list[list[int]]:
    """`<start> words <end>` token lists; `--caption-length` (+- `--caption-jitter`) decoder steps each."""
    low = max(1, args.caption_length - args.caption_jitter)
    steps = rng.integers(low, args.caption_length + args.caption_jitter + 1, size=count)
    first_word = 4  # after <pad>, <start>, <end>, <unk>
    return [[1, *rng.integers(first_word, args.vocab_size, size=n - 1).tolist(), 2] for n in steps]


class Batches:
    """The benchmark's batches: `images` synthetic pictures and `images x k` captions each."""

    def __init__(self, args, count: int, image_size: int) -> None:
        generator = torch.Generator().manual_seed(args.seed + 2)
        rng = np.random.default_rng(args.seed + 3)
        self.images_per_batch = args.batch_size // args.captions_per_image
        self.k = args.captions_per_image
        self.pixel_values = [make_images(self.images_per_batch, image_size, generator) for _ in range(count)]
        self.captions = [make_captions(args, self.images_per_batch * self.k, rng) for _ in range(count)]
        self.collator = CaptionBatchCollator(pad_token_id=0, image_size=image_size)

    def __len__(self) -> int:
        return len(self.pixel_values)

    def rows(self, index: int) -> list[int]:
        """Dataset rows (= feature-cache rows) of the images of batch `index`."""
        start = index * self.images_per_batch
        return list(range(start, start + self.images_per_batch))

    def items(self, index: int, cache: FeatureCache | None = None) -> list[dict]:
        """What `CaptionTrainingDataset` yields: cached grids when `cache` is given, else pixel values."""
        items = []
        for position, row in enumerate(self.rows(index)):
            item = {
                "row": row,
                "image_id": str(row),
                "error": None,
                "captions": self.captions[index][position * self.k : (position + 1) * self.k],
            }
            if cache is not None:
                item["grid"] = cache.read(row)
            else:
                item["pixel_values"] = self.pixel_values[index][position]
            items.append(item)
        return items

    def collate(self, index: int, cache: FeatureCache | None = None) -> dict:
        return self.collator(self.items(index, cache))


# --------------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------------


class Trainer:
    """One training step of each variant; each returns (feature seconds, decoder seconds)."""

    def __init__(self, model, grid_shape, args, device: torch.device) -> None:
        self.model, self.grid_shape, self.args, self.device = model, grid_shape, args, device
        self.params = [p for p in model.decoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=DECODER_LR)

    def frozen_features(self, dtype: str, cache: FeatureCache | None = None) -> FrozenEncoderFeatures:
        return FrozenEncoderFeatures(
            self.model.encoder, self.grid_shape, cache, lambda: precision(dtype, self.device)
        )

    def decoder_step(
        self, features: torch.Tensor, batch: dict, dtype: str, skip_padding: bool | None = None
    ) -> float:
        """
        Forward, loss, backward, clip, Adam: what scripts/train.py does with a frozen encoder.
        `skip_padding`: None lets the model choose (it skips the padded steps from
        `PADDING_SHARE_WORTH_SKIPPING` of padding on); True always skips them; False decodes them too (a
        forward asked for its decoding state computes every step, since the state of captions that ended
        early would be lost otherwise). The loss is the same, only the time differs.
        """
        input_ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        threshold = 0.0 if skip_padding else modeling.PADDING_SHARE_WORTH_SKIPPING
        with precision(dtype, self.device), setting(modeling, "PADDING_SHARE_WORTH_SKIPPING", threshold):
            outputs = self.model(
                encoder_outputs=(features,),
                input_ids=input_ids,
                labels=labels,
                use_cache=skip_padding is False,
            )
        outputs.loss.backward()
        torch.nn.utils.clip_grad_value_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(outputs.loss.detach())

    def reference(self, batches: Batches, index: int, dtype: str) -> tuple[float, float]:
        batch = batches.collate(index)
        # The classic data loader yields one image per caption: k copies of each picture (not timed).
        per_caption = batch["pixel_values"].repeat_interleave(batches.k, dim=0).to(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad(), precision(dtype, self.device):
            features = self.model.encoder(per_caption).last_hidden_state.float()  # one pass per caption
        synchronize(self.device)
        middle = time.perf_counter()
        self.decoder_step(features, batch, dtype)  # rows = captions, one image each
        synchronize(self.device)
        return middle - start, time.perf_counter() - middle

    def ours(self, batches: Batches, index: int, dtype: str) -> tuple[float, float]:
        batch = batches.collate(index)
        batch["pixel_values"] = batch["pixel_values"].to(self.device)
        frozen = self.frozen_features(dtype)
        synchronize(self.device)
        start = time.perf_counter()
        features = frozen(batch, self.device)  # one encoder pass per image
        synchronize(self.device)
        middle = time.perf_counter()
        self.decoder_step(features, batch, dtype)
        synchronize(self.device)
        return middle - start, time.perf_counter() - middle

    def cached(self, batches: Batches, index: int, dtype: str, cache: FeatureCache) -> tuple[float, float]:
        frozen = self.frozen_features(dtype, cache)
        synchronize(self.device)
        start = time.perf_counter()
        batch = batches.collate(index, cache)  # reads the rows' float16 grids from the cache
        features = frozen(batch, self.device)  # pools them; no encoder pass
        synchronize(self.device)
        middle = time.perf_counter()
        if frozen.images_encoded:
            raise RuntimeError("the cached variant ran the encoder: the cache was not filled")
        self.decoder_step(features, batch, dtype)
        synchronize(self.device)
        return middle - start, time.perf_counter() - middle


def measure_padded_steps(
    args: argparse.Namespace, trainer: Trainer, batches: Batches, cache: FeatureCache, dtype: str
) -> dict:
    """
    What skipping the padded steps buys (`ShowAttendTellDecoder._forward_by_length`): the cached variant's
    decoder step with it forced on and off, back to back in alternating order, on the same batches. Ratio =
    time without / time with; `padding` = the share of a batch padded to its longest caption that is
    padding; `model_skips`: whether the model itself skips at that share.
    """
    times = {True: [], False: []}
    ratios, padding = [], []
    for round_index in range(args.warmup + args.steps):
        batch = batches.collate(round_index, cache)
        features = trainer.frozen_features(dtype, cache)(batch, trainer.device)
        steps = (batch["labels"] != -100) & (batch["labels"] != 0)
        lengths = (steps * torch.arange(1, steps.shape[1] + 1)).amax(dim=1)
        order = [True, False] if round_index % 2 == 0 else [False, True]
        seconds = {}
        for skip in order:
            synchronize(trainer.device)
            start = time.perf_counter()
            trainer.decoder_step(features, batch, dtype, skip_padding=skip)
            synchronize(trainer.device)
            seconds[skip] = time.perf_counter() - start
        if round_index >= args.warmup:
            for skip in order:
                times[skip].append(seconds[skip])
            ratios.append(seconds[False] / seconds[True])
            padding.append(1.0 - float(lengths.sum()) / (lengths.numel() * float(lengths.max())))
    return {
        "dtype": dtype,
        "decoder_s_skipping": median(times[True]),
        "decoder_s_padded": median(times[False]),
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "padding": median(padding),
        "model_skips": median(padding) >= modeling.PADDING_SHARE_WORTH_SKIPPING,
    }


# --------------------------------------------------------------------------------------------------
# The feature cache
# --------------------------------------------------------------------------------------------------


def fill_cache(trainer: Trainer, batches: Batches, root: Path, dtype: str) -> tuple[FeatureCache, dict]:
    """A first epoch with `--cache-features`: every batch's images encoded once and written to the cache."""
    model = trainer.model
    rows = len(batches) * batches.images_per_batch
    description = {
        "benchmark": "bench_train",
        "rows": rows,
        "mixed_precision": dtype,
        "seed": trainer.args.seed,
    }
    key = feature_cache_key(model.encoder.state_dict(), description)
    FeatureCache.create(root, key, rows, trainer.grid_shape, {"dataset": "synthetic (bench_train)"})
    writer = FeatureCache(root / key, rows, trainer.grid_shape)
    frozen = trainer.frozen_features(dtype, writer)
    seconds = []
    for index in range(len(batches)):
        batch = batches.collate(index)
        synchronize(trainer.device)
        start = time.perf_counter()
        frozen(batch, trainer.device)
        synchronize(trainer.device)
        seconds.append(time.perf_counter() - start)
    writer.flush()
    if not (writer.statuses() == FeatureCache.CACHED).all():
        raise RuntimeError("the first epoch did not cache every image")
    del writer, frozen
    reader = FeatureCache(root / key, rows, trainer.grid_shape)  # as a DataLoader worker opens it
    features_file = reader.directory / "features.npy"
    stat = features_file.stat()
    on_disk = stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size  # the file is sparse
    per_image = reader.bytes_per_row
    pooled_fp32 = trainer.model.config.num_pixels * trainer.model.config.encoder_dim * 4
    info = {
        "directory": str(reader.directory),
        "grid_shape": list(trainer.grid_shape),
        "dtype": "float16",
        "bytes_per_image": per_image,
        "bytes_per_image_on_disk": on_disk / rows,
        "flickr30k_train_images": FLICKR30K_TRAIN_IMAGES,
        "flickr30k_bytes": per_image * FLICKR30K_TRAIN_IMAGES,
        "pooled_float32_bytes_per_image": pooled_fp32,
        "fill_images_per_s": batches.images_per_batch * len(seconds) / sum(seconds),
        "fill_seconds_per_batch": statistics.median(seconds),
    }
    return reader, info


def evict_page_cache(path: Path) -> None:
    """Drops a file's pages from the operating system's page cache, so the next reads go to the disk.
    Pages still mapped by a process stay: close its memory maps (drop the `FeatureCache` reader) first."""
    with contextlib.suppress(AttributeError, OSError):  # posix_fadvise: Linux and most Unixes
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_equivalence(trainer: Trainer, batches: Batches, cache: FeatureCache, fill_dtype: str) -> dict:
    """
    On the first images of batch 0, without dropout: the cached grids are bit for bit what encoding gives
    (in the precision the cache was filled in), and the training forward computes the same loss from
    per-caption float32 features (reference), per-image features (ours) and cached features.
    """
    model, device = trainer.model, trainer.device
    model.eval()  # no dropout; gradients stay on below, so the training path of the decoder runs
    try:
        images = 2  # enough for a check; the reference encodes each image k times
        batch = batches.collator(batches.items(0)[:images])
        batch["pixel_values"] = batch["pixel_values"].to(device)
        ours_features = trainer.frozen_features(fill_dtype)(batch, device)
        cached_batch = batches.collator(batches.items(0, cache)[:images])
        cached_features = trainer.frozen_features(fill_dtype, cache)(cached_batch, device)
        per_caption = batch["pixel_values"].repeat_interleave(batches.k, dim=0)
        reference_features = model.encoder(per_caption).last_hidden_state
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)

        def loss(features: torch.Tensor) -> float:
            with torch.enable_grad():
                return model(encoder_outputs=(features,), input_ids=input_ids, labels=labels).loss.item()

        scale = reference_features.abs().max().item()
        grouped = ours_features.repeat_interleave(batches.k, dim=0)
        return {
            "fill_dtype": fill_dtype,
            "cached_features_identical": bool(torch.equal(ours_features, cached_features)),
            # on a GPU, cuDNN picks its convolution algorithm by batch size (the cache was filled in batches
            # of another size), so the bits may differ there
            "cached_vs_encoding_max_relative": float(
                (ours_features.float() - cached_features.float()).abs().max() / scale
            ),
            "grid_vs_float32_max_relative": float((grouped - reference_features).abs().max() / scale),
            "feature_max_abs": scale,
            "loss_reference": loss(reference_features),
            "loss_ours": loss(ours_features),
            "loss_cached": loss(cached_features),
        }
    finally:
        model.train()
        model.encoder.eval()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model-size", choices=["full", "small", "tiny"], default="full",
                        help="full: ResNet-101, 512-wide decoder, 256 px (tiny: for the smoke test)")  # fmt: skip
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64, help="captions per step, as train.py's")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--caption-length", type=int, default=15, help="mean decoder steps per caption")
    parser.add_argument("--caption-jitter", type=int, default=2, help="lengths vary by +- this")
    parser.add_argument("--dtypes", default="fp32,bf16", help="precisions of ours: fp32, bf16 or both")
    parser.add_argument("--reference-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run before timing")
    parser.add_argument("--cold-cache", action="store_true",
                        help="drop the cache file from the page cache before each cached step (disk reads)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the feature cache is written "
                        "(default: a temporary folder, removed afterwards)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke mode: one timed step per variant")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in ("fp32", "bf16") for d in args.dtypes):
        parser.error("--dtypes takes fp32, bf16 or fp32,bf16")
    if args.quick:
        args.steps, args.warmup = 1, 1
    if args.batch_size < args.captions_per_image or args.steps < 1 or args.warmup < 0:
        parser.error("need --batch-size >= --captions-per-image, --steps >= 1 and --warmup >= 0")
    return args


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def describe_settings(args: argparse.Namespace, device: torch.device) -> dict:
    """The conditions of the measurement, printed first and written into the JSON."""
    images_per_batch = args.batch_size // args.captions_per_image
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    )
    return {
        "device": device.type,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "model_size": args.model_size,
        "vocab_size": args.vocab_size,
        "batch_size": args.batch_size,
        "images_per_batch": images_per_batch,
        "captions_per_image": args.captions_per_image,
        "captions_per_batch": images_per_batch * args.captions_per_image,
        "caption_length": f"{args.caption_length} +- {args.caption_jitter} decoder steps",
        "dtypes": args.dtypes,
        "reference_dtype": args.reference_dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "cold_cache": args.cold_cache,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def time_variants(
    args: argparse.Namespace,
    trainer: Trainer,
    batches: Batches,
    cache: FeatureCache,
    variants: list[tuple[str, str, str]],
    captions_per_batch: int,
) -> tuple[dict, dict]:
    """
    `--warmup` + `--steps` rounds of one training step per variant (the order rotates every round);
    returns the timed rounds' seconds per variant and each variant's ratio to the reference within a round.
    """
    runs = {
        name: {"feature_s": [], "decoder_s": [], "step_s": [], "utilisation": []} for name, _, _ in variants
    }
    ratios = {name: [] for name, _, _ in variants if name != "reference"}

    def run_step(kind: str, index: int, dtype: str) -> tuple[float, float, float]:
        nonlocal cache
        cpu_start = time.process_time()
        if kind == "reference":
            feature_s, decoder_s = trainer.reference(batches, index, dtype)
        elif kind == "ours":
            feature_s, decoder_s = trainer.ours(batches, index, dtype)
        else:
            if args.cold_cache:
                # a fresh reader (the old one's memory map closes with it), then the file out of the page cache
                cache = FeatureCache(cache.directory, cache.num_rows, cache.grid_shape)
                evict_page_cache(cache.directory / "features.npy")
            feature_s, decoder_s = trainer.cached(batches, index, dtype, cache)
        cpu = time.process_time() - cpu_start
        return feature_s, decoder_s, cpu / max(feature_s + decoder_s, 1e-9) / args.threads

    for round_index in range(args.warmup + args.steps):
        timed = round_index >= args.warmup
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        rates = {}
        for name, kind, dtype in order:
            feature_s, decoder_s, utilisation = run_step(kind, round_index, dtype)
            rates[name] = captions_per_batch / (feature_s + decoder_s)
            if timed:
                run = runs[name]
                run["feature_s"].append(feature_s)
                run["decoder_s"].append(decoder_s)
                run["step_s"].append(feature_s + decoder_s)
                run["utilisation"].append(utilisation)
        label = f"step {round_index - args.warmup + 1}/{args.steps}" if timed else "warm-up"
        print(f"  {label}: " + ", ".join(f"{name} {rates[name]:.1f}" for name, _, _ in variants)
              + " captions/s", flush=True)  # fmt: skip
        if timed:
            for name in ratios:
                ratios[name].append(rates[name] / rates["reference"])
    return runs, ratios


def report_table(
    args: argparse.Namespace, settings: dict, variants: list[tuple[str, str, str]], runs: dict, ratios: dict
) -> list[dict]:
    """Prints the table of medians (captions/s, seconds, ratio to the reference, verdict) and returns its rows."""
    labels = {
        "reference": "reference: encoder per caption",
        "ours": "ours: encoder once per image",
        "cached": "ours: cached features",
    }
    captions_per_batch, device = settings["captions_per_batch"], settings["device"]
    print()
    print(f"Results ({settings['device_name']}, {device}, threads {args.threads}, {args.model_size} model, "
          f"vocabulary {args.vocab_size}, batch {settings['images_per_batch']} images x {args.captions_per_image} "
          f"captions = {captions_per_batch} captions of {args.caption_length} +- {args.caption_jitter} "
          f"tokens, frozen encoder; medians of {args.steps} steps):")  # fmt: skip
    header = (f"  {'variant':<40} {'captions/s':>10} {'s/step':>7} {'features':>9} {'decoder':>8} "
              f"{'cpu use':>7} {'vs ref':>8}  {'target':<8} verdict")  # fmt: skip
    print(header)
    table = []
    for name, kind, dtype in variants:
        run = runs[name]
        step_s = median(run["step_s"])
        row = {
            "variant": name,
            "label": f"{labels[kind]} ({dtype})",
            "dtype": dtype,
            "captions_per_s": captions_per_batch / step_s,
            "step_s": step_s,
            "feature_s": median(run["feature_s"]),
            "decoder_s": median(run["decoder_s"]),
            "utilisation": median(run["utilisation"]) if device == "cpu" else None,
            "ratio": median(ratios[name]) if name in ratios else 1.0,
            "target": f">= {TARGET_CACHED:g}x" if kind == "cached" else "",
            "passed": (median(ratios[name]) >= TARGET_CACHED) if kind == "cached" else None,
        }
        table.append(row)
        verdict = "" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
        use = "" if row["utilisation"] is None else f"{row['utilisation']:.2f}"
        print(f"  {row['label']:<40} {row['captions_per_s']:10.1f} {step_s:7.3f} {row['feature_s']:9.3f} "
              f"{row['decoder_s']:8.3f} {use:>7} {row['ratio']:7.2f}x  {row['target']:<8} {verdict}")  # fmt: skip
    print(
        "  (cached: --cache-features, the epochs after the first; features: encoder, or cache read + "
        "collate + pooling;\n   decoder: forward, backward, clip, Adam; vs ref: median of the ratios within "
        "each round)"
    )
    return table


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # float32 means float32: with TF32 (on by default for cuDNN's convolutions) the float32 reference and
    # the float32 exactness checks would depend on the batch size
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    settings = describe_settings(args, device)
    images_per_batch, captions_per_batch = settings["images_per_batch"], settings["captions_per_batch"]
    print("bench_train: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} (other processes on the machine slow every figure)")

    model, image_size = build_model(args, device)
    settings["image_size"] = image_size
    with torch.no_grad():  # the native grid, e.g. (2048, 8, 8) for ResNet-101 at 256 px
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        grid_shape = tuple(model.encoder.encode_grid(probe)[0].shape[1:])
    config = model.config
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
        f"({sum(p.numel() for p in model.decoder.parameters()) / 1e6:.1f} M trained), native grid "
        f"{'x'.join(map(str, grid_shape))} pooled to {config.encoded_image_size}x{config.encoded_image_size}; "
        f"batch {images_per_batch} images x {args.captions_per_image} captions = {captions_per_batch} captions",
        flush=True,
    )
    batches = Batches(args, args.warmup + args.steps, image_size)
    trainer = Trainer(model, grid_shape, args, device)

    temporary = None
    if args.cache_dir is None:
        temporary = tempfile.mkdtemp(prefix="bench_train_cache_")
    cache_root = Path(temporary or args.cache_dir)
    try:
        cache, cache_info = fill_cache(trainer, batches, cache_root, args.dtypes[0])
        print(
            f"feature cache filled (first epoch, {args.dtypes[0]}): {cache_info['fill_images_per_s']:.1f} "
            f"images/s encoded and written; {cache_info['bytes_per_image'] / 1024:.1f} KiB per image",
            flush=True,
        )
        check = check_equivalence(trainer, batches, cache, args.dtypes[0])
        print(
            f"check (2 images of batch 0, no dropout, training forward): loss from per-caption float32 "
            f"features {check['loss_reference']:.5f}, per-image {check['loss_ours']:.5f}, cached "
            f"{check['loss_cached']:.5f}; cached features identical to encoding ({args.dtypes[0]}): "
            f"{check['cached_features_identical']} (max difference {check['cached_vs_encoding_max_relative']:.1e} "
            f"of the largest feature); grid stored in float16 ({args.dtypes[0]} encoder) vs float32: "
            f"max {check['grid_vs_float32_max_relative']:.1e} of the largest feature ({check['feature_max_abs']:.1f})",
            flush=True,
        )

        variants = [("reference", "reference", args.reference_dtype)]
        for dtype in args.dtypes:
            variants += [(f"ours_{dtype}", "ours", dtype), (f"cached_{dtype}", "cached", dtype)]
        runs, ratios = time_variants(args, trainer, batches, cache, variants, captions_per_batch)
        table = report_table(args, settings, variants, runs, ratios)
        padded_steps = [measure_padded_steps(args, trainer, batches, cache, dtype) for dtype in args.dtypes]
        print("\nSkipping padded steps (cached features, decoder step with / without it, alternating):")
        for piece in padded_steps:
            print(
                f"  {piece['dtype']}: {piece['ratio']:.2f}x [{piece['ratio_min']:.2f}, {piece['ratio_max']:.2f}] "
                f"({piece['decoder_s_padded']:.3f} s -> {piece['decoder_s_skipping']:.3f} s; "
                f"{piece['padding']:.0%} of the padded batch is padding: the model "
                f"{'skips' if piece['model_skips'] else 'decodes'} it)"
            )
        per_image = cache_info["bytes_per_image"]
        print(
            f"\nFeature cache: {'x'.join(map(str, grid_shape))} float16 = {per_image / 1024:.1f} KiB per image "
            f"({cache_info['bytes_per_image_on_disk'] / 1024:.1f} KiB measured on disk); Flickr30K's "
            f"{FLICKR30K_TRAIN_IMAGES:,} training images: {cache_info['flickr30k_bytes'] / 2**30:.2f} GiB "
            f"({cache_info['flickr30k_bytes'] / 1e9:.2f} GB). Pooled {config.encoded_image_size}x"
            f"{config.encoded_image_size} float32 features would take "
            f"{cache_info['pooled_float32_bytes_per_image'] / 2**20:.2f} MiB per image, "
            f"{cache_info['pooled_float32_bytes_per_image'] * FLICKR30K_TRAIN_IMAGES / 2**30:.1f} GiB."
        )
        utilisations = [row["utilisation"] for row in table if row["utilisation"] is not None]
        if utilisations and min(utilisations) < 0.75:
            print(
                f"note: CPU use down to {min(utilisations):.2f} of {args.threads} threads (waiting: other processes "
                "on the cores, or Python overhead of a small model); ratios within rounds are more trustworthy "
                "than captions/s"
            )
        load_end = os.getloadavg()
        output = {
            "settings": settings,
            "table": table,
            "runs": runs,
            "padded_steps": padded_steps,
            "ratios_per_step": ratios,
            "feature_cache": cache_info,
            "check": check,
            "load_average": {"start": load_start, "end": load_end},
            "seconds": time.perf_counter() - started,
        }
        print(f"\nload average at end: {load_end[0]:.2f}; total {output['seconds']:.0f} s")
        if args.json_out:
            args.json_out.write_text(json.dumps(output, indent=2))
            print(f"wrote {args.json_out}")
        return output
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
