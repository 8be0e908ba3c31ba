"""
`decoder.capture_steps`: the decoding step of each shape is recorded once and replayed from buffers of its
own (a CUDA graph on a GPU; here, on the CPU, the same buffered step without a graph). It must give the ids
of the step without it, keep decodings that share it apart, and never hand out a buffer that a later step
overwrites. `tests/test_gpu.py` runs the graph itself.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import sharpened_tiny_model, unit_features
from transformers.modeling_outputs import BaseModelOutput

import show_attend_tell.fast_decoding_show_attend_tell as fast_decoding
from show_attend_tell.hub import set_decoding_options
from show_attend_tell.modeling_show_attend_tell import CACHE_NAME

pytestmark = pytest.mark.compat


@pytest.fixture
def model():
    return sharpened_tiny_model(40, std=0.5, seed=3, end_bias=2.0)


def generate(model, features: BaseModelOutput, captured: bool, bf16: bool = False, **kwargs):
    model.decoder.capture_steps = captured
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    finally:
        model.decoder.capture_steps = False


def count_captures(monkeypatch) -> list[int]:
    made = []
    original = fast_decoding.CapturedStep.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fast_decoding.CapturedStep, "__init__", counting)
    return made


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 1},
        {"num_beams": 4},
        {"num_beams": 4, "num_return_sequences": 2, "early_stopping": True},
        {"num_beams": 3, "early_stopping": "never", "length_penalty": 0.0},
        {"do_sample": True, "top_k": 5},
    ],
    ids=["greedy", "beam", "beam-early-stopping-2-sequences", "beam-never", "sampling"],
)
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_captured_steps_give_the_ids_of_the_step_without_them(model, monkeypatch, kwargs, bf16):
    features = unit_features(6, model.config, seed=4)
    kwargs = {"max_new_tokens": 10, "return_dict_in_generate": True, "output_scores": True, **kwargs}
    torch.manual_seed(1)
    plain = generate(model, features, captured=False, bf16=bf16, **kwargs)
    made = count_captures(monkeypatch)
    torch.manual_seed(1)
    captured = generate(model, features, captured=True, bf16=bf16, **kwargs)
    assert made == [1]  # recorded once, then replayed at every later step
    assert torch.equal(captured.sequences, plain.sequences)
    if "sequences_scores" in plain:
        torch.testing.assert_close(captured.sequences_scores, plain.sequences_scores, atol=1e-5, rtol=0)
    eos = model.config.eos_token_id
    lengths = {row[1:].tolist().index(eos) if eos in row[1:] else None for row in plain.sequences}
    assert len(lengths) > 1  # some captions end before others: finished rows go on through the captured step


def test_attention_maps_of_every_step_survive_the_replays(model):
    features = unit_features(3, model.config, seed=5)
    kwargs = {"num_beams": 3, "max_new_tokens": 8, "output_attentions": True, "return_dict_in_generate": True}
    plain = generate(model, features, captured=False, **kwargs)
    captured = generate(model, features, captured=True, **kwargs)
    assert torch.equal(captured.sequences, plain.sequences)
    # each step's attention is its own tensor, not the step's buffer as the last replay left it (the plain
    # step leaves out finished images, whose batched products then round differently in the last bits)
    torch.testing.assert_close(captured.attention_maps, plain.attention_maps, atol=1e-6, rtol=0)


def test_decodings_of_one_shape_share_the_captured_step_but_not_their_images(model, monkeypatch):
    first, second = unit_features(4, model.config, seed=6), unit_features(4, model.config, seed=7)
    kwargs = {"num_beams": 3, "max_new_tokens": 8}
    expected = [generate(model, features, captured=False, **kwargs) for features in (first, second)]
    assert not torch.equal(*expected)
    made = count_captures(monkeypatch)
    for features, want in zip((first, second, first), (*expected, expected[0]), strict=True):
        assert torch.equal(generate(model, features, captured=True, **kwargs), want)
    assert made == [1]
    # another shape gets a step of its own
    two_beams = {"num_beams": 2, "max_new_tokens": 8}
    assert torch.equal(generate(model, first, True, **two_beams), generate(model, first, False, **two_beams))
    assert made == [1, 1]


def test_interleaved_decodings_and_returned_tensors_are_not_overwritten(model):
    """Two decodings of one shape stepped in turn, by hand: each step equals the step without capture, and
    what a step returned stays as it was after the next replay."""
    model.decoder.capture_steps = True
    words = torch.tensor([[model.config.decoder_start_token_id, 5, 9]] * 6)

    def decode(features: BaseModelOutput, captured: bool) -> list[torch.Tensor]:
        model.decoder.capture_steps = captured
        with torch.inference_mode():
            out = model(decoder_input_ids=words[:, :1], encoder_outputs=features, use_cache=True)
            state, logits = out[CACHE_NAME], [out.logits]
            for t in (1, 2):
                out = model(decoder_input_ids=words[:, t : t + 1], past_key_values=state, use_cache=True)
                state = out[CACHE_NAME]
                logits.append(out.logits)
        return logits

    a, b = unit_features(2, model.config, seed=8), unit_features(2, model.config, seed=9)
    expected_a, expected_b = decode(a, False), decode(b, False)
    model.decoder.capture_steps = True
    with torch.inference_mode():
        out_a = model(decoder_input_ids=words[:, :1], encoder_outputs=a, use_cache=True)
        out_b = model(decoder_input_ids=words[:, :1], encoder_outputs=b, use_cache=True)
        state_a, state_b = out_a[CACHE_NAME], out_b[CACHE_NAME]
        kept = []
        for t in (1, 2):
            out_a = model(decoder_input_ids=words[:, t : t + 1], past_key_values=state_a, use_cache=True)
            out_b = model(decoder_input_ids=words[:, t : t + 1], past_key_values=state_b, use_cache=True)
            state_a, state_b = out_a[CACHE_NAME], out_b[CACHE_NAME]
            kept.append((out_a.logits, out_a.attention_maps, state_a.hidden))
            assert torch.equal(out_a.logits, expected_a[t]) and torch.equal(out_b.logits, expected_b[t])
    model.decoder.capture_steps = False
    assert len(model.decoder.inference_memo.captured_steps) == 1
    assert torch.equal(kept[0][0], expected_a[1])  # two replays later
    assert not torch.equal(kept[0][2], kept[1][2])


def test_new_weights_are_captured_again_and_copies_leave_the_steps_behind(model, monkeypatch):
    features = unit_features(3, model.config, seed=10)
    kwargs = {"num_beams": 2, "max_new_tokens": 6}
    generate(model, features, captured=True, **kwargs)
    assert len(model.decoder.inference_memo.captured_steps) == 1
    copied, pickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert copied.decoder.inference_memo is None and pickled.decoder.inference_memo is None
    with torch.no_grad():
        model.decoder.output_layer.weight.mul_(-1.0)  # in place: the prepared weights are made again
    expected = generate(model, features, captured=False, **kwargs)
    made = count_captures(monkeypatch)
    assert torch.equal(generate(model, features, captured=True, **kwargs), expected)
    assert made == [1] and len(model.decoder.inference_memo.captured_steps) == 1
    assert torch.equal(
        generate(copied, features, captured=True, **kwargs), generate(copied, features, False, **kwargs)
    )


def test_only_the_latest_shapes_keep_their_captured_steps(model, monkeypatch):
    features = unit_features(3, model.config, seed=11)
    made = count_captures(monkeypatch)
    for beams in (2, 3, 4, 2):  # the step of 2 beams was dropped for the one of 4 and is recorded again
        generate(model, features, captured=True, num_beams=beams, max_new_tokens=5)
    assert len(made) == 4
    rows = sorted(key[0] for key in model.decoder.inference_memo.captured_steps)
    assert len(rows) == fast_decoding.CAPTURED_STEPS_KEPT == 2 and rows == [3 * 2, 3 * 4]


def test_decoding_options_are_set_on_a_loaded_model_or_refused_for_older_code(model):
    set_decoding_options(model, capture_steps=True)
    assert model.decoder.capture_steps and not model.decoder.fuse_attention_scores
    model.decoder.capture_steps = False
    del model.decoder.capture_steps  # a model whose folder's code predates the option
    with pytest.raises(ValueError, match="predates `capture_steps`"):
        set_decoding_options(model, fuse_attention_scores=True, capture_steps=True)
    assert not model.decoder.fuse_attention_scores  # nothing is half set
    set_decoding_options(model, fuse_attention_scores=True)  # what it has can still be turned on
    assert model.decoder.fuse_attention_scores
