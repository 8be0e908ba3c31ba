"""The model: configuration, encoder weights from torchvision, forward and loss, transformers conventions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import unit_features

from show_attend_tell import (
    ShowAttendTellConfig,
    ShowAttendTellForConditionalGeneration,
    convert_torchvision_resnet_state_dict,
)


def test_default_config_is_the_specification_model():
    config = ShowAttendTellConfig()
    assert list(config.encoder_config.depths) == [3, 4, 23, 3]  # ResNet-101
    assert config.encoder_dim == 2048
    assert config.encoded_image_size == 14 and config.num_pixels == 196
    assert (config.embed_dim, config.attention_dim, config.decoder_dim) == (512, 512, 512)
    assert config.dropout == 0.5 and config.alpha_c == 1.0
    assert config.tie_word_embeddings is False and config.is_encoder_decoder
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.decoder_start_token_id == config.bos_token_id


def test_config_round_trip(tmp_path):
    config = ShowAttendTellConfig.tiny(vocab_size=40, alpha_c=0.5)
    config.save_pretrained(tmp_path)
    loaded = ShowAttendTellConfig.from_pretrained(tmp_path)
    assert loaded.encoder_config.hidden_sizes == config.encoder_config.hidden_sizes
    assert (loaded.vocab_size, loaded.alpha_c, loaded.encoded_image_size) == (40, 0.5, 4)
    assert loaded.tie_word_embeddings is False


def test_pad_and_end_ids_must_differ():
    with pytest.raises(ValueError, match="must differ"):
        ShowAttendTellConfig.tiny(pad_token_id=2, eos_token_id=2)


def test_output_layer_is_not_tied_to_the_embedding():
    model = ShowAttendTellForConditionalGeneration(ShowAttendTellConfig.tiny(vocab_size=24, embed_dim=24))
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


# --- encoder --------------------------------------------------------------------------------------


def _randomised_torchvision_resnet101():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    network = torchvision.models.resnet101().eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, so BN mapping is tested
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.1, 0.3)
                module.bias.uniform_(-0.1, 0.1)
    return network


@pytest.mark.slow
def test_converted_torchvision_resnet101_gives_the_same_feature_map():
    reference = _randomised_torchvision_resnet101()
    model = ShowAttendTellForConditionalGeneration(ShowAttendTellConfig(vocab_size=10)).eval()
    model.encoder.resnet.load_state_dict(convert_torchvision_resnet_state_dict(reference.state_dict()))
    pixel_values = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(reference.children())[:-2])(pixel_values)
        grid, _ = model.encoder.encode_grid(pixel_values)
        features = model.encoder(pixel_values).last_hidden_state
    assert grid.shape == expected.shape == (2, 2048, 3, 3)
    torch.testing.assert_close(grid, expected, atol=1e-4, rtol=1e-4)
    # pooled to 14 x 14 and flattened: (images, 196, 2048)
    assert features.shape == (2, 196, 2048)
    torch.testing.assert_close(
        features, F.adaptive_avg_pool2d(expected, 14).flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4
    )


@pytest.mark.slow
def test_imagenet_weights_load_from_torchvisions_cache_location(tmp_path, monkeypatch):
    """The real download path, fed by a generated file where torchvision's loader looks for it."""
    torchvision = pytest.importorskip("torchvision")
    reference = _randomised_torchvision_resnet101()
    weights = torchvision.models.ResNet101_Weights.IMAGENET1K_V1
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    model = ShowAttendTellForConditionalGeneration(ShowAttendTellConfig(vocab_size=10)).eval()
    model.encoder.load_imagenet_weights(progress=False)
    # torchvision's own loader reads the same file: our URL table and its file naming agree
    torchvision_model = torchvision.models.resnet101(weights=weights).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(torchvision_model.children())[:-2])(pixel_values)
        grid, _ = model.encoder.encode_grid(pixel_values)
    torch.testing.assert_close(grid, expected, atol=1e-4, rtol=1e-4)


