"""generate(): greedy, beam search, sampling and attentions, checked against first principles."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import sharpened_tiny_model, unit_features
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.modeling_outputs import BaseModelOutput

pytestmark = pytest.mark.compat


def teacher_forced_log_likelihood(model, features: BaseModelOutput, tokens: list[int]) -> float:
    """log p(tokens | image) by one teacher-forced forward pass (tokens exclude <start>)."""
    start = model.config.decoder_start_token_id
    input_ids = torch.tensor([[start, *tokens[:-1]]])
    with torch.no_grad():
        logits = model(encoder_outputs=copy.deepcopy(features), input_ids=input_ids).logits
    log_probs = logits.log_softmax(-1)[0]
    return sum(log_probs[t, token].item() for t, token in enumerate(tokens))


def all_hypotheses(vocab_size: int, eos: int, max_new_tokens: int, min_new_tokens: int = 0):
    """Every sequence generate() could return: ended by <end>, or cut at max_new_tokens."""
    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(vocab_size), repeat=length):
            if eos in tokens[:-1]:
                continue
            if length < max_new_tokens and tokens[-1] != eos:
                continue
            if eos in tokens[:min_new_tokens]:
                continue
            yield list(tokens)


def generated_tokens(sequence: torch.Tensor, eos: int) -> list[int]:
    tokens = sequence.tolist()[1:]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture
def micro_model():
    """Six words (pad, start, end, unk and two more): small enough to enumerate every caption."""
    return sharpened_tiny_model(6, std=0.8, seed=3)


def test_next_word_depends_on_earlier_words(micro_model):
    """Precondition of every test below: without it, a broken state or reorder would go unnoticed."""
    features = unit_features(1, micro_model.config)
    with torch.no_grad():
        first = micro_model(encoder_outputs=features, input_ids=torch.tensor([[1, 4, 5]])).logits[0, -1]
        second = micro_model(encoder_outputs=features, input_ids=torch.tensor([[1, 5, 5]])).logits[0, -1]
    assert (first.log_softmax(-1) - second.log_softmax(-1)).abs().max() > 0.05


@pytest.mark.parametrize("min_new_tokens", [0, 2])
@pytest.mark.parametrize("image_seed", [7, 8, 9])
def test_exhaustive_beam_search_finds_the_most_likely_caption(micro_model, min_new_tokens, image_seed):
    config = micro_model.config
    max_new_tokens = 3
    features = unit_features(1, config, seed=image_seed)
    scored = [
        (teacher_forced_log_likelihood(micro_model, features, tokens), tokens)
        for tokens in all_hypotheses(config.vocab_size, config.eos_token_id, max_new_tokens, min_new_tokens)
    ]
    scored.sort(key=lambda item: item[0], reverse=True)
    top = 10
    assert scored[top - 1][0] - scored[top][0] > 1e-4, "ambiguous ranking: pick another seed"

    out = micro_model.generate(
        encoder_outputs=copy.deepcopy(features),
        num_beams=config.vocab_size ** (max_new_tokens - 1),
        num_return_sequences=top,
        length_penalty=0.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        return_dict_in_generate=True,
        output_scores=True,
    )
    # The best caption, and the next nine in order, with their exact log-likelihoods.
    returned = [generated_tokens(sequence, config.eos_token_id) for sequence in out.sequences]
    assert returned == [tokens for _, tokens in scored[:top]]
    expected_scores = torch.tensor([score for score, _ in scored[:top]])
    torch.testing.assert_close(out.sequences_scores, expected_scores, atol=1e-4, rtol=0)


def test_beam_scores_equal_teacher_forced_log_likelihoods(tiny_model):
    config = tiny_model.config
    features = unit_features(2, config, seed=3)
    out = tiny_model.generate(
        encoder_outputs=copy.deepcopy(features),
        num_beams=4,
        num_return_sequences=3,
        length_penalty=0.0,
        min_new_tokens=3,
        max_new_tokens=6,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape[0] == 6
    for row, sequence in enumerate(out.sequences):
        image = BaseModelOutput(last_hidden_state=features.last_hidden_state[row // 3 : row // 3 + 1])
        tokens = generated_tokens(sequence, config.eos_token_id)
        expected = teacher_forced_log_likelihood(tiny_model, image, tokens)
        assert out.sequences_scores[row].item() == pytest.approx(expected, abs=1e-4)
    # returned sequences of one image are distinct and sorted best first
    for image in range(2):
        scores = out.sequences_scores[image * 3 : image * 3 + 3]
        assert torch.all(scores[:-1] >= scores[1:])
        assert len({tuple(s.tolist()) for s in out.sequences[image * 3 : image * 3 + 3]}) == 3


def test_greedy_equals_stepwise_argmax(tiny_model):
    config = tiny_model.config
    features = unit_features(3, config, seed=5)
    generated = tiny_model.generate(encoder_outputs=copy.deepcopy(features), num_beams=1, max_new_tokens=8)
    for image in range(3):
        one = BaseModelOutput(last_hidden_state=features.last_hidden_state[image : image + 1])
        tokens = [config.decoder_start_token_id]
        for _ in range(8):
            with torch.no_grad():
                logits = tiny_model(
                    encoder_outputs=copy.deepcopy(one), input_ids=torch.tensor([tokens])
                ).logits
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] == config.eos_token_id:
                break
        assert generated[image, : len(tokens)].tolist() == tokens


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_gives_the_same_captions_as_each_image_alone(tiny_model, num_beams):
    features = unit_features(4, tiny_model.config, seed=11)
    kwargs = {"num_beams": num_beams, "max_new_tokens": 7, "min_new_tokens": 2}
    batched = tiny_model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    eos = tiny_model.config.eos_token_id
    for image in range(4):
        one = BaseModelOutput(last_hidden_state=features.last_hidden_state[image : image + 1])
        alone = tiny_model.generate(encoder_outputs=one, **kwargs)
        assert generated_tokens(batched[image], eos) == generated_tokens(alone[0], eos)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_attentions_equal_teacher_forced_attentions(tiny_model, num_beams):
    config = tiny_model.config
    features = unit_features(2, config, seed=13)
    out = tiny_model.generate(
        encoder_outputs=copy.deepcopy(features),
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=6,
        min_new_tokens=2,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    maps = out.attention_maps
    assert maps.shape == (2 * num_beams, out.sequences.shape[1] - 1, config.num_pixels)
    with torch.no_grad():
        forced = tiny_model(
            encoder_outputs=copy.deepcopy(features), input_ids=out.sequences[:, :-1], output_attentions=True
        ).attention_maps
    for row, sequence in enumerate(out.sequences):
        steps = len(generated_tokens(sequence, config.eos_token_id))
        torch.testing.assert_close(maps[row, :steps], forced[row, :steps], atol=1e-5, rtol=1e-4)
        assert torch.allclose(maps[row, :steps].sum(-1), torch.ones(steps), atol=1e-5)
        assert torch.all(maps[row, steps:] == 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), num_beams=st.sampled_from([1, 3, 5]), end_bias=st.floats(0.0, 4.0))
def test_attention_maps_of_single_pictures_whose_captions_end_early(tokenizer, seed, num_beams, end_bias):
    """
    One picture at a time, with captions that end at varied lengths: beam search often runs more steps than
    its best caption has words (the search goes on after the winner ended), which once indexed past
    `beam_indices`. Each word gets one map that sums to 1; nothing after `<end>`.
    """
    model = sharpened_tiny_model(len(tokenizer), end_bias=end_bias)
    features = unit_features(1, model.config, seed=seed)
    out = model.generate(
        encoder_outputs=features,
        num_beams=num_beams,
        max_new_tokens=10,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    words = len(generated_tokens(out.sequences[0], model.config.eos_token_id))
    maps = out.attention_maps[0]
    assert maps.shape == (out.sequences.shape[1] - 1, model.config.num_pixels)
    assert torch.allclose(maps[:words].sum(-1), torch.ones(words), atol=1e-5)
    assert torch.all(maps[words:] == 0)


def test_encoder_and_feature_projection_run_once_per_image(tiny_model):
    calls = {"encoder": [], "projection": []}
    tiny_model.encoder.register_forward_hook(
        lambda m, args, out: calls["encoder"].append(out.last_hidden_state.shape[0])
    )
    tiny_model.decoder.attention.encoder_projection.register_forward_hook(
        lambda m, args, out: calls["projection"].append(args[0].shape[0])
    )
    pixel_values = torch.randn(2, 3, 64, 64)
    tiny_model.generate(pixel_values=pixel_values, num_beams=4, num_return_sequences=2, max_new_tokens=5)
    assert calls["encoder"] == [2]
    assert calls["projection"] == [2]


def test_cache_reorders_in_place_and_never_copies_features(tiny_model):
    features = unit_features(2, tiny_model.config)
    with torch.no_grad():
        out = tiny_model(encoder_outputs=features, input_ids=torch.tensor([[1, 5], [1, 6], [1, 7], [1, 8]]))
    cache = out.cache if "cache" in out else out.past_key_values
    assert cache.get_seq_length() == 2
    hidden_before = cache.hidden.clone()
    returned = cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    assert returned is cache
    torch.testing.assert_close(cache.hidden, hidden_before[[1, 1, 3, 2]])
    assert cache.features.shape[0] == 2 and cache.features.data_ptr() == features.last_hidden_state.data_ptr()


def test_continuing_from_the_cache_equals_a_full_forward(tiny_model):
    features = unit_features(1, tiny_model.config)
    tokens = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        full = tiny_model(encoder_outputs=features, input_ids=tokens).logits
        first = tiny_model(encoder_outputs=features, input_ids=tokens[:, :2], use_cache=True)
        state = first.cache if "cache" in first else first.past_key_values
        rest = tiny_model(input_ids=tokens[:, 2:], cache=state).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full)


def test_sampling_is_reproducible_and_varies(tiny_model):
    features = unit_features(1, tiny_model.config)
    kwargs = {
        "do_sample": True,
        "num_beams": 1,
        "max_new_tokens": 6,
        "num_return_sequences": 8,
        "temperature": 2.0,
    }
    torch.manual_seed(0)
    first = tiny_model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    torch.manual_seed(0)
    again = tiny_model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    assert torch.equal(first, again)
    assert first.shape[0] == 8
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_generate_does_not_modify_the_callers_encoder_outputs(tiny_model):
    features = unit_features(2, tiny_model.config)
    before = features.last_hidden_state.clone()
    tiny_model.generate(encoder_outputs=features, num_beams=3, max_new_tokens=4)
    assert torch.equal(features.last_hidden_state, before)


def test_default_generation_config_is_beam_search_for_captions(tiny_model):
    assert tiny_model.generation_config.num_beams == 3
    assert tiny_model.generation_config.max_new_tokens == 51
    assert tiny_model.generation_config.decoder_start_token_id == tiny_model.config.bos_token_id
