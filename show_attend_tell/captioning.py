"""
Captioning a collection of pictures: the one loop behind `scripts/caption.py`, `scripts/evaluate_captions.py`,
validation during training and the HTTP service's batches.

    from show_attend_tell.captioning import caption_images

    for result in caption_images(model, processor, ["a.jpg", "photos/b.png"], num_beams=3):
        print(result.key, result.caption if result.error is None else result.error)

The pictures (file paths, URLs, bytes, PIL images, arrays, or a `datasets.Dataset` with an `image` column) are
read and prepared by the image processor in DataLoader workers (`num_workers`), stacked in batches of
`batch_size` and captioned with `model.generate()`; the next batch's encoder pass runs before this batch is
decoded (`overlapped_generation`). One `CaptionedImage` comes back per picture, in input order, as soon as its
batch is done, so a collection of any size is captioned in the memory of two batches. A picture that cannot be
read gives a result whose `error` says why in one line; the others are captioned as usual.

Every picture is prepared on its own and beam search keeps each picture's beams apart, so a picture gets the
same caption in a batch as alone (tested at beams 1, 3 and 5).

The pieces are public for callers that drive the model themselves: `picture_batches` (reading and batching),
`caption_batch` (one generate() call on prepared pictures or encoder outputs) and `results_from_generate`
(one result per picture from a generate() output).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers.modeling_outputs import BaseModelOutput

from .image_processing_show_attend_tell import describe_image_error, load_image
from .overlapped_generation import generate_overlapped
from .pipeline_show_attend_tell import words_and_attention

__all__ = [
    "CaptionedImage",
    "PictureBatch",
    "caption_batch",
    "caption_batches",
    "caption_images",
    "picture_batches",
    "results_from_generate",
]


@dataclass
class CaptionedImage:
    """
    One picture's result.

    Attributes:
        index: its position in the collection.
        key: its name: the `keys` given, else the path or URL, the dataset's `image_id`, or the position.
        caption: the best caption (None when the picture could not be read).
        captions: the `num_return_sequences` best captions, best first (`[caption]` by default).
        words: the best caption's generated words (`<unk>` kept, `<start>` and `<end>` left out).
        token_ids: the ids of `words`.
        attention: with `output_attentions`, a float32 array `(len(words), num_pixels)`: the map over the
            encoder's grid of the step that emitted each word.
        error: why the picture could not be read, in one line (None when it was captioned).
        pixel_values: with `keep_pixel_values`, the model's input `(3, height, width)` (e.g. for a figure).
    """

    index: int
    key: str
    caption: str | None = None
    captions: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    attention: np.ndarray | None = None
    error: str | None = None
    pixel_values: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Reading and batching
# --------------------------------------------------------------------------------------------------


@dataclass
class PictureBatch:
    """
    Prepared pictures of one batch: `pixel_values[i]` is picture `positions[i]` (None when none could be read);
    `failed` holds the results of those that could not be read, with their `error`.
    """

    positions: list[int]
    keys: list[str]
    pixel_values: torch.Tensor | None
    failed: list[CaptionedImage]


def _is_dataset(images: Any) -> bool:
    return (
        hasattr(images, "column_names") and hasattr(images, "cast_column") and "image" in images.column_names
    )


def _undecoded(dataset: Any) -> Any:
    """The dataset's image and image_id columns, the images left as bytes: workers decode them with our checks."""
    from datasets import Image as ImageFeature

    columns = [name for name in ("image", "image_id") if name in dataset.column_names]
    return dataset.select_columns(columns).cast_column("image", ImageFeature(decode=False))


def _default_keys(images: Any) -> list[str] | None:
    """
    A name per picture: a dataset's image_ids (else row numbers), each path or URL given (else the position);
    None for a collection without a length, whose pictures are named as they are read.
    """
    if _is_dataset(images):
        if "image_id" in images.column_names:
            return [str(key) for key in images["image_id"]]
        return [str(position) for position in range(len(images))]
    if not isinstance(images, Sequence):
        return None
    return [_item_key(item, position) for position, item in enumerate(images)]


def _item_key(item: Any, position: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, os.PathLike):
        return str(os.fspath(item))
    return str(position)


def read_picture(item: Any, name: str) -> Any:
    """
    One collection item as something the image processor takes: a path, URL, bytes or file object is read with
    `load_image` (one-line `ImageLoadError`s), a datasets image cell (`{"bytes", "path"}`) likewise, a PIL image
    made upright RGB, an array passed as it is.
    """
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item
    return load_image(item, name=name)


def _prepared(item: Any, position: int, key: str, image_processor: Any) -> dict[str, Any]:
    try:
        picture = read_picture(item, key)
        pixel_values = image_processor(picture, return_tensors="pt")["pixel_values"][0]
    except Exception as error:  # anything a strange file triggers: reported with its picture, the rest go on
        return {"position": position, "key": key, "error": describe_image_error(error)}
    return {"position": position, "key": key, "pixel_values": pixel_values}