def _fail_on_download(monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("an encoder without ImageNet weights must be refused before any download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)


@pytest.mark.parametrize(
    "encoder",
    [
        None,  # the tests' tiny ResNet
        # ResNet-50 and -152: torchvision's weights for them were offered until issue 19 (old configs still load)
        {"depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck"},
        {"depths": [3, 8, 36, 3], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck"},
        # ResNet-101's depths at other widths: the checkpoint would not fit
        {
            "depths": [3, 4, 23, 3],
            "hidden_sizes": [8, 16, 16, 32],
            "embedding_size": 8,
            "layer_type": "bottleneck",
        },
    ],
    ids=["tiny", "resnet50", "resnet152", "resnet101-depths-narrow"],
)
def test_imagenet_weights_exist_for_resnet101_only(encoder, monkeypatch):
    _fail_on_download(monkeypatch)
    config = ShowAttendTellConfig.tiny() if encoder is None else ShowAttendTellConfig(encoder_config=encoder)
    with torch.device("meta"):  # the encoder's layers without their memory: only its configuration matters
        model = ShowAttendTellForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"^No torchvision ImageNet checkpoint .* ResNet-101 only") as error:
        model.encoder.load_imagenet_weights(progress=False)
    assert "\n" not in str(error.value)


def test_a_saved_resnet50_encoder_config_still_loads(tmp_path):
    resnet50 = {"depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck"}
    ShowAttendTellConfig(encoder_config=resnet50, vocab_size=10).save_pretrained(tmp_path)
    loaded = ShowAttendTellConfig.from_pretrained(tmp_path)
    assert list(loaded.encoder_config.depths) == [3, 4, 6, 3] and loaded.encoder_dim == 2048


def test_set_trainable_stages_freezes_all_but_the_last_stages(tiny_model):
    tiny_model.encoder.set_trainable_stages(3)
    stages = tiny_model.encoder.resnet.encoder.stages
    assert not any(p.requires_grad for p in tiny_model.encoder.resnet.embedder.parameters())
    assert not any(p.requires_grad for p in stages[0].parameters())
    assert all(p.requires_grad for stage in stages[1:] for p in stage.parameters())
    tiny_model.encoder.set_trainable_stages(0)
    assert not any(p.requires_grad for p in tiny_model.encoder.parameters())


# --- forward and loss -------------------------------------------------------------------------------


def _batch(tokenizer, captions=("a small red circle", "a blue square right of a star")):
    """Decoder inputs and next-word targets (-100 on padding) of `captions`, padded to the longest."""
    labels = tokenizer(list(captions), padding=True, return_tensors="pt")
    targets = labels["input_ids"][:, 1:].masked_fill(labels["attention_mask"][:, 1:] == 0, -100)
    return labels["input_ids"][:, :-1], targets


def _count_rows_per_step(model, monkeypatch) -> list[int]:
    """A list that receives, at every decoder step, how many rows the step computed."""
    rows_per_step, step = [], model.decoder.step

    def counting_step(embedded, *args):
        rows_per_step.append(embedded.shape[0])
        return step(embedded, *args)

    monkeypatch.setattr(model.decoder, "step", counting_step)
    return rows_per_step


def test_loss_is_cross_entropy_plus_doubly_stochastic_penalty(tiny_model, tokenizer):
    input_ids, labels = _batch(tokenizer)
    pixel_values = torch.randn(2, 3, 64, 64)
    out = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels, output_attentions=True)
    rows, steps = input_ids.shape
    assert out.logits.shape == (rows, steps, tiny_model.config.vocab_size)
    assert out.attention_maps.shape == (rows, steps, tiny_model.config.num_pixels)
    valid = labels != -100
    # with labels, the padding after a caption is not decoded: zeros there, the full computation elsewhere
    assert (
        not valid.all() and torch.all(out.logits[~valid] == 0) and torch.all(out.attention_maps[~valid] == 0)
    )
    torch.testing.assert_close(out.attention_maps[valid].sum(-1), torch.ones(int(valid.sum())))
    full = tiny_model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True)
    torch.testing.assert_close(out.logits[valid], full.logits[valid])
    torch.testing.assert_close(out.attention_maps[valid], full.attention_maps[valid])

    cross_entropy = F.cross_entropy(full.logits[valid], labels[valid])
    alpha_sums = (full.attention_maps * valid.unsqueeze(-1)).sum(1)
    penalty = ((1 - alpha_sums) ** 2).mean()
    torch.testing.assert_close(out.loss, cross_entropy + tiny_model.config.alpha_c * penalty)


