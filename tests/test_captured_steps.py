"""
`decoder.capture_steps`: every decoding step after the first runs the inference step compiled by torch,
`torch.compile(mode="reduce-overhead", dynamic=False)`, once per step shape; on a GPU torch records it as a CUDA
graph and replays it, here on the CPU inductor compiles it and no graph is used. It must give the ids of the
step without it, compile each shape once (not each step or decoding), read the weights of its own decoder, and hand out
outputs that the next step leaves alone (on a GPU a replay overwrites the previous replay's outputs; here no
graph overwrites anything, so these tests pin the contract and `tests/test_gpu.py` checks it where graphs run).

Compiling takes seconds per shape on this CPU: the tests share one model, and few shapes.
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

# The shapes compiled here: 4 pictures at beams 1 (greedy and sampling), 2, 3 and 5 in float32 and at beam 3 in
# bf16, and 1 picture at beam 3: fewer than the 8 compiles torch allows one function.
IMAGES = 4


@pytest.fixture(scope="module")
def model():
    # torch keeps what it compiled for a function's code in one cache for the whole process (every decoder's
    # compiled step has the same code) and compiles it at most 8 times: start this file from an empty cache,
    # so that its shapes are compiled here and the other test files' shapes do not count
    torch._dynamo.reset()
    return sharpened_tiny_model(40, std=0.5, seed=3, end_bias=2.0)


@pytest.fixture(scope="module")
def features(model) -> BaseModelOutput:
    return unit_features(IMAGES, model.config, seed=4)


def generate(model, features: BaseModelOutput, captured: bool, **kwargs):
    model.decoder.capture_steps = captured
    try:
        with torch.inference_mode():
            return model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    finally:
        model.decoder.capture_steps = False


def caption(row: torch.Tensor, eos: int) -> list[int]:
    """A row of ids up to its first `<end>` (beam search pads with `<end>` or `<pad>` after it)."""
    words = row[1:].tolist()
    return words[: words.index(eos) + 1] if eos in words else words


def assert_same_decoding(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    if "sequences_scores" in want:
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=0)
    if "scores" in want:
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.compat
@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 1},
        {"num_beams": 3},
        {"num_beams": 5, "num_return_sequences": 2, "length_penalty": 0.0},
        {"do_sample": True, "top_k": 5},
    ],
    ids=["greedy", "beam-3", "beam-5", "sampling"],
)
def test_compiled_steps_give_the_ids_and_scores_of_the_step_without_them(model, features, kwargs):
    kwargs = {"max_new_tokens": 10, "return_dict_in_generate": True, "output_scores": True, **kwargs}
    torch.manual_seed(1)
    plain = generate(model, features, captured=False, **kwargs)
    torch.manual_seed(1)
    captured = generate(model, features, captured=True, **kwargs)
    assert model.decoder.inference_memo.compiled_step is not None
    assert_same_decoding(captured, plain)
    eos = model.config.eos_token_id
    lengths = {row[1:].tolist().index(eos) if eos in row[1:] else None for row in plain.sequences}
    assert len(lengths) > 1  # some captions end before others: finished rows go on through the compiled step


@pytest.mark.slow
def test_a_batch_equals_each_picture_alone_and_decodings_alternate_shapes(model, features):
    """Decodings of two shapes in turn (a batch, then each picture alone, then the batch again), each with the
    ids of the plain step; a shape already compiled is not compiled again for other pictures, which shows that
    the pictures are inputs of the compiled step and not part of what it was compiled for."""
    kwargs, eos = {"num_beams": 3, "max_new_tokens": 10}, model.config.eos_token_id
    batch = generate(model, features, captured=True, **kwargs)
    assert torch.equal(batch, generate(model, features, captured=False, **kwargs))
    for index in range(IMAGES):
        alone = BaseModelOutput(last_hidden_state=features.last_hidden_state[index : index + 1])
        ids = generate(model, alone, captured=True, **kwargs)
        assert torch.equal(ids, generate(model, alone, captured=False, **kwargs))
        assert caption(ids[0], eos) == caption(batch[index], eos)
    others = unit_features(IMAGES, model.config, seed=12)
    first = BaseModelOutput(last_hidden_state=others.last_hidden_state[:1])
    with torch.compiler.set_stance("fail_on_recompile"):  # both shapes are compiled: no compile now
        again = generate(model, others, captured=True, **kwargs)
        alone = generate(model, first, captured=True, **kwargs)
    assert torch.equal(again, generate(model, others, captured=False, **kwargs))
    assert [caption(row, eos) for row in again] != [caption(row, eos) for row in batch]
    assert caption(alone[0], eos) == caption(again[0], eos)


@pytest.mark.slow
def test_each_shape_is_compiled_once_not_each_step(model, features):
    """With `capture_steps` the first decoding of a new shape asks torch to compile (refused here, which a
    decoder that ignored the option would not be), and once it is compiled a longer decoding of that shape needs
    no other compile (generate()'s ids grow at every step; a compiled step fixed to their layout would not)."""
    kwargs = {"num_beams": 2}
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(model, features, captured=False, max_new_tokens=4, **kwargs)
        with pytest.raises(RuntimeError, match="fail_on_recompile"):
            generate(model, features, captured=True, max_new_tokens=4, **kwargs)
    generate(model, features, captured=True, max_new_tokens=3, **kwargs)
    steps = {"max_new_tokens": 12, "min_new_tokens": 12}
    with torch.compiler.set_stance("fail_on_recompile"):
        ids = generate(model, features, captured=True, **steps, **kwargs)
    assert ids.shape[1] == 13 and torch.equal(
        ids, generate(model, features, captured=False, **steps, **kwargs)
    )


@pytest.mark.slow
def test_outputs_kept_from_a_step_are_not_changed_by_the_next(model, features):
    """The attention maps, logits and state that a step returned stay as they were after the next steps, and
    every step's attention is its own (a CUDA graph's replay rewrites the previous replay's outputs)."""
    kwargs = {
        "num_beams": 3,
        "max_new_tokens": 10,
        "output_attentions": True,
        "return_dict_in_generate": True,
    }
    plain = generate(model, features, captured=False, **kwargs)
    captured = generate(model, features, captured=True, **kwargs)
    assert torch.equal(captured.sequences, plain.sequences)
    torch.testing.assert_close(captured.attention_maps, plain.attention_maps, atol=1e-6, rtol=0)
    assert not torch.equal(captured.attention_maps[:, 1], captured.attention_maps[:, 2])

    # by hand: three steps of 4 pictures x 3 rows (the shape of beam 3), keeping what each step returned
    start = model.config.decoder_start_token_id
    words = torch.tensor([[start, 5, 9], [start, 7, 7], [start, 9, 5]] * IMAGES)

    def decode(captured: bool) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
        model.decoder.capture_steps = captured
        kept, state = [], None
        try:
            with torch.inference_mode():
                for t in range(3):
                    step = {"encoder_outputs": features} if state is None else {"past_key_values": state}
                    out = model(
                        decoder_input_ids=words[:, t : t + 1], use_cache=True, output_attentions=True, **step
                    )
                    state = out[CACHE_NAME]
                    kept.append((out.logits, out.attention_maps, state.hidden, state.cell))
                    if t == 1:  # the first compiled step, as it was when it returned
                        copies = [tensor.clone() for tensor in kept[1]]
        finally:
            model.decoder.capture_steps = False
        return kept, copies

    expected, _ = decode(False)
    kept, copies = decode(True)
    for got, want in zip(kept[1], copies, strict=True):
        assert torch.equal(got, want)  # one step later
    for got, want in zip(kept, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(kept[1][2], kept[2][2])


@pytest.mark.slow
def test_the_compiled_step_belongs_to_its_decoder_and_to_its_weights(model, features):
    """Each decoder has its own compiled step, reading its own weights; copies and pickles leave it behind;
    weights changed in place give a new one."""
    kwargs = {"num_beams": 3, "max_new_tokens": 10}
    other = sharpened_tiny_model(40, std=0.5, seed=5, end_bias=2.0)
    ids = generate(model, features, captured=True, **kwargs)
    other_ids = generate(other, features, captured=True, **kwargs)
    assert torch.equal(other_ids, generate(other, features, captured=False, **kwargs))
    assert not torch.equal(other_ids, ids)  # not the first decoder's weights, compiled into the step
    step = model.decoder.inference_memo.compiled_step
    assert step is not None and step is not other.decoder.inference_memo.compiled_step

    copied, pickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert copied.decoder.inference_memo is None and pickled.decoder.inference_memo is None
    assert torch.equal(generate(pickled, features, captured=True, **kwargs), ids)
    assert pickled.decoder.inference_memo.compiled_step is not step

    with torch.no_grad():
        other.decoder.lstm.weight_hh.mul_(-1.0)  # in place: the prepared (stacked) weights are made again
    changed = generate(other, features, captured=True, **kwargs)
    assert torch.equal(changed, generate(other, features, captured=False, **kwargs))
    assert not torch.equal(changed, other_ids)


@pytest.mark.slow
def test_bf16_on_a_cpu_compiles_plain_matrices(model, features):
    """Inductor cannot compile oneDNN's products of weights packed outside the graph: with `capture_steps` the
    bf16 weights are prepared unpacked, and the captions are those of the packed step without it."""
    kwargs = {"num_beams": 3, "max_new_tokens": 10}

    def bf16_generate(captured: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generate(model, features, captured=captured, **kwargs)

    packed = bf16_generate(False)
    assert model.decoder.inference_memo.weights.packed or not fast_decoding.PACKED_BF16_PRODUCTS
    captured = bf16_generate(True)
    assert not model.decoder.inference_memo.weights.packed
    assert model.decoder.inference_memo.compiled_weights is model.decoder.inference_memo.weights
    assert torch.equal(captured, packed)


@pytest.mark.compat
def test_decoding_options_are_set_on_a_loaded_model_or_refused_for_older_code():
    model = sharpened_tiny_model(40)
    set_decoding_options(model, capture_steps=True)
    assert model.decoder.capture_steps and not model.decoder.fuse_attention_scores
    model.decoder.capture_steps = False
    del model.decoder.capture_steps  # a model whose folder's code predates the option
    with pytest.raises(ValueError, match="predates `capture_steps`"):
        set_decoding_options(model, fuse_attention_scores=True, capture_steps=True)
    assert not model.decoder.fuse_attention_scores  # nothing is half set
    set_decoding_options(model, fuse_attention_scores=True)  # what it has can still be turned on
    assert model.decoder.fuse_attention_scores
