"""Captioning a list of pictures in batches, and measuring where the attention goes.

`generate_captions` is what validation during training and the demo's test evaluation use: real
decoding with `generate()` (greedy or beam search), never teacher forcing, so the scores are the ones a
user of the model gets.

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

from ..processing_show_attend_tell import ShowAttendTellProcessor


@dataclass
class GeneratedCaptions:
    """Output of `generate_captions`: one entry per picture."""

    captions: list[str]
    token_ids: list[list[int]] = field(default_factory=list)  # generated ids, <start> excluded, up to <end>
    attention: list[torch.Tensor] = field(default_factory=list)  # (len(token_ids), num_pixels) each


@torch.inference_mode()
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
    device: torch.device | str | None = None,
) -> GeneratedCaptions:
    """
    Captions `images` with `model.generate` in batches of `batch_size` pictures.

    Args:
        model: a `ShowAttendTellForConditionalGeneration` (unwrapped from Accelerate/DDP).
        output_attentions: also return, per picture, the attention map of every generated word.
        autocast: a context-manager factory for mixed precision (e.g. `accelerator.autocast`).
        device: where to run; defaults to the model's device.
    """
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    end_id = processor.tokenizer.eos_token_id
    result = GeneratedCaptions(captions=[])
    try:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            pixel_values = processor.image_processor(chunk, return_tensors="pt")["pixel_values"].to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                sequences = model.generate(
                    pixel_values=pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens
                )
                if output_attentions:
                    # The attention of the step that emitted each word, from one teacher-forced pass over the
                    # final captions: the same maps as generate()'s per-step ones, without following beams.
                    maps = model(
                        pixel_values=pixel_values, input_ids=sequences[:, :-1], output_attentions=True
                    ).attention_maps
            sequences = sequences.cpu()
            result.captions.extend(processor.batch_decode(sequences, skip_special_tokens=True))
            for i, sequence in enumerate(sequences.tolist()):
                generated = sequence[1:]  # position 0 is <start>, which no step produced
                if end_id in generated:
                    generated = generated[: generated.index(end_id) + 1]
                result.token_ids.append(generated)
                if output_attentions:
                    result.attention.append(maps[i, : len(generated)].float().cpu())
    finally:
        model.train(was_training)
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
