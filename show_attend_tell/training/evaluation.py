"""Captioning a list of pictures in batches, and measuring where the attention goes.

`generate_captions` is what validation during training and the demo's test evaluation use: real
decoding with `generate()` (greedy or beam search), never teacher forcing, so the scores are the ones a
user of the model gets. It collects what `captioning.caption_images` yields for a list of pictures.

`attention_localisation` checks that the model looks at what it names: for every shape word in a
caption of the synthetic dataset, the grid cell with the highest attention at the step that emits the
word is mapped back to the picture's pixels, and it counts as a hit when it lies inside the box of the
object with that shape. The chance rate is what a peak placed uniformly at random over the grid cells
would score: the share of cells whose centre lies inside the box.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..captioning import caption_images
from ..processing_show_attend_tell import ShowAttendTellProcessor


@dataclass
class GeneratedCaptions:
    """Output of `generate_captions`: one entry per picture."""

    captions: list[str]
    token_ids: list[list[int]] = field(default_factory=list)  # the words' ids: <start>, <end> left out
    attention: list[torch.Tensor] = field(default_factory=list)  # (len(token_ids), num_pixels) each


def generate_captions(
    model: Any,
    processor: ShowAttendTellProcessor,
    images: Sequence[Image.Image],
    *,
    batch_size: int = 32,
    num_beams: int = 1,
    max_new_tokens: int = 51,
    output_attentions: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> GeneratedCaptions:
    """
    Captions `images` with `model.generate` in batches of `batch_size` pictures (`captioning.caption_images`,
    without a progress bar).

    Args:
        model: a `ShowAttendTellForConditionalGeneration` (unwrapped from Accelerate/DDP).
        output_attentions: also return, per picture, the attention map of every generated word.
        autocast: a context-manager factory for mixed precision (e.g. `accelerator.autocast`).

    Raises:
        ValueError: a picture cannot be used (the message names its position and the reason).
    """
    result = GeneratedCaptions(captions=[])
    for captioned in caption_images(
        model,
        processor,
        images,
        batch_size=batch_size,
        output_attentions=output_attentions,
        autocast=autocast,
        progress=False,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    ):
        if captioned.error is not None:
            raise ValueError(f"picture {captioned.index}: {captioned.error}")
        result.captions.append(captioned.caption)
        result.token_ids.append(captioned.token_ids)
        if output_attentions:
            result.attention.append(torch.from_numpy(captioned.attention))
    return result


# --------------------------------------------------------------------------------------------------
# Attention localisation
# --------------------------------------------------------------------------------------------------


def cells_in_box(box: Sequence[float], image_size: tuple[int, int], grid_side: int) -> int:
    """How many grid cells have their centre inside `box` = [x0, y0, x1, y1] (x1, y1 exclusive)."""
    width, height = image_size
    x0, y0, x1, y1 = box
    count = 0
    for row in range(grid_side):
        y = (row + 0.5) * height / grid_side
        for col in range(grid_side):
            x = (col + 0.5) * width / grid_side
            count += x0 <= x < x1 and y0 <= y < y1
    return count


def peak_in_box(attention: torch.Tensor, box: Sequence[float], image_size: tuple[int, int]) -> bool:
    """
    Whether the highest-attention cell of `attention` (num_pixels,) lies inside `box` of a picture of
    `image_size` (width, height). The image processor stretches the picture to a square, so grid cell
    (row, col) of a side-`n` grid covers x in [col, col + 1) * width / n, and likewise for y.
    """
    side = math.isqrt(attention.numel())
    if side * side != attention.numel():
        raise ValueError(f"an attention map of {attention.numel()} positions is not a square grid")
    row, col = divmod(int(attention.argmax()), side)
    width, height = image_size
    x, y = (col + 0.5) * width / side, (row + 0.5) * height / side
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


@dataclass
class Localisation:
    hits: int = 0
    words: int = 0  # shape words that name an object of the picture
    chance_sum: float = 0.0
    unmatched_words: int = 0  # shape words with no such object in the picture (hallucinations)

    @property
    def share(self) -> float:
        return self.hits / self.words if self.words else 0.0

    @property
    def chance(self) -> float:
        return self.chance_sum / self.words if self.words else 0.0

    @property
    def ratio(self) -> float:
        return self.share / self.chance if self.chance else 0.0


def attention_localisation(
    token_words: Iterable[Sequence[str]],
    attention: Iterable[torch.Tensor],
    objects: Iterable[Sequence[dict[str, Any]]],
    image_sizes: Iterable[tuple[int, int]],
    shape_words: Sequence[str],
    offset: int = 0,
) -> Localisation:
    """
    Localisation over many pictures.

    Args:
        token_words: per picture, the generated words (one per attention map).
        attention: per picture, `(len(words), num_pixels)` maps.
        objects: per picture, the synthetic dataset's objects (`{"shape", "box"}` dicts).
        image_sizes: per picture, (width, height) of the picture the boxes refer to.
        shape_words: the words that name objects ("circle", "square", ...).
        offset: which step's attention is judged, relative to the step that emits the shape word: 0 is
            that step (the measure of the demo); -1 and -2 are the steps that emit the colour and size
            words before it in "a small red circle".
    """
    result = Localisation()
    shapes = set(shape_words)
    for words, maps, picture_objects, size in zip(token_words, attention, objects, image_sizes, strict=True):
        boxes = {obj["shape"]: obj["box"] for obj in picture_objects}
        side = math.isqrt(maps.shape[-1])
        for step, word in enumerate(words):
            if word not in shapes or not 0 <= step + offset < len(words):
                continue
            if word not in boxes:
                result.unmatched_words += 1
                continue
            result.words += 1
            result.hits += peak_in_box(maps[step + offset], boxes[word], size)
            result.chance_sum += cells_in_box(boxes[word], size, side) / (side * side)
    return result


__all__ = [
    "GeneratedCaptions",
    "Localisation",
    "attention_localisation",
    "cells_in_box",
    "generate_captions",
    "peak_in_box",
]
