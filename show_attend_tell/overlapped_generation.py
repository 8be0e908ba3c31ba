"""
Captioning a stream of batches, with the encoder of the next batch running while this one is decoded.

On a GPU, `generate()`'s beam search is bound by the host: every step is a few dozen small kernels issued
from Python and ends with a host synchronisation, so while a batch is decoded most of the device sits idle.
The ResNet encoder is the opposite, a few hundred large convolutions that keep the device busy. Queued on a
second CUDA stream, the next batch's copy to the device and its encoder pass fill those idle gaps, and a
collection is captioned at close to the encoder's own speed instead of at the sum of the two.

The decoding is `generate()`'s, unchanged: each batch gets the ids of `model.generate(pixel_values=...)`
(tested). On a CPU, or any device without CUDA streams, the same calls run one after the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from transformers.modeling_outputs import BaseModelOutput

Payload = TypeVar("Payload")

# CUDA priorities: lower is more urgent, 0 is the default streams' (the least urgent).
DECODING_STREAM_PRIORITY = -1


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # ModelOutput included
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _used_on(value: Any, stream: torch.cuda.Stream | None) -> None:
    """Tells the caching allocator that `stream` reads these tensors, so their memory outlives its work."""
    if stream is not None:
        for tensor in _tensors(value):
            if tensor.device.type == "cuda":
                tensor.record_stream(stream)


def _checked(item: Any) -> tuple[torch.Tensor | None, Any]:
    # A bare tensor would unpack into its first two images without complaint.
    if isinstance(item, torch.Tensor) or not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"generate_overlapped: each batch must be a (pixel_values, payload) pair, got {type(item).__name__}"
        )
    pixel_values = item[0]
    if pixel_values is not None and not (isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4):
        shape = (
            tuple(pixel_values.shape)
            if isinstance(pixel_values, torch.Tensor)
            else type(pixel_values).__name__
        )
        raise TypeError(
            f"generate_overlapped: pixel_values must be a tensor of shape (images, 3, height, width) or None, got {shape}"
        )
    return pixel_values, item[1]


def generate_overlapped(
    model: Any,
    batches: Iterable[tuple[torch.Tensor | None, Payload]],
    **generate_kwargs: Any,
) -> Iterator[tuple[Payload, Any]]:
    """
    `model.generate(pixel_values=..., **generate_kwargs)` for each batch of a stream, in order.

    Args:
        model: a `ShowAttendTellForConditionalGeneration` (any encoder-decoder model whose `generate()`
            accepts `encoder_outputs` works the same way).
        batches: `(pixel_values, payload)` pairs. `pixel_values` of shape `(images, 3, height, width)` on any
            device (pinned CPU memory makes the copy asynchronous), or None for a batch with nothing to
            caption. The payload is handed back untouched with the batch's result.
        generate_kwargs: passed to every `generate()` call.

    Yields:
        `(payload, output)` per batch, in input order: `output` is what `generate()` returns for that batch
        (None where `pixel_values` was None).

    The next batch is read and encoded before this one is decoded, so at most two batches' features are held
    at a time. Call it under the autocast and `torch.inference_mode()` you would call `generate()` under; they
    apply to the encoder passes as well. On a CUDA device the encoder passes run on a second stream, and
    decoding on a third one with a higher priority, so that the decoder's small kernels go ahead of the
    convolutions waiting for the device; the outputs are ready for use on the caller's stream.
    """
    device = model.device
    generation_config = generate_kwargs.get("generation_config") or model.generation_config
    encoder_kwargs = {
        name: bool(generate_kwargs.get(name, getattr(generation_config, name, False)))
        for name in ("output_attentions", "output_hidden_states")
    }
    encoder = model.get_encoder()
    if device.type == "cuda":
        caller_stream = torch.cuda.current_stream(device)
        encoding_stream = torch.cuda.Stream(device)
        decoding_stream = torch.cuda.Stream(device, priority=DECODING_STREAM_PRIORITY)
    else:
        caller_stream = encoding_stream = decoding_stream = None

    def on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def encode(pixel_values: torch.Tensor | None) -> BaseModelOutput | None:
        if pixel_values is None:
            return None
        if encoding_stream is not None:
            encoding_stream.wait_stream(caller_stream)  # the caller may still be writing pixel_values
            _used_on(pixel_values, encoding_stream)
        with on(encoding_stream):
            pixel_values = pixel_values.to(device=device, dtype=model.dtype, non_blocking=True)
            return encoder(pixel_values, return_dict=True, **encoder_kwargs)

    def decode(encoder_outputs: BaseModelOutput | None) -> Any:
        if encoder_outputs is None:
            return None
        if decoding_stream is not None:
            decoding_stream.wait_stream(encoding_stream)
            _used_on(encoder_outputs, decoding_stream)
        with on(decoding_stream):
            output = model.generate(encoder_outputs=encoder_outputs, **generate_kwargs)
        if decoding_stream is not None:
            caller_stream.wait_stream(decoding_stream)
            _used_on(output, caller_stream)
        return output

    waiting: tuple[Payload, BaseModelOutput | None] | None = None
    for item in batches:
        pixel_values, payload = _checked(item)
        encoded = (payload, encode(pixel_values))
        if waiting is not None:
            yield waiting[0], decode(waiting[1])
        waiting = encoded
    if waiting is not None:
        yield waiting[0], decode(waiting[1])