class _Pictures(Dataset):
    """The pictures at `positions` of a sized collection, read and prepared (in DataLoader workers)."""

    def __init__(
        self, images: Any, keys: Sequence[str], positions: Sequence[int], image_processor: Any
    ) -> None:
        self.images = _undecoded(images) if _is_dataset(images) else images
        self.dataset = _is_dataset(images)
        self.keys = keys
        self.positions = list(positions)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.positions[index]
        item = self.images[position]
        return _prepared(
            item["image"] if self.dataset else item, position, self.keys[position], self.image_processor
        )


class _PictureStream(IterableDataset):
    """A collection without a length (a generator): read in this process, in order, each picture once."""

    def __init__(self, images: Iterable[Any], keys: Sequence[str] | None, image_processor: Any) -> None:
        self.images = images
        self.keys = keys
        self.image_processor = image_processor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for position, item in enumerate(self.images):
            key = self.keys[position] if self.keys is not None else _item_key(item, position)
            yield _prepared(item, position, key, self.image_processor)


def _collate(samples: list[dict[str, Any]]) -> PictureBatch:
    good = [sample for sample in samples if "pixel_values" in sample]
    return PictureBatch(
        positions=[sample["position"] for sample in good],
        keys=[sample["key"] for sample in good],
        pixel_values=torch.stack([sample["pixel_values"] for sample in good]) if good else None,
        failed=[
            CaptionedImage(index=sample["position"], key=sample["key"], error=sample["error"])
            for sample in samples
            if "error" in sample
        ],
    )


