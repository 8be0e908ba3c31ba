"""The fast inference paths give the same ids as the plain step (float32) and nearly always in bf16."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import bf16_and_float32_logits, sharpened_tiny_model, unit_features
from transformers.modeling_outputs import BaseModelOutput

import show_attend_tell.fast_decoding_show_attend_tell as fast_decoding
from show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration

pytestmark = pytest.mark.compat


def generate(model, features: BaseModelOutput, fast: bool = True, autocast: bool = False, **kwargs):
    model.decoder.fast_inference = fast
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    finally:
        model.decoder.fast_inference = True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 1},
        {"num_beams": 3, "length_penalty": 0.0},
        {"num_beams": 5, "num_return_sequences": 2, "min_new_tokens": 2},
        {"num_beams": 4, "length_penalty": 1.0, "early_stopping": True},
    ],
)
def test_generate_gives_the_same_ids_as_the_plain_step(tiny_model, kwargs):
    features = unit_features(6, tiny_model.config, seed=21)
    common = {"max_new_tokens": 8, "return_dict_in_generate": True, "output_scores": True, **kwargs}
    fast = generate(tiny_model, features, fast=True, **common)
    plain = generate(tiny_model, features, fast=False, **common)
    assert torch.equal(fast.sequences, plain.sequences)
    if kwargs["num_beams"] > 1:
        torch.testing.assert_close(fast.sequences_scores, plain.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("identical_rows", [True, False])
def test_teacher_forced_forward_equals_the_plain_step(tiny_model, identical_rows):
    features = unit_features(2, tiny_model.config, seed=4)
    if identical_rows:  # the first step of generate(): every beam of an image reads the same words
        input_ids = torch.tensor([[1, 5, 6, 7]] * 3 + [[1, 8, 5, 9]] * 3)
    else:
        input_ids = torch.tensor(
            [[1, 5, 6, 7], [1, 6, 6, 7], [1, 9, 5, 5], [1, 8, 5, 9], [1, 7, 7, 7], [1, 5, 8, 6]]
        )
    with torch.no_grad():
        kwargs = {"output_hidden_states": True, "output_attentions": True}
        fast = tiny_model(encoder_outputs=features, input_ids=input_ids, **kwargs)
        tiny_model.decoder.fast_inference = False
        plain = tiny_model(encoder_outputs=features, input_ids=input_ids, **kwargs)
        tiny_model.decoder.fast_inference = True
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cross_attentions[0], plain.cross_attentions[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        fast.decoder_hidden_states[0], plain.decoder_hidden_states[0], atol=1e-6, rtol=1e-5
    )
    fast_state = fast.cache if "cache" in fast else fast.past_key_values
    plain_state = plain.cache if "cache" in plain else plain.past_key_values
    torch.testing.assert_close(fast_state.cell, plain_state.cell, atol=1e-6, rtol=1e-5)
    assert fast_state.get_seq_length() == plain_state.get_seq_length() == 4


def test_a_plain_state_continues_on_the_fast_path_and_back(tiny_model):
    features = unit_features(1, tiny_model.config, seed=2)
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        full = tiny_model(encoder_outputs=features, input_ids=tokens).logits
        tiny_model.decoder.fast_inference = False
        first = tiny_model(encoder_outputs=features, input_ids=tokens[:, :2])
        tiny_model.decoder.fast_inference = True
        state = first.cache if "cache" in first else first.past_key_values
        second = tiny_model(input_ids=tokens[:, 2:4], cache=state)
        state = second.cache if "cache" in second else second.past_key_values
        tiny_model.decoder.fast_inference = False
        third = tiny_model(input_ids=tokens[:, 4:], cache=state).logits
        tiny_model.decoder.fast_inference = True
    torch.testing.assert_close(
        torch.cat([first.logits, second.logits, third], dim=1), full, atol=1e-5, rtol=1e-5
    )


def test_attention_scores_reuse_one_buffer_and_equal_the_formula():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 16, 32, generator=generator)
    query = torch.randn(7, 3, 32, generator=generator)
    weight, bias = torch.randn(32, generator=generator), torch.tensor(0.3)
    expected = torch.relu(keys.unsqueeze(1) + query.unsqueeze(2)) @ weight + bias
    scores, scratch = fast_decoding.attention_scores_into(None, keys, query, weight, bias)
    again, scratch_again = fast_decoding.attention_scores_into(scratch, keys, query, weight, bias)
    smaller, scratch_smaller = fast_decoding.attention_scores_into(scratch, keys[:2], query[:2], weight, bias)
    assert scratch_again is scratch and scratch_smaller is scratch  # one buffer from step to step
    for computed, want in ((scores, expected), (again, expected), (smaller, expected[:2])):
        torch.testing.assert_close(computed, want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def ending_model():
    """A small model whose captions end after 1 to 12 words, so that images finish their search at different
    steps."""
    return sharpened_tiny_model(40, std=0.5, seed=1, end_bias=2.0)


def test_the_batch_gives_each_image_its_own_caption_when_images_finish_at_different_steps(ending_model):
    features = unit_features(6, ending_model.config, seed=9)
    kwargs = {"num_beams": 3, "max_new_tokens": 10}
    batched = generate(ending_model, features, **kwargs)
    for image in range(6):
        one = BaseModelOutput(last_hidden_state=features.last_hidden_state[image : image + 1])
        alone = generate(ending_model, one, **kwargs)
        width = alone.shape[1]
        assert torch.equal(batched[image, :width], alone[0])
        filler = torch.tensor([ending_model.config.pad_token_id, ending_model.config.eos_token_id])
        assert torch.isin(batched[image, width:], filler).all()  # after <end>: padding


@pytest.mark.slow
def test_fused_attention_scores_give_the_same_ids(ending_model):
    """`fuse_attention_scores` (torch.compile of the scores: one kernel) changes the speed, not the captions."""
    features = unit_features(12, ending_model.config, seed=3)
    generator = torch.Generator().manual_seed(1)
    keys, query = torch.randn(3, 16, 8, generator=generator), torch.randn(3, 2, 8, generator=generator)
    weight, bias = torch.randn(8, generator=generator), torch.tensor(0.5)
    expected = fast_decoding.attention_scores(keys, query, weight, bias)
    torch.testing.assert_close(fast_decoding.fused_attention_scores(keys, query, weight, bias), expected)
    kwargs = {"num_beams": 4, "max_new_tokens": 12, "return_dict_in_generate": True, "output_scores": True}
    plain = generate(ending_model, features, fast=False, **kwargs)
    ending_model.decoder.fuse_attention_scores = True
    fused = generate(ending_model, features, **kwargs)
    assert torch.equal(fused.sequences, plain.sequences)
    torch.testing.assert_close(fused.sequences_scores, plain.sequences_scores, atol=1e-5, rtol=0)
    fused_bf16 = generate(ending_model, features, autocast=True, **kwargs)
    same = [torch.equal(a, b) for a, b in zip(fused_bf16.sequences, plain.sequences, strict=True)]
    assert sum(same) >= 0.75 * len(same)


def test_weights_prepared_for_inference_follow_parameter_changes(tiny_model):
    features = unit_features(3, tiny_model.config, seed=6)
    kwargs = {"num_beams": 3, "max_new_tokens": 6}
    before = generate(tiny_model, features, **kwargs)
    assert torch.equal(before, generate(tiny_model, features, **kwargs))
    with torch.no_grad():  # an in-place change, as an optimizer step or load_state_dict makes
        tiny_model.decoder.output_layer.bias[before[:, 1]] -= 50.0
    after = generate(tiny_model, features, **kwargs)
    assert torch.equal(after, generate(tiny_model, features, fast=False, **kwargs))
    assert not torch.equal(after[:, 1], before[:, 1])


def test_training_mode_under_no_grad_keeps_dropout():
    """The fast path has no dropout, so it must not run in training mode."""
    torch.manual_seed(0)
    model = ShowAttendTellForConditionalGeneration(
        ShowAttendTellConfig.tiny(vocab_size=20, dropout=0.5)
    ).train()
    features = unit_features(1, model.config)
    input_ids = torch.tensor([[1, 5, 6, 7]] * 4)
    with torch.no_grad():
        logits = model(encoder_outputs=features, input_ids=input_ids).logits
    assert not torch.allclose(logits[0], logits[1])  # same words, different dropout masks


def test_bf16_autocast_generate_matches_float32_for_most_images(tiny_model):
    """bf16 rounds the products: a caption may change only where two hypotheses nearly tie."""
    features = unit_features(24, tiny_model.config, seed=31)
    kwargs = {"num_beams": 3, "max_new_tokens": 6, "length_penalty": 0.0}
    reference = generate(tiny_model, features, **kwargs)
    fast_bf16 = generate(tiny_model, features, autocast=True, **kwargs)
    plain_bf16 = generate(tiny_model, features, fast=False, autocast=True, **kwargs)
    assert fast_bf16.shape[0] == reference.shape[0] == 24
    same = [torch.equal(a, b) for a, b in zip(fast_bf16, reference, strict=True)]
    plain_same = [torch.equal(a, b) for a, b in zip(plain_bf16, reference, strict=True)]
    assert sum(same) >= 0.8 * len(same)
    assert sum(same) >= sum(plain_same) - 2  # at least as faithful as bf16 autocast of the plain step


def test_bf16_steps_compute_each_rows_likeliest_logits_in_float32(tiny_model):
    rows_per_image = 3
    logits, float32 = bf16_and_float32_logits(tiny_model, images=4, rows_per_image=rows_per_image)
    assert logits.dtype == torch.float32
    top = logits.topk(2 * rows_per_image, dim=-1).indices  # beam search's candidates of each row
    torch.testing.assert_close(logits.gather(-1, top), float32.gather(-1, top), atol=1e-5, rtol=1e-6)
    assert torch.equal(top.sort(-1).values, float32.topk(2 * rows_per_image, dim=-1).indices.sort(-1).values)
    # the other words keep bf16's precision (8 significant bits), not float32's
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, top, False)
    error = (logits - float32)[rest].abs()
    assert 1e-4 < error.max() < 2**-6 * float32.abs().max()


def test_bf16_beam_search_keeps_float32_captions_when_logits_are_large(monkeypatch):
    """
    A trained captioner's likely words have logits of 10 to 20, where bf16 rounds to 0.06 to 0.125: enough
    to reorder candidate captions. Here every logit is shifted by 20 (which changes nothing in float32): the
    bf16 step still gives float32's captions, because the candidates' logits are computed in float32.
    """
    model = sharpened_tiny_model(60, std=0.3, seed=1)
    with torch.no_grad():
        model.decoder.output_layer.bias += 20.0
    features = unit_features(48, model.config, seed=3)
    kwargs = {"num_beams": 4, "max_new_tokens": 8, "length_penalty": 0.0}
    reference = generate(model, features, **kwargs)

    def identical(ids):
        return sum(torch.equal(a, b) for a, b in zip(ids, reference, strict=True))

    assert identical(generate(model, features, autocast=True, **kwargs)) >= 0.9 * 48
    # the same step with bf16's logits as they come out of the product
    monkeypatch.setattr(fast_decoding, "exact_top_logits", lambda logits, *args: logits.float())
    assert identical(generate(model, features, autocast=True, **kwargs)) <= 0.5 * 48


@pytest.mark.skipif(not fast_decoding.PACKED_BF16_PRODUCTS, reason="oneDNN without bf16 on this CPU")
def test_bf16_products_on_a_cpu_read_prepacked_weights_with_the_same_results(tiny_model, monkeypatch):
    decoder = tiny_model.decoder
    weights = fast_decoding.inference_weights(decoder, torch.bfloat16)
    assert set(weights.packed) == {"hidden", "input", "output"}
    assert weights.output_weight is None  # the packed copy replaces it
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, decoder.lstm.hidden_size, generator=generator).bfloat16()
    with torch.inference_mode():
        expected = F.linear(hidden, decoder.output_layer.weight.bfloat16(), weights.output_bias)
        assert torch.equal(weights.product("output", hidden, weights.output_bias), expected)
        lstm_input = torch.randn(7, decoder.lstm.input_size, generator=generator).bfloat16()
        recurrent = torch.randn(7, 4 * decoder.lstm.hidden_size, generator=generator).bfloat16()
        expected = torch.addmm(recurrent, lstm_input, decoder.lstm.weight_ih.bfloat16().t())
        torch.testing.assert_close(weights.product("input", lstm_input, add=recurrent), expected)
    # and generate() gives the captions of the same step with plain products
    features = unit_features(16, tiny_model.config, seed=8)
    kwargs = {"num_beams": 3, "max_new_tokens": 8}
    packed_ids = generate(tiny_model, features, autocast=True, **kwargs)
    monkeypatch.setattr(fast_decoding, "PACKED_BF16_PRODUCTS", False)  # remade without packing
    assert not fast_decoding.inference_weights(decoder, torch.bfloat16).packed
    assert torch.equal(generate(tiny_model, features, autocast=True, **kwargs), packed_ids)


def test_a_model_that_has_decoded_in_bf16_can_be_copied_and_pickled(tiny_model, tmp_path):
    """The decoder's prepared inference weights (on a CPU, oneDNN's packed matrices) are a cache: a copy or a
    pickle of the model leaves them behind and rebuilds them."""
    features = unit_features(3, tiny_model.config, seed=2)
    kwargs = {"num_beams": 2, "max_new_tokens": 5}
    ids = generate(tiny_model, features, autocast=True, **kwargs)
    assert tiny_model.decoder.inference_memo is not None
    copied = copy.deepcopy(tiny_model)
    torch.save(tiny_model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (copied, loaded):
        assert other.decoder.inference_memo is None
        assert torch.equal(generate(other, features, autocast=True, **kwargs), ids)


def test_a_decoding_prepares_its_weights_once_and_its_cache_can_be_copied(tiny_model, monkeypatch):
    """The cache carries the prepared weights from step to step; a copy or pickle of it leaves them behind."""
    calls, prepare = [], fast_decoding.inference_weights
    monkeypatch.setattr(
        fast_decoding,
        "inference_weights",
        lambda decoder, dtype: calls.append(dtype) or prepare(decoder, dtype),
    )
    features = unit_features(3, tiny_model.config, seed=2)
    kwargs = {"num_beams": 2, "max_new_tokens": 5, "min_new_tokens": 5, "return_dict_in_generate": True}
    out = generate(tiny_model, features, autocast=True, **kwargs)
    assert calls == [torch.bfloat16]  # once for the decoding, not once per step
    cache = out.get("cache") if "cache" in out else out.get("past_key_values")
    assert cache.inference_weights is not None
    copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
    assert all(other.inference_weights is None for other in copies)
    next_words = torch.full((cache.hidden.shape[0], 1), 5)

    def next_logits(state):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return tiny_model(decoder_input_ids=next_words, past_key_values=state, use_cache=True).logits

    expected = next_logits(cache)
    assert len(calls) == 1
    for other in copies:  # the copies prepare the weights again and decode the same
        assert torch.equal(next_logits(other), expected)
    assert len(calls) == 3


def test_bf16_weights_generate(tiny_model):
    """A model converted to bf16 (no autocast) decodes too; its state stays float32."""
    features = unit_features(8, tiny_model.config, seed=12)
    reference = generate(tiny_model, features, num_beams=3, max_new_tokens=6)
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    out = generate(model, features, num_beams=3, max_new_tokens=6, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 8
    state = out.get("cache") if "cache" in out else out.get("past_key_values")
    assert state.hidden.dtype == torch.float32
    same = [torch.equal(a, b) for a, b in zip(out.sequences, reference, strict=True)]
    assert sum(same) >= 0.5 * len(same)


def test_channels_last_bf16_end_to_end(tiny_model):
    """The fast configuration of the benchmark: channels_last encoder, bf16 autocast, from pixels."""
    pixel_values = torch.randn(3, 3, 64, 64)
    reference = tiny_model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=5)
    model = copy.deepcopy(tiny_model).to(memory_format=torch.channels_last)
    pixels = pixel_values.contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=5), reference)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ids = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=5)
    assert ids.shape[0] == 3 and ids.dtype == torch.long


def test_the_benchmarks_classic_reference_returns_generates_captions(tiny_model):
    """benchmarks/reference_beam_search.py (batch 1, features copied per beam) decodes like generate()."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from reference_beam_search import classic_beam_search

    eos = tiny_model.config.eos_token_id
    features = unit_features(6, tiny_model.config, seed=17)
    ids = generate(tiny_model, features, num_beams=3, max_new_tokens=7, length_penalty=0.0)
    for image in range(6):
        tokens = ids[image].tolist()[1:]
        expected = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        found, score, _ = classic_beam_search(
            tiny_model, features.last_hidden_state[image], 3, 7, search="fixed"
        )
        assert found == expected
        assert score == pytest.approx(teacher_forced_score(tiny_model, features, image, found), abs=1e-4)
        # the tutorial's own rule (the beam shrinks as captions end) returns a complete caption too
        shrinking, _, _ = classic_beam_search(
            tiny_model, features.last_hidden_state[image], 3, 7, search="shrinking"
        )
        assert shrinking[-1] == eos or len(shrinking) == 7


def teacher_forced_score(model, features: BaseModelOutput, image: int, tokens: list[int]) -> float:
    start = model.config.decoder_start_token_id
    one = BaseModelOutput(last_hidden_state=features.last_hidden_state[image : image + 1])
    with torch.no_grad():
        logits = model(encoder_outputs=one, input_ids=torch.tensor([[start, *tokens[:-1]]])).logits
    log_probs = logits[0].log_softmax(-1)
    return sum(log_probs[t, token].item() for t, token in enumerate(tokens))
