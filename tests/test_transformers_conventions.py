"""The conventions of transformers that users of the library's own tooling rely on, one test each."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from conftest import sharpened_tiny_model, unit_features
from transformers import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

import show_attend_tell.modeling_show_attend_tell as modeling
from show_attend_tell import ShowAttendTellForConditionalGeneration
from show_attend_tell.modeling_show_attend_tell import CACHE_NAME, ShowAttendTellEncoder

pytestmark = pytest.mark.compat


@pytest.fixture
def model():
    return sharpened_tiny_model(30, std=0.5, seed=2)


def fresh(features: BaseModelOutput) -> BaseModelOutput:
    return copy.deepcopy(features)  # generate() expands what it is given in place


def test_generated_cross_attentions_are_one_tensor_per_layer_per_step(model):
    features = unit_features(2, model.config, seed=1)
    for num_beams in (1, 3):
        out = model.generate(
            encoder_outputs=fresh(features),
            num_beams=num_beams,
            max_new_tokens=4,
            min_new_tokens=4,
            output_attentions=True,
            return_dict_in_generate=True,
        )
        assert len(out.cross_attentions) == 4  # one entry per step
        for step in out.cross_attentions:
            assert isinstance(step, tuple) and len(step) == 1  # one decoder layer
            assert step[0].shape == (2 * num_beams, 1, model.config.num_pixels)
            torch.testing.assert_close(step[0].sum(-1), torch.ones(2 * num_beams, 1))
        assert out.attention_maps.shape == (2, 4, model.config.num_pixels)  # the convenience stays


def state_of(output) -> modeling.ShowAttendTellCache:
    return output[CACHE_NAME]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "plain-step"])
@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_a_returned_cache_continues_the_caption_like_one_longer_generate(model, mode, fast):
    model.decoder.fast_inference = fast
    features = unit_features(3, model.config, seed=4)
    # no <end>: every row runs the full length in both runs
    kwargs = {"suppress_tokens": [model.config.eos_token_id], "do_sample": mode == "sampling", "num_beams": 1}
    torch.manual_seed(7)
    longer = model.generate(encoder_outputs=fresh(features), max_new_tokens=8, **kwargs)
    torch.manual_seed(7)
    first = model.generate(
        encoder_outputs=fresh(features), max_new_tokens=3, return_dict_in_generate=True, **kwargs
    )
    assert state_of(first).get_seq_length() == first.sequences.shape[1] - 1
    continued = model.generate(
        encoder_outputs=fresh(features),
        decoder_input_ids=first.sequences,
        max_new_tokens=5,
        **{CACHE_NAME: state_of(first)},
        **kwargs,
    )
    assert torch.equal(continued, longer)


@pytest.mark.parametrize("num_beams", [3, 5])
def test_a_returned_cache_continues_the_caption_with_beam_search(model, num_beams):
    """A prefix decoded greedily, then continued by beam search: with the prefix's cache (its rows repeated for
    the beams) as without it (the prefix decoded again from the features)."""
    features = unit_features(2, model.config, seed=5)
    prefix = model.generate(
        encoder_outputs=fresh(features), num_beams=1, max_new_tokens=3, min_new_tokens=3,
        return_dict_in_generate=True,
    )  # fmt: skip
    kwargs = {"num_beams": num_beams, "max_new_tokens": 5, "length_penalty": 0.0, "min_new_tokens": 2}
    without_cache = model.generate(
        encoder_outputs=fresh(features), decoder_input_ids=prefix.sequences, **kwargs
    )
    with_cache = model.generate(
        encoder_outputs=fresh(features),
        decoder_input_ids=prefix.sequences,
        **{CACHE_NAME: state_of(prefix)},
        **kwargs,
    )
    assert torch.equal(with_cache, without_cache)


def test_a_beam_search_cache_does_not_continue_other_rows(model):
    features = unit_features(2, model.config, seed=5)
    out = model.generate(
        encoder_outputs=fresh(features), num_beams=3, max_new_tokens=3, return_dict_in_generate=True
    )
    with pytest.raises(ValueError, match="the cache holds 6 rows"):
        model.generate(
            encoder_outputs=fresh(features),
            decoder_input_ids=out.sequences,
            num_beams=1,
            max_new_tokens=2,
            **{CACHE_NAME: state_of(out)},
        )


def test_config_output_flags_are_the_defaults_of_forward_and_generate(model):
    features = unit_features(2, model.config, seed=6)
    input_ids = torch.tensor([[1, 5, 6]] * 2)
    with torch.no_grad():
        plain = model(encoder_outputs=features, input_ids=input_ids)
        assert plain.cross_attentions is None and plain.decoder_hidden_states is None
        model.config.output_attentions = model.config.output_hidden_states = True
        pixels = torch.randn(2, 3, 64, 64)
        flagged = model(pixel_values=pixels, input_ids=input_ids)
        assert flagged.cross_attentions[0].shape == (2, 3, model.config.num_pixels)
        assert flagged.decoder_hidden_states[0].shape == (2, 3, model.config.decoder_dim)
        assert len(flagged.encoder_hidden_states) == 5  # the ResNet's stem and four stages
        assert (
            model(encoder_outputs=features, input_ids=input_ids, output_attentions=False).cross_attentions
            is None
        )
        out = model.generate(
            pixel_values=pixels, num_beams=2, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True
        )
    assert len(out.cross_attentions) == 3 and out.attention_maps.shape == (2, 3, model.config.num_pixels)
    assert out.decoder_hidden_states is not None and out.encoder_hidden_states is not None


def test_gradient_checkpointing_wraps_the_attention_in_a_checkpointing_layer(model, tokenizer):
    assert isinstance(model.decoder.attention, GradientCheckpointingLayer)
    features = unit_features(2, model.config, seed=7)
    input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0], [1, 5, 5, 0], [1, 6, 0, 0]])
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100], [5, 5, 2, -100], [6, 2, -100, -100]])
    model.train()

    def loss_and_gradients():
        model.zero_grad()
        loss = model(encoder_outputs=features, input_ids=input_ids, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.decoder.parameters()]

    plain_loss, plain_gradients = loss_and_gradients()
    # transformers 5.x renamed the method (the old name still works, with a warning); 4.57 has the old one only
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls = []
    checkpoint = model.decoder.attention._gradient_checkpointing_func
    model.decoder.attention._gradient_checkpointing_func = lambda *a, **k: (
        calls.append(1) or checkpoint(*a, **k)
    )
    loss, gradients = loss_and_gradients()
    assert len(calls) == 4  # every step's attention went through the checkpoint
    torch.testing.assert_close(loss, plain_loss)
    for a, b in zip(plain_gradients, gradients, strict=True):
        torch.testing.assert_close(a, b)
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    assert not model.decoder.attention.gradient_checkpointing


def test_prepare_inputs_for_generation_passes_the_kwargs_it_does_not_use_to_forward(model, monkeypatch):
    seen = []
    forward = model.forward

    @functools.wraps(forward)  # the same signature, which generate() checks its keywords against
    def spying_forward(**kwargs):
        seen.append(kwargs)
        return forward(**kwargs)

    monkeypatch.setattr(model, "forward", spying_forward)
    features = unit_features(2, model.config, seed=8)
    mask = torch.ones(2, 1, dtype=torch.long)
    model.generate(
        encoder_outputs=fresh(features), num_beams=1, max_new_tokens=2, decoder_attention_mask=mask
    )
    assert seen and all(torch.equal(kwargs["decoder_attention_mask"][:, :1], mask) for kwargs in seen)
    inputs = model.prepare_inputs_for_generation(torch.tensor([[1]]), labels=torch.tensor([[5]]))
    assert torch.equal(inputs["labels"], torch.tensor([[5]]))
    assert "cache_position" not in model.prepare_inputs_for_generation(
        torch.tensor([[1]]), cache_position=torch.tensor([0])
    )  # generate()'s own bookkeeping, which forward does not take


def test_the_base_model_is_the_encoder_and_loads_into_the_head_and_back(model, tmp_path):
    assert isinstance(getattr(model, model.base_model_prefix), ShowAttendTellEncoder)
    assert model.base_model is model.encoder
    model.save_pretrained(tmp_path / "head")
    encoder = ShowAttendTellEncoder.from_pretrained(tmp_path / "head")  # the head's "encoder." keys
    for (name, a), (_, b) in zip(
        encoder.state_dict().items(), model.encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    encoder.save_pretrained(tmp_path / "encoder")
    head = ShowAttendTellForConditionalGeneration.from_pretrained(tmp_path / "encoder")
    for (name, a), (_, b) in zip(
        head.encoder.state_dict().items(), model.encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            head.encoder(pixels).last_hidden_state, model.encoder.eval()(pixels).last_hidden_state
        )


@pytest.mark.parametrize("name", sorted(modeling.OVERRIDDEN_PRIVATE_METHODS))
def test_the_private_generate_methods_overridden_here_still_exist(name):
    """A transformers release that renames or removes one of these would silently bypass the override."""
    base = getattr(GenerationMixin, name, None)
    assert base is not None, (
        f"transformers {__import__('transformers').__version__} has no GenerationMixin.{name}: the override "
        f"in modeling_show_attend_tell.py ({modeling.OVERRIDDEN_PRIVATE_METHODS[name]}) is no longer called"
    )
    # the parameters the override names must still be the base method's
    override = inspect.signature(getattr(modeling.ShowAttendTellForConditionalGeneration, name))
    expected = {
        parameter.name
        for parameter in override.parameters.values()
        if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    } - {"self"}  # a static method in transformers 4.57
    parameters = set(inspect.signature(base).parameters)
    assert expected <= parameters, f"GenerationMixin.{name} no longer takes {sorted(expected - parameters)}"