def picture_batches(
    images: Iterable[Any],
    image_processor: Any,
    *,
    keys: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[PictureBatch]:
    """
    The pictures of `images` read, prepared by `image_processor` and stacked, `batch_size` at a time, in order.

    Args:
        images: a sequence (or `datasets.Dataset` with an `image` column) of pictures, or any iterable of them
            (read in this process then: `num_workers` must be 0).
        keys: a name per picture of the collection (default: see `CaptionedImage.key`).
        positions: caption only these positions of a sized collection, in this order (default: all).
        num_workers: DataLoader processes that read and prepare the pictures.
        pin_memory: page-locked batches, so that the copy to a GPU runs asynchronously.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise ValueError(
            f"a collection of pictures is needed (a list, a dataset, any iterable), not one {type(images).__name__}:"
            " put it in a list"
        )
    keys = list(keys) if keys is not None else _default_keys(images)
    if _is_dataset(images) or isinstance(images, Sequence):
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys given for {len(images)} pictures")
        source: Dataset = _Pictures(
            images, keys, range(len(images)) if positions is None else positions, image_processor
        )
    else:
        if positions is not None or num_workers:
            raise ValueError(
                "positions and num_workers need a collection with a length (a list or a dataset)"
            )
        source = _PictureStream(images, keys, image_processor)
    yield from DataLoader(
        source,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------------------------------


def results_from_generate(outputs: Any, tokenizer: Any, num_pictures: int) -> list[CaptionedImage]:
    """
    One result per picture (`index` = its row in the batch) from what `generate()` returned for `num_pictures`
    pictures: the ids, or a dict output whose `attention_maps` (with `output_attentions`) give the maps.
    `generate()` returns each picture's `num_return_sequences` best sequences one after the other, best first.
    """
    sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
    maps = None if isinstance(outputs, torch.Tensor) else outputs.get("attention_maps")
    per_picture = len(sequences) // max(num_pictures, 1)
    if num_pictures < 1 or per_picture * num_pictures != len(sequences):
        raise ValueError(f"{len(sequences)} sequences cannot be split between {num_pictures} pictures")
    sequences = sequences.cpu()
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    results = []
    for picture in range(num_pictures):
        best = picture * per_picture
        words, attention = words_and_attention(
            sequences[best], None if maps is None else maps[best], tokenizer
        )
        results.append(
            CaptionedImage(
                index=picture,
                key=str(picture),
                caption=texts[best],
                captions=texts[best : best + per_picture],
                words=words,
                token_ids=[int(i) for i in tokenizer.convert_tokens_to_ids(words)],
                attention=attention,
            )
        )
    return results


def _generate_kwargs(output_attentions: bool, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    if output_attentions:
        return {**generate_kwargs, "output_attentions": True, "return_dict_in_generate": True}
    return generate_kwargs


def caption_batch(
    model: Any,
    tokenizer: Any,
    pixel_values: torch.Tensor | None = None,
    *,
    encoder_outputs: BaseModelOutput | None = None,
    output_attentions: bool = False,
    **generate_kwargs: Any,
) -> list[CaptionedImage]:
    """
    One `model.generate()` call for prepared pictures `(pictures, 3, height, width)`, or for their encoder
    outputs (which several decodings can share: they are not changed), and one result per picture.
    """
    if (pixel_values is None) == (encoder_outputs is None):
        raise ValueError("caption_batch needs pixel_values or encoder_outputs (one of them)")
    if encoder_outputs is not None:
        # transformers' generate() may expand the object it is given for beam search: each call gets its own.
        inputs: dict[str, Any] = {"encoder_outputs": BaseModelOutput(**encoder_outputs)}
        pictures = len(encoder_outputs.last_hidden_state)
    else:
        inputs = {"pixel_values": pixel_values.to(model.device, dtype=model.dtype)}
        pictures = len(pixel_values)
    with torch.inference_mode():
        outputs = model.generate(**inputs, **_generate_kwargs(output_attentions, generate_kwargs))
    return results_from_generate(outputs, tokenizer, pictures)


def _results_of(
    batch: PictureBatch, outputs: Any, tokenizer: Any, keep_pixel_values: bool
) -> list[CaptionedImage]:
    """The batch's results in input order: the captioned pictures and those that failed."""
    results = list(batch.failed)
    if outputs is not None:
        for row, result in enumerate(results_from_generate(outputs, tokenizer, len(batch.positions))):
            result.index, result.key = batch.positions[row], batch.keys[row]
            if keep_pixel_values:
                result.pixel_values = batch.pixel_values[row]
            results.append(result)
    return sorted(results, key=lambda result: result.index)


def _progress_bar(progress: bool | None, total: int | None, batch_size: int) -> Any:
    from tqdm.auto import tqdm

    if (
        progress is None
    ):  # as transformers and datasets do: on for long work, off where the library's bars are
        from transformers.utils import logging as transformers_logging

        progress = transformers_logging.is_progress_bar_enabled() and (total is None or total > batch_size)
    return tqdm(total=total, unit="img", desc="captioning", disable=not progress)


def caption_images(
    model: Any, processor: Any, images: Iterable[Any], **options: Any
) -> Iterator[CaptionedImage]:
    """
    Captions a collection of pictures in batches; yields one `CaptionedImage` per picture, in input order.

    Args:
        model: a `ShowAttendTellForConditionalGeneration` (put in eval mode while captioning).
        processor: its processor (image processor and tokenizer).
        images: file paths, URLs, bytes, PIL images or arrays, as a list or any iterable, or a
            `datasets.Dataset` with an `image` column.
        options: those of `caption_batches` (`batch_size`, `num_workers`, `output_attentions`, `progress`,
            ...) and `generate()`'s (`num_beams`, `max_new_tokens`, `num_return_sequences`, ...).
    """
    for results in caption_batches(model, processor, images, **options):
        yield from results


def caption_batches(
    model: Any,
    processor: Any,
    images: Iterable[Any],
    *,
    keys: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    output_attentions: bool = False,
    keep_pixel_values: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool | None = None,
    **generate_kwargs: Any,
) -> Iterator[list[CaptionedImage]]:
    """
    `caption_images` a batch at a time: yields the results of each batch of `batch_size` pictures, in input
    order (those that could not be read included), e.g. to write each batch to a file in one go.

    Args:
        model, processor, images: see `caption_images`.
        keys, positions, batch_size, num_workers: see `picture_batches`.
        output_attentions: give each result the attention map of each word.
        keep_pixel_values: give each result the model's input, e.g. to draw what the model saw.
        autocast: a context-manager factory for mixed precision (e.g. `accelerator.autocast`).
        progress: a progress bar on stderr; by default shown for more than one batch, unless transformers'
            progress bars are disabled.
        generate_kwargs: passed to every `generate()` call (`num_beams`, `max_new_tokens`,
            `num_return_sequences`, ...; defaults come from the model's generation config).
    """
    tokenizer = processor.tokenizer
    batches = picture_batches(
        images,
        processor.image_processor,
        keys=keys,
        positions=positions,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=model.device.type == "cuda",
    )
    sized = isinstance(images, Sequence) or _is_dataset(images)
    total = len(positions) if positions is not None else len(images) if sized else None
    generated = generate_overlapped(
        model,
        ((batch.pixel_values, batch) for batch in batches),
        **_generate_kwargs(output_attentions, generate_kwargs),
    )
    was_training = model.training
    model.eval()
    try:
        with _progress_bar(progress, total, batch_size) as bar:
            while True:
                # Inference mode and autocast around the model's work only: held across a `yield` they would
                # leak into the caller's code between two batches.
                with torch.inference_mode(), autocast() if autocast is not None else contextlib.nullcontext():
                    step = next(generated, None)
                if step is None:
                    break
                batch, outputs = step
                results = _results_of(batch, outputs, tokenizer, keep_pixel_values)
                bar.update(len(results))
                yield results
    finally:
        model.train(was_training)
