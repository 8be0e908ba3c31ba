"""From caption-dataset rows to training batches of B images x k captions.

A batch holds `images_per_batch` images and `captions_per_image` captions of each, the caption rows in
`repeat_interleave` order (rows `i * k ... i * k + k - 1` belong to image `i`). The model encodes each
image once and every one of its captions attends over those features, instead of encoding the image
once per caption as the classic implementation did.

Everything that decides what a batch contains is a pure function of `(seed, epoch, position)`: the
shuffled order (`EpochBatchSampler`) and which captions of an image are used (`CaptionTrainingDataset`).
A run that stops in the middle of an epoch and is resumed therefore sees exactly the batches that an
uninterrupted run would have seen.

Rows that cannot be used are skipped and counted instead of stopping a long run: rows whose captions are
all empty are dropped up front (`check_training_rows`), and an image that cannot be decoded is dropped
from its batch by the collator, which reports it so that the training loop can count it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature

from ..image_processing_show_attend_tell import ShowAttendTellImageProcessor, describe_image_error, load_image
from ..tokenization_show_attend_tell import DEFAULT_MAX_CAPTION_WORDS, ShowAttendTellTokenizer
from .feature_cache import FeatureCache


class DataError(ValueError):
    """The data cannot be trained on (for example: most rows are unusable)."""


# --------------------------------------------------------------------------------------------------
# Checking rows before training
# --------------------------------------------------------------------------------------------------


@dataclass
class RowCheck:
    """What `check_training_rows` found in one split."""

    split: str
    total_rows: int
    kept_rows: list[int]  # the rows to train on, in dataset order
    empty_caption_ids: list[str] = field(default_factory=list)  # rows without any non-empty caption
    bad_image_ids: dict[str, str] = field(default_factory=dict)  # image_id -> why it cannot be decoded
    sampled_images: int = 0
    empty_captions_dropped: int = 0  # empty strings removed from rows that have other captions

    def summary(self) -> str:
        parts = [f"{len(self.kept_rows)} of {self.total_rows} {self.split} rows usable"]
        if self.empty_caption_ids:
            parts.append(f"{len(self.empty_caption_ids)} without captions skipped")
        if self.bad_image_ids:
            parts.append(
                f"{len(self.bad_image_ids)} of {self.sampled_images} sampled images undecodable (skipped)"
            )
        if self.empty_captions_dropped:
            parts.append(f"{self.empty_captions_dropped} empty caption strings ignored")
        return ", ".join(parts)


def usable_captions(captions: Any) -> list[str]:
    """The non-empty caption strings of a row (`None` and non-lists count as no captions)."""
    if not isinstance(captions, (list, tuple)):
        return []
    return [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]


def check_training_rows(
    dataset: Dataset,
    *,
    split: str,
    image_sample: int = 200,
    max_bad_fraction: float = 0.5,
) -> RowCheck:
    """
    Finds the rows of `dataset` that can be trained on, before any training starts.

    Captions are checked for every row (reading the `captions` column only, which is cheap); images are
    decoded for an evenly spaced sample of `image_sample` rows, because decoding every image of Flickr30K
    takes minutes. Images outside the sample that turn out undecodable are skipped during training.

    Raises:
        DataError: when more than `max_bad_fraction` of the rows have no caption or of the sampled images
            cannot be decoded: a dataset that is mostly broken is a mistake to report, not to train on.
    """
    total = len(dataset)
    columns = dataset.select_columns(["captions", "image_id"])
    captions_column = columns["captions"]
    ids = [str(image_id) for image_id in columns["image_id"]]
    check = RowCheck(split=split, total_rows=total, kept_rows=[])
    for row, captions in enumerate(captions_column):
        usable = usable_captions(captions)
        if usable:
            check.kept_rows.append(row)
            check.empty_captions_dropped += len(captions) - len(usable)
        else:
            check.empty_caption_ids.append(ids[row])
    if total == 0:
        raise DataError(f"the {split} split is empty: nothing to train on")
    if len(check.empty_caption_ids) > max_bad_fraction * total:
        raise DataError(
            f"{len(check.empty_caption_ids)} of {total} rows of the {split} split have no caption "
            f"(first: image_id {check.empty_caption_ids[0]!r}); is the captions column right?"
        )

    images = dataset.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
    kept = check.kept_rows
    # Evenly spaced, so that a damaged stretch of files (one bad shard, one missing folder) is seen.
    step = max(1, len(kept) / max(1, image_sample))
    sample = sorted({kept[int(i * step)] for i in range(min(image_sample, len(kept)))})
    bad_rows = set()
    for row in sample:
        try:
            load_image(images[row]["image"])
        except Exception as error:  # ImageLoadError, or anything a strange file makes a Pillow plugin raise
            check.bad_image_ids[ids[row]] = describe_image_error(error)
            bad_rows.add(row)
    check.sampled_images = len(sample)
    if sample and len(bad_rows) > max_bad_fraction * len(sample):
        first_id, reason = next(iter(check.bad_image_ids.items()))
        raise DataError(
            f"{len(bad_rows)} of {len(sample)} sampled images of the {split} split cannot be decoded "
            f"(first: image_id {first_id!r}: {reason}); are the image files present and intact?"
        )
    check.kept_rows = [row for row in kept if row not in bad_rows]
    return check


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedCaptions:
    """
    The captions of a split as flat arrays: caption `c` is `token_ids[caption_bounds[c]:caption_bounds[c + 1]]`
    and row `r` holds captions `row_bounds[r]` to `row_bounds[r + 1] - 1`.
    """

    token_ids: np.ndarray  # int32, every caption's words back to back, no special tokens
    caption_bounds: np.ndarray  # (captions + 1,) offsets into token_ids
    row_bounds: np.ndarray  # (rows + 1,) offsets into the captions, per row of the dataset
    truncated: int  # captions cut to `max_words` words

    def captions_of(self, row: int) -> list[np.ndarray]:
        first, last = self.row_bounds[row], self.row_bounds[row + 1]
        return [
            self.token_ids[self.caption_bounds[c] : self.caption_bounds[c + 1]] for c in range(first, last)
        ]


def tokenize_captions(
    captions_per_row: Sequence[Sequence[str]],
    tokenizer: ShowAttendTellTokenizer,
    max_words: int = DEFAULT_MAX_CAPTION_WORDS,
) -> TokenizedCaptions:
    """
    Words of every caption as token ids, each cut to `max_words` words (the specification's limit is 50;
    `<start>` and `<end>` are added when batches are made). Flat numpy arrays rather than nested lists,
    because the dataset object is copied into every DataLoader worker at every epoch.
    """
    flat = [caption for captions in captions_per_row for caption in captions]
    # The `tokenizers` backend directly: the transformers wrapper is ~10x slower on Flickr30K's 145k captions.
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(flat, add_special_tokens=False)]
    truncated = sum(len(ids) > max_words for ids in encoded)
    encoded = [ids[:max_words] for ids in encoded]
    caption_bounds = np.zeros(len(encoded) + 1, dtype=np.int64)
    caption_bounds[1:] = np.cumsum([len(ids) for ids in encoded])
    row_bounds = np.zeros(len(captions_per_row) + 1, dtype=np.int64)
    row_bounds[1:] = np.cumsum([len(captions) for captions in captions_per_row])
    token_ids = np.fromiter(
        (t for ids in encoded for t in ids), dtype=np.int32, count=int(caption_bounds[-1])
    )
    return TokenizedCaptions(token_ids, caption_bounds, row_bounds, truncated)


def choose_captions(num_captions: int, k: int, rng: np.random.Generator) -> list[int]:
    """`k` caption positions out of `num_captions`: without repetition when there are enough."""
    if num_captions >= k:
        return sorted(rng.choice(num_captions, size=k, replace=False).tolist())
    # Fewer captions than rows per image: all of them, then repeats drawn at random.
    return list(range(num_captions)) + rng.integers(0, num_captions, size=k - num_captions).tolist()


# --------------------------------------------------------------------------------------------------
# Dataset, sampler, collator
# --------------------------------------------------------------------------------------------------


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (unlike `seed + epoch`, which collides across runs)."""
    state = np.random.SeedSequence([int(value) for value in values]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


class CaptionTrainingDataset(torch.utils.data.Dataset):
    """
    Item `i` is the `i`-th usable row: its image (as `pixel_values`, or as cached encoder features when the
    feature cache holds them) and `captions_per_image` of its captions as token ids.

    Which captions are used depends on `(seed, epoch, row)` only; call `set_epoch` before each epoch (the
    DataLoader copies the dataset into its workers when an epoch starts, so workers see the new epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        rows: Sequence[int],
        tokenizer: ShowAttendTellTokenizer,
        image_processor: ShowAttendTellImageProcessor,
        *,
        captions_per_image: int = 5,
        seed: int = 0,
        max_caption_words: int = DEFAULT_MAX_CAPTION_WORDS,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
        self.rows = np.asarray(rows, dtype=np.int64)
        # Images are decoded here, not by `datasets`, so that one broken file fails one row, not the run.
        self.images = dataset.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
        columns = dataset.select_columns(["captions", "image_id"])
        self.image_ids = [str(image_id) for image_id in columns["image_id"]]
        self.captions = tokenize_captions(
            [usable_captions(captions) for captions in columns["captions"]], tokenizer, max_caption_words
        )
        self.image_processor = image_processor
        self.captions_per_image = captions_per_image
        self.seed = seed
        self.epoch = 0
        self.feature_cache = feature_cache
        self.start_token_id = tokenizer.bos_token_id
        self.end_token_id = tokenizer.eos_token_id

    @property
    def truncated_captions(self) -> int:
        return self.captions.truncated

    @property
    def num_captions(self) -> int:
        return len(self.captions.caption_bounds) - 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = int(self.rows[position])
        item: dict[str, Any] = {"row": row, "image_id": self.image_ids[row], "error": None}
        all_captions = self.captions.captions_of(row)
        rng = np.random.default_rng(mix_seed(self.seed, self.epoch, row))
        chosen = choose_captions(len(all_captions), self.captions_per_image, rng)
        item["captions"] = [
            [self.start_token_id, *all_captions[c].tolist(), self.end_token_id] for c in chosen
        ]
        cache = self.feature_cache
        status = cache.status(row) if cache is not None else FeatureCache.MISSING
        if status == FeatureCache.CACHED:
            item["grid"] = cache.read(row)
            return item
        if status == FeatureCache.BAD:
            item["error"] = "undecodable (found in an earlier epoch)"
            return item
        try:
            image = load_image(self.images[row]["image"])
            item["pixel_values"] = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        except Exception as error:  # any decoding failure skips the row; see describe_image_error
            item["error"] = describe_image_error(error)
        return item


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """
    Batches of dataset positions, shuffled by `(seed, epoch)` and shared out between processes.

    Every process computes the same order and takes batches `process_index, process_index + processes,
    ...`; the list of batches is padded by wrapping around so that all processes take the same number of
    steps (DDP needs every process in every gradient exchange). `start_batch` skips the batches of this
    process that were already trained on: that is how a run resumes in the middle of an epoch.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(
                f"need at least one item and a batch of at least 1 (got {num_items}, {batch_size})"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def batches_per_process(self) -> int:
        return math.ceil(math.ceil(self.num_items / self.batch_size) / self.num_processes)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`, none skipped."""
        order = np.random.default_rng(mix_seed(self.seed, epoch, 0x5A3)).permutation(self.num_items).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.num_items, self.batch_size)]
        needed = self.batches_per_process * self.num_processes
        batches += [batches[i % len(batches)] for i in range(needed - len(batches))]
        return batches[self.process_index :: self.num_processes]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return self.batches_per_process - self.start_batch


class CaptionBatchCollator:
    """
    Items of `CaptionTrainingDataset` -> one batch:

    - `rows` (images,): dataset rows of the usable images, in batch order;
    - `input_ids`, `labels` (images * k, steps): `<start> words` and `words <end>`, padded; labels use -100
      for padding so the loss ignores it;
    - `pixel_values` (uncached images, 3, S, S) and `cached_grids` (cached images, C, h, w) with
      `cached_mask` (images,) saying which image is which; a batch may mix both (after a resume);
    - `bad_rows`, `bad_ids`, `bad_reasons`: the images that could not be decoded and were left out.
    """

    def __init__(self, pad_token_id: int, image_size: int) -> None:
        self.pad_token_id = pad_token_id
        self.image_size = image_size

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [item for item in items if item["error"] is None]
        bad = [item for item in items if item["error"] is not None]
        captions = [caption for item in good for caption in item["captions"]]
        length = max((len(caption) for caption in captions), default=2)
        tokens = torch.full((len(captions), length), self.pad_token_id, dtype=torch.long)
        for i, caption in enumerate(captions):
            tokens[i, : len(caption)] = torch.as_tensor(caption, dtype=torch.long)
        labels = tokens[:, 1:].clone()
        labels[labels == self.pad_token_id] = -100
        cached = [item for item in good if "grid" in item]
        uncached = [item for item in good if "grid" not in item]
        return {
            "rows": torch.tensor([item["row"] for item in good], dtype=torch.long),
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": labels,
            "cached_mask": torch.tensor(["grid" in item for item in good], dtype=torch.bool),
            "pixel_values": torch.stack([item["pixel_values"] for item in uncached])
            if uncached
            else torch.zeros(0, 3, self.image_size, self.image_size),
            "cached_grids": torch.stack([item["grid"] for item in cached]) if cached else None,
            "bad_rows": torch.tensor([item["row"] for item in bad], dtype=torch.long),
            "bad_ids": [item["image_id"] for item in bad],
            "bad_reasons": [item["error"] for item in bad],
        }


__all__ = [
    "CaptionBatchCollator",
    "CaptionTrainingDataset",
    "DataError",
    "EpochBatchSampler",
    "RowCheck",
    "TokenizedCaptions",
    "check_training_rows",
    "choose_captions",
    "mix_seed",
    "tokenize_captions",
    "usable_captions",
]