def test_padding_targets_do_not_change_the_loss(tiny_model, tokenizer):
    input_ids, labels = _batch(tokenizer)
    pixel_values = torch.randn(2, 3, 64, 64)
    loss = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss
    as_pad = labels.masked_fill(labels == -100, tokenizer.pad_token_id)
    torch.testing.assert_close(
        tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=as_pad).loss, loss
    )
    # labels alone: decoder inputs are the labels shifted right behind <start>
    torch.testing.assert_close(tiny_model(pixel_values=pixel_values, labels=labels).loss, loss)


def test_several_captions_per_image_share_one_encoding(tiny_model, tokenizer):
    """Rows grouped by image (repeat_interleave order) equal the same images repeated."""
    input_ids, labels = _batch(tokenizer)
    features = unit_features(1, tiny_model.config)
    grouped = tiny_model(encoder_outputs=features, input_ids=input_ids, labels=labels)
    repeated = features.last_hidden_state.repeat_interleave(2, dim=0)
    plain = tiny_model(encoder_outputs=(repeated,), input_ids=input_ids, labels=labels)
    torch.testing.assert_close(grouped.logits, plain.logits)
    torch.testing.assert_close(grouped.loss, plain.loss)
    with pytest.raises(ValueError, match="grouped evenly"):
        tiny_model(encoder_outputs=unit_features(3, tiny_model.config), input_ids=input_ids[:2])


def test_return_dict_false_and_hidden_states(tiny_model, tokenizer):
    input_ids, labels = _batch(tokenizer)
    pixel_values = torch.randn(2, 3, 64, 64)
    as_tuple = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels, return_dict=False)
    as_dict = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    out = tiny_model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=True)
    assert out.decoder_hidden_states[0].shape == (2, input_ids.shape[1], tiny_model.config.decoder_dim)
    assert len(out.encoder_hidden_states) == 5  # stem + 4 stages
    assert out.encoder_last_hidden_state.shape == (2, 16, tiny_model.config.encoder_dim)


def test_backward_reaches_the_decoder_but_not_a_frozen_encoder(tiny_model, tokenizer):
    tiny_model.train()
    tiny_model.encoder.set_trainable_stages(0)
    input_ids, labels = _batch(tokenizer)
    tiny_model(pixel_values=torch.randn(2, 3, 64, 64), input_ids=input_ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in tiny_model.encoder.parameters())
    for name, parameter in tiny_model.decoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_padding_is_not_decoded_and_training_gradients_are_unchanged(tiny_model, tokenizer, monkeypatch):
    """With labels, each step decodes only the captions still running; loss and gradients are those of the
    full computation."""
    captions = [
        "a red circle",
        "a blue square right of a star",
        "a star",
        "a small green star above a circle",
    ]
    input_ids, targets = _batch(tokenizer, captions)
    features = unit_features(2, tiny_model.config, seed=5)  # two captions per image
    tiny_model.train()  # the tiny config has no dropout

    def loss_and_gradients(loss_fn):
        tiny_model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny_model.decoder.parameters()]

    def full_loss():  # without labels every position is decoded; the loss is then formed here
        out = tiny_model(encoder_outputs=features, input_ids=input_ids, output_attentions=True)
        valid = targets != -100
        alpha_sums = (out.attention_maps * valid.unsqueeze(-1)).sum(1)
        penalty = ((1 - alpha_sums) ** 2).mean()
        return F.cross_entropy(out.logits[valid], targets[valid]) + tiny_model.config.alpha_c * penalty

    rows_per_step = _count_rows_per_step(tiny_model, monkeypatch)
    by_length = loss_and_gradients(
        lambda: tiny_model(encoder_outputs=features, input_ids=input_ids, labels=targets).loss
    )
    lengths = (targets != -100).sum(1)
    assert rows_per_step == [int((lengths > t).sum()) for t in range(int(lengths.max()))]
    rows_per_step.clear()
    full = loss_and_gradients(full_loss)
    assert rows_per_step == [4] * input_ids.shape[1]
    torch.testing.assert_close(by_length[0], full[0])
    for a, b in zip(by_length[1], full[1], strict=True):
        torch.testing.assert_close(a, b)


