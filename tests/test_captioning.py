"""show_attend_tell.captioning: captioning a collection from Python, batch results equal to each picture alone."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, sharpened_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from show_attend_tell import ShowAttendTellImageProcessor, ShowAttendTellProcessor, ShowAttendTellTokenizer
from show_attend_tell.captioning import CaptionedImage, caption_batch, caption_batches, caption_images
from show_attend_tell.pipeline_show_attend_tell import words_and_attention

MAX_NEW_TOKENS = 8


def build() -> tuple[torch.nn.Module, ShowAttendTellProcessor]:
    """A tiny model whose captions end after varied numbers of words, and its processor."""
    tokenizer = ShowAttendTellTokenizer.train_from_captions(CAPTIONS, min_freq=5)
    model = sharpened_tiny_model(len(tokenizer), end_bias=1.5)
    return model, ShowAttendTellProcessor(ShowAttendTellImageProcessor(size=64), tokenizer)


MODEL, PROCESSOR = build()  # read-only in every test: built once, so hypothesis examples stay fast


def picture(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    generator = np.random.default_rng(seed)
    image = Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode)


def alone(image: Image.Image, **generate_kwargs) -> dict:
    """generate() on this one picture, without the module: the reference every batched result must equal."""
    pixel_values = PROCESSOR.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        outputs = MODEL.generate(
            pixel_values=pixel_values, output_attentions=True, return_dict_in_generate=True, **generate_kwargs
        )
    tokenizer = PROCESSOR.tokenizer
    rows = len(outputs.sequences)
    words, maps = words_and_attention(outputs.sequences[0], outputs.attention_maps[0], tokenizer)
    return {
        "captions": tokenizer.batch_decode(outputs.sequences, skip_special_tokens=True),
        "words": words,
        "attention": maps,
        "rows": rows,
    }


def assert_same_as_alone(result: CaptionedImage, image: Image.Image, **generate_kwargs) -> None:
    expected = alone(image, **generate_kwargs)
    assert result.error is None
    assert result.caption == expected["captions"][0]
    assert result.captions == expected["captions"]
    assert result.words == expected["words"]
    assert result.token_ids == PROCESSOR.tokenizer.convert_tokens_to_ids(expected["words"])
    if result.attention is not None:
        np.testing.assert_allclose(result.attention, expected["attention"], atol=1e-5)


def test_the_pictures_give_varied_captions():
    """The precondition that makes `batch == alone` meaningful: the pictures' captions differ."""
    captions = {
        alone(picture(seed), num_beams=3, max_new_tokens=MAX_NEW_TOKENS)["captions"][0] for seed in range(12)
    }
    lengths = {len(caption.split()) for caption in captions}
    assert len(captions) >= 4 and len(lengths) >= 2, captions


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_a_collection_in_batches_equals_each_picture_alone_with_attention(num_beams):
    images = [picture(seed, size=(30 + 7 * seed, 60 - 3 * seed)) for seed in range(11)]
    results = list(
        caption_images(
            MODEL,
            PROCESSOR,
            images,
            batch_size=4,
            output_attentions=True,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    )
    assert [result.index for result in results] == list(range(len(images)))
    assert [result.key for result in results] == [str(index) for index in range(len(images))]
    for result, image in zip(results, images, strict=True):
        assert_same_as_alone(result, image, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
        # one map per word, each a distribution over the encoder's grid
        assert result.attention.dtype == np.float32
        assert result.attention.shape == (len(result.words), MODEL.config.num_pixels)
        np.testing.assert_allclose(result.attention.sum(axis=1), 1.0, atol=1e-5)
        assert (result.attention >= 0).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=7),
    sizes=st.lists(st.tuples(st.integers(8, 90), st.integers(8, 90)), min_size=7, max_size=7),
    modes=st.lists(st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK"]), min_size=7, max_size=7),
    num_beams=st.sampled_from([1, 3, 5]),
    batch_size=st.integers(1, 5),
)
def test_any_pictures_in_any_batches_get_their_alone_captions(seeds, sizes, modes, num_beams, batch_size):
    images = [picture(seed, size, mode) for seed, size, mode in zip(seeds, sizes, modes, strict=False)]
    results = list(
        caption_images(
            MODEL,
            PROCESSOR,
            images,
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    )
    assert len(results) == len(images)
    for result, image in zip(results, images, strict=True):
        assert result.attention is None and result.pixel_values is None
        assert_same_as_alone(result, image, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)


def test_files_bytes_and_a_broken_file_in_order_with_keys(tmp_path):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"picture {seed}.png")
        picture(seed).save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    as_bytes = io.BytesIO()
    picture(7).save(as_bytes, format="JPEG")
    items = [
        str(paths[0]),
        broken,
        as_bytes.getvalue(),
        paths[1],
        str(tmp_path / "missing.png"),
        str(paths[2]),
    ]
    results = list(caption_images(MODEL, PROCESSOR, items, batch_size=2, max_new_tokens=MAX_NEW_TOKENS))

    assert [result.key for result in results] == [
        str(paths[0]),
        str(broken),
        "2",
        str(paths[1]),
        str(tmp_path / "missing.png"),
        str(paths[2]),
    ]
    assert results[1].caption is None and results[1].error.startswith("not an image file Pillow can read")
    assert results[4].caption is None and results[4].error == "no such file"
    for result in results[1], results[4]:
        assert "\n" not in result.error and str(tmp_path) not in result.error  # the key is reported beside it
    for index, source in ((0, paths[0]), (3, paths[1]), (5, paths[2])):
        with Image.open(source) as image:
            assert_same_as_alone(results[index], image.convert("RGB"), max_new_tokens=MAX_NEW_TOKENS)
    assert_same_as_alone(
        results[2], Image.open(io.BytesIO(as_bytes.getvalue())), max_new_tokens=MAX_NEW_TOKENS
    )


def test_keys_positions_and_batches():
    images = [picture(seed) for seed in range(7)]
    keys = [f"photo-{index}" for index in range(7)]
    batches = list(
        caption_batches(
            MODEL,
            PROCESSOR,
            images,
            keys=keys,
            positions=[5, 1, 3],
            batch_size=2,
            max_new_tokens=MAX_NEW_TOKENS,
        )
    )
    assert [[result.key for result in batch] for batch in batches] == [["photo-1", "photo-5"], ["photo-3"]]
    everything = {
        result.key: result
        for result in caption_images(MODEL, PROCESSOR, images, keys=keys, max_new_tokens=MAX_NEW_TOKENS)
    }
    for batch in batches:
        for result in batch:
            assert result.caption == everything[result.key].caption
    with pytest.raises(ValueError, match="2 keys given for 7 pictures"):
        list(caption_images(MODEL, PROCESSOR, images, keys=keys[:2]))


def test_a_generator_of_pictures_is_captioned_in_order_and_workers_need_a_list():
    images = [picture(seed) for seed in range(5)]
    streamed = list(
        caption_images(
            MODEL, PROCESSOR, (image for image in images), batch_size=2, max_new_tokens=MAX_NEW_TOKENS
        )
    )
    listed = list(caption_images(MODEL, PROCESSOR, images, batch_size=3, max_new_tokens=MAX_NEW_TOKENS))
    assert [(r.index, r.key, r.caption) for r in streamed] == [(r.index, r.key, r.caption) for r in listed]
    with pytest.raises(ValueError, match="need a collection with a length"):
        list(caption_images(MODEL, PROCESSOR, iter(images), num_workers=1))


def test_a_dataset_split_is_keyed_by_image_id_and_read_in_workers(tmp_path):
    import datasets

    from show_attend_tell.data import CAPTION_FEATURES

    images = [picture(seed) for seed in range(3)]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    rows = datasets.Dataset.from_dict(
        {
            "image": [*encoded, {"bytes": b"junk", "path": None}],
            "captions": [["a picture"]] * 4,
            "image_id": ["a", "b", "c", "broken"],
        },
        features=CAPTION_FEATURES,
    )
    results = list(
        caption_images(MODEL, PROCESSOR, rows, batch_size=3, num_workers=1, max_new_tokens=MAX_NEW_TOKENS)
    )
    assert [result.key for result in results] == ["a", "b", "c", "broken"]
    assert results[3].error.startswith("not an image file Pillow can read")
    for result, image in zip(results[:3], images, strict=True):
        assert_same_as_alone(result, image, max_new_tokens=MAX_NEW_TOKENS)


@pytest.mark.parametrize("num_beams", [3, 5])
def test_the_n_best_captions_of_each_picture(num_beams):
    images = [picture(seed) for seed in range(4)]
    options = {"num_beams": num_beams, "num_return_sequences": 3, "max_new_tokens": MAX_NEW_TOKENS}
    results = list(caption_images(MODEL, PROCESSOR, images, batch_size=3, output_attentions=True, **options))
    for result, image in zip(results, images, strict=True):
        assert len(result.captions) == 3 and result.captions[0] == result.caption
        assert_same_as_alone(result, image, **options)


def test_caption_batch_shares_encoder_outputs_between_beam_sizes():
    images = [picture(seed) for seed in range(3)]
    pixel_values = PROCESSOR.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        encoded = MODEL.get_encoder()(pixel_values, return_dict=True)
    kept = encoded.last_hidden_state.clone()
    for num_beams in (1, 3, 5):
        from_features = caption_batch(
            MODEL,
            PROCESSOR.tokenizer,
            encoder_outputs=encoded,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        from_pixels = caption_batch(
            MODEL, PROCESSOR.tokenizer, pixel_values, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS
        )
        assert [r.caption for r in from_features] == [r.caption for r in from_pixels]
        for result, image in zip(from_features, images, strict=True):
            assert_same_as_alone(result, image, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
    assert torch.equal(encoded.last_hidden_state, kept)  # not expanded for the beams in place
    with pytest.raises(ValueError, match="one of them"):
        caption_batch(MODEL, PROCESSOR.tokenizer)


def test_the_caller_keeps_its_grad_mode_and_the_model_its_training_mode():
    model, _ = build()
    model.train()
    results = caption_images(
        model, PROCESSOR, [picture(seed) for seed in range(4)], batch_size=2, max_new_tokens=3
    )
    first = next(results)
    # between two results the caller's code runs in its own mode, not in the captioning's inference mode
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert first.caption is not None and not model.training
    rest = list(results)
    assert len(rest) == 3 and model.training


def test_a_progress_bar_on_long_work_only(capsys):
    from transformers.utils import logging as transformers_logging

    images = [picture(seed) for seed in range(5)]
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    try:
        list(caption_images(MODEL, PROCESSOR, images, batch_size=2, max_new_tokens=2))
        err = capsys.readouterr().err
        assert "captioning" in err and "5/5" in err
        list(caption_images(MODEL, PROCESSOR, images[:2], batch_size=2, max_new_tokens=2))  # one batch: quick
        assert "captioning" not in capsys.readouterr().err
        list(caption_images(MODEL, PROCESSOR, images, batch_size=2, max_new_tokens=2, progress=False))
        assert "captioning" not in capsys.readouterr().err
        transformers_logging.disable_progress_bar()  # as a user silences the library's bars
        list(caption_images(MODEL, PROCESSOR, images, batch_size=2, max_new_tokens=2))
        assert "captioning" not in capsys.readouterr().err
    finally:
        (
            transformers_logging.enable_progress_bar
            if was_enabled
            else transformers_logging.disable_progress_bar
        )()


def test_keep_pixel_values_gives_the_model_input(tmp_path):
    path = Path(tmp_path / "a.png")
    picture(3, size=(70, 20)).save(path)
    (result,) = caption_images(MODEL, PROCESSOR, [path], keep_pixel_values=True, max_new_tokens=3)
    assert result.key == str(path)
    expected = PROCESSOR.image_processor(Image.open(path), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(result.pixel_values, expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_validations_generate_captions_gives_each_picture_its_alone_caption_and_maps(num_beams):
    from show_attend_tell.training import generate_captions

    images = [picture(seed, size=(20 + 9 * seed, 50)) for seed in range(6)]
    generated = generate_captions(
        MODEL,
        PROCESSOR,
        images,
        batch_size=4,
        num_beams=num_beams,
        max_new_tokens=MAX_NEW_TOKENS,
        output_attentions=True,
    )
    for caption, token_ids, attention, image in zip(
        generated.captions, generated.token_ids, generated.attention, images, strict=True
    ):
        expected = alone(image, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
        assert caption == expected["captions"][0]
        assert PROCESSOR.tokenizer.convert_ids_to_tokens(token_ids) == expected["words"]
        torch.testing.assert_close(attention, torch.from_numpy(expected["attention"]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"^picture 1: not an image file Pillow can read"):
        generate_captions(MODEL, PROCESSOR, [images[0], b"not a picture"], max_new_tokens=2)
