"""`generate_overlapped`: a stream of batches gets exactly what `generate(pixel_values=...)` gives each batch."""

from __future__ import annotations

import contextlib

import pytest
import torch

from show_attend_tell import overlapped_generation
from show_attend_tell.overlapped_generation import generate_overlapped

GENERATE = {"num_beams": 3, "max_new_tokens": 8}


def image_batches(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 64, 64, generator=generator) for size in sizes]


def test_each_batch_gets_the_ids_of_its_own_generate_call(tiny_model):
    batches = image_batches([2, 3, 1, 2])
    with torch.inference_mode():
        expected = [tiny_model.generate(pixel_values=pixels, **GENERATE) for pixels in batches]
        results = list(generate_overlapped(tiny_model, ((p, i) for i, p in enumerate(batches)), **GENERATE))
    # the images are captioned differently, so a batch handed the wrong features would show
    assert len({tuple(row.tolist()) for ids in expected for row in ids}) >= 4
    assert [payload for payload, _ in results] == [0, 1, 2, 3]
    for (_, ids), want in zip(results, expected, strict=True):
        assert torch.equal(ids, want)


def test_empty_batches_keep_their_place_and_the_stream_is_read_one_batch_ahead(tiny_model):
    batches = [*image_batches([2]), None, *image_batches([1, 2], seed=1)]
    read = []

    def stream():
        for index, pixels in enumerate(batches):
            read.append(index)
            yield pixels, f"batch {index}"

    seen = []
    with torch.inference_mode():
        for payload, output in generate_overlapped(tiny_model, stream(), **GENERATE):
            # the next batch is read (and encoded) before this one is decoded, and no further
            seen.append((payload, output is None, len(read)))
    assert seen == [
        ("batch 0", False, 2),
        ("batch 1", True, 3),
        ("batch 2", False, 4),
        ("batch 3", False, 4),
    ]
    assert list(generate_overlapped(tiny_model, iter([]), **GENERATE)) == []


def test_attention_outputs_and_encoder_hidden_states_come_through(tiny_model):
    (pixels,) = image_batches([2], seed=2)
    kwargs = {
        **GENERATE,
        "output_attentions": True,
        "output_hidden_states": True,
        "return_dict_in_generate": True,
    }
    with torch.inference_mode():
        expected = tiny_model.generate(pixel_values=pixels, **kwargs)
        ((_, output),) = generate_overlapped(tiny_model, [(pixels, None)], **kwargs)
    assert torch.equal(output.sequences, expected.sequences)
    assert torch.equal(output.attention_maps, expected.attention_maps)
    # the encoder ran with output_hidden_states, as generate(pixel_values=...) runs it
    assert len(output.encoder_hidden_states) == len(expected.encoder_hidden_states) > 1
    for got, want in zip(output.encoder_hidden_states, expected.encoder_hidden_states, strict=True):
        assert torch.equal(got, want)


def test_a_stream_of_bare_tensors_is_refused_with_a_clear_error(tiny_model):
    (pixels,) = image_batches([2])
    with pytest.raises(TypeError, match=r"\(pixel_values, payload\) pair, got Tensor"):
        next(generate_overlapped(tiny_model, [pixels], **GENERATE))
    with pytest.raises(TypeError, match=r"shape \(images, 3, height, width\) or None, got \(3, 64, 64\)"):
        next(generate_overlapped(tiny_model, [(pixels[0], "one image")], **GENERATE))


def test_each_decoding_waits_for_its_own_batchs_encoding_only(tiny_model, monkeypatch):
    """The order of work on a GPU, with the stream bookkeeping recorded instead of done: batch k+1 is encoded
    before batch k is decoded, and the decoding of batch k waits for the end of batch k's encoding (waiting
    for the encoding stream as a whole would wait for batch k+1's too, and nothing would overlap)."""
    log = []

    class RecordingStreams:
        encodings = 0

        def encoding(self, pixel_values):
            log.append(("encode", self.encodings))
            return contextlib.nullcontext()

        def encoded(self):
            self.encodings += 1
            return f"end of encoding {self.encodings - 1}"

        def decoding(self, encoded, encoder_outputs):
            log.append(("decode after", encoded))
            return contextlib.nullcontext()

        def decoded(self, output):
            log.append(("caller waits", output.shape[0]))

    monkeypatch.setattr(overlapped_generation, "_streams_for", lambda device, overlap: RecordingStreams())
    batches = image_batches([2, 1, 3])
    with torch.inference_mode():
        results = list(generate_overlapped(tiny_model, [(p, i) for i, p in enumerate(batches)], **GENERATE))
    assert [payload for payload, _ in results] == [0, 1, 2]
    assert log == [
        ("encode", 0),
        ("encode", 1),
        ("decode after", "end of encoding 0"),
        ("caller waits", 2),
        ("encode", 2),
        ("decode after", "end of encoding 1"),
        ("caller waits", 1),
        ("decode after", "end of encoding 2"),
        ("caller waits", 3),
    ]