def test_a_batch_with_little_padding_decodes_every_row_at_every_step(tiny_model, tokenizer, monkeypatch):
    """Under `PADDING_SHARE_WORTH_SKIPPING` of padding, skipping it would cost more than it saves: every row
    runs every step (no gathering of rows), and the loss is the same as when the padding is skipped."""
    from show_attend_tell import modeling_show_attend_tell as modeling
    from show_attend_tell.modeling_show_attend_tell import PADDING_SHARE_WORTH_SKIPPING

    captions = [
        "a red circle left of a blue star",
        "a blue square right of a star",
        "a small green star above a circle",
        "a red star left of a square",
    ]
    input_ids, targets = _batch(tokenizer, captions)
    lengths = (targets != -100).sum(1)
    padding = 1 - lengths.sum().item() / targets.numel()
    features = unit_features(2, tiny_model.config, seed=6)
    rows_per_step = _count_rows_per_step(tiny_model, monkeypatch)

    def loss() -> torch.Tensor:
        rows_per_step.clear()
        return tiny_model(encoder_outputs=features, input_ids=input_ids, labels=targets).loss

    few_padded = loss()
    assert 0 < padding < PADDING_SHARE_WORTH_SKIPPING
    assert rows_per_step == [4] * input_ids.shape[1]
    monkeypatch.setattr(modeling, "PADDING_SHARE_WORTH_SKIPPING", padding / 2)  # now worth skipping
    skipped = loss()
    assert rows_per_step == [int((lengths > t).sum()) for t in range(int(lengths.max()))]
    torch.testing.assert_close(few_padded, skipped)


def test_a_batch_without_targets_gives_a_nan_loss_not_an_error(tiny_model, tokenizer):
    input_ids, labels = _batch(tokenizer)
    out = tiny_model(
        encoder_outputs=unit_features(2, tiny_model.config),
        input_ids=input_ids,
        labels=torch.full_like(labels, -100),
    )
    assert out.loss.isnan() and out.logits.shape[:2] == input_ids.shape


def test_resize_token_embeddings(tiny_model):
    old = tiny_model.config.vocab_size
    tiny_model.resize_token_embeddings(old + 5)
    assert tiny_model.get_input_embeddings().weight.shape[0] == old + 5
    assert tiny_model.get_output_embeddings().weight.shape[0] == old + 5
    assert tiny_model.config.vocab_size == old + 5
    out = tiny_model(
        encoder_outputs=unit_features(1, tiny_model.config), input_ids=torch.tensor([[1, old + 4]])
    )
    assert out.logits.shape[-1] == old + 5


def test_init_weights_defines_every_parameter(tmp_path):
    """Loading a checkpoint that lacks the decoder gives the same, finite, initialisation each time."""
    config = ShowAttendTellConfig.tiny(vocab_size=20)
    torch.manual_seed(0)
    full = ShowAttendTellForConditionalGeneration(config)
    full.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("decoder.")}, tmp_path / "model.safetensors"
    )
    loaded = []
    for _ in range(2):
        torch.manual_seed(123)
        loaded.append(ShowAttendTellForConditionalGeneration.from_pretrained(tmp_path))
    for (name, a), (_, b) in zip(loaded[0].named_parameters(), loaded[1].named_parameters(), strict=True):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name
    # the encoder came from the file, the decoder from _init_weights (embedding within ±init_std)
    torch.testing.assert_close(
        loaded[0].encoder.resnet.embedder.embedder.convolution.weight,
        weights["encoder.resnet.embedder.embedder.convolution.weight"],
    )
    assert loaded[0].decoder.embedding.weight.abs().max() <= config.init_std


def test_base_model_prefix_names_a_real_submodule(tiny_model):
    assert getattr(tiny_model, tiny_model.base_model_prefix) is tiny_model.encoder
    assert tiny_model.get_encoder().main_input_name == "pixel_values"
    assert tiny_model.main_input_name == "pixel_values"
    assert tiny_model.config.use_cache is True
