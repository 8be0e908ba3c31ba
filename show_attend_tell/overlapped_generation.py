"""
Captioning a stream of batches, with the encoder of the next batch running while this one is decoded.

On a GPU, `generate()`'s beam search is bound by the host: every step is a few dozen small kernels issued
from Python and ends with a host synchronisation, so while a batch is decoded most of the device sits idle.
The ResNet encoder is the opposite, a few hundred large convolutions that keep the device busy. Queued on a
second CUDA stream, the next batch's copy to the device and its encoder pass fill those idle gaps, and a
collection is captioned at close to the encoder's own speed instead of at the sum of the two.

The decoding is `generate()`'s, unchanged: each batch gets the ids of `model.generate(pixel_values=...)`
(tested). The streams are off by default (`overlap_streams=False`) until a GPU run measures what they buy
(`benchmarks/bench_generate.py --overlap-batches N` on a GPU); without them, and on a CPU or any device
without CUDA streams, the same calls run one after the other.
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


def _used_on(value: Any, stream: torch.cuda.Stream) -> None:
    """Tells the caching allocator that `stream` reads these tensors, so their memory outlives its work."""
    for tensor in _tensors(value):
        if tensor.device.type == "cuda":
            tensor.record_stream(stream)


class _InOrder:
    """Devices without CUDA streams: the encoder and the decoder run one after the other."""

    def encoding(self, pixel_values: torch.Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def encoded(self) -> None:
        return None

    def decoding(self, encoded: None, encoder_outputs: BaseModelOutput) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def decoded(self, output: Any) -> None:
        pass


class _CudaStreams:
    """
    The caller's stream, one that encodes and a more urgent one that decodes. Each batch's encoding ends with
    an event that its decoding waits for: waiting for the encoding stream as a whole would also wait for the
    next batch's encoder pass, queued behind it, and nothing would overlap.
    """

    def __init__(self, device: torch.device) -> None:
        self.caller = torch.cuda.current_stream(device)
        self.encoding_stream = torch.cuda.Stream(device)
        self.decoding_stream = torch.cuda.Stream(device, priority=DECODING_STREAM_PRIORITY)

    def encoding(self, pixel_values: torch.Tensor) -> contextlib.AbstractContextManager:
        self.encoding_stream.wait_stream(self.caller)  # the caller may still be writing pixel_values
        _used_on(pixel_values, self.encoding_stream)
        return torch.cuda.stream(self.encoding_stream)

    def encoded(self) -> torch.cuda.Event:
        done = torch.cuda.Event()
        done.record(self.encoding_stream)
        return done

    def decoding(
        self, encoded: torch.cuda.Event, encoder_outputs: BaseModelOutput
    ) -> contextlib.AbstractContextManager:
        self.decoding_stream.wait_event(encoded)
        _used_on(encoder_outputs, self.decoding_stream)
        return torch.cuda.stream(self.decoding_stream)

    def decoded(self, output: Any) -> None:
        self.caller.wait_stream(self.decoding_stream)  # the outputs are read on the caller's stream
        _used_on(output, self.caller)


def _streams_for(device: torch.device, overlap_streams: bool) -> _InOrder | _CudaStreams:
    return _CudaStreams(device) if overlap_streams and device.type == "cuda" else _InOrder()


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
    *,
    overlap_streams: bool = False,
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
        overlap_streams: on a CUDA device, run the encoder passes and the decoding on streams of their own
            (off by default: not yet measured on a GPU).
        generate_kwargs: passed to every `generate()` call.

    Yields:
        `(payload, output)` per batch, in input order: `output` is what `generate()` returns for that batch
        (None where `pixel_values` was None).

    The next batch is read and encoded before this one is decoded, so at most two batches' features are held
    at a time. Call it under the autocast and `torch.inference_mode()` you would call `generate()` under; they
    apply to the encoder passes as well. With `overlap_streams` on a CUDA device the encoder passes run on a second stream, and
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
    streams = _streams_for(device, overlap_streams)

    def encode(pixel_values: torch.Tensor | None) -> tuple[BaseModelOutput, Any] | None:
        if pixel_values is None:
            return None
        with streams.encoding(pixel_values):
            pixel_values = pixel_values.to(device=device, dtype=model.dtype, non_blocking=True)
            encoder_outputs = encoder(pixel_values, return_dict=True, **encoder_kwargs)
        return encoder_outputs, streams.encoded()

    def decode(encoded: tuple[BaseModelOutput, Any] | None) -> Any:
        if encoded is None:
            return None
        encoder_outputs, done = encoded
        with streams.decoding(done, encoder_outputs):
            output = model.generate(encoder_outputs=encoder_outputs, **generate_kwargs)
        streams.decoded(output)
        return output

    waiting: tuple[Payload, tuple[BaseModelOutput, Any] | None] | None = None
    for item in batches:
        pixel_values, payload = _checked(item)
        encoded = (payload, encode(pixel_values))
        if waiting is not None:
            yield waiting[0], decode(waiting[1])
        waiting = encoded
    if waiting is not None:
        yield waiting[0], decode(waiting[1])
