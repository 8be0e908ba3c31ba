"""Word-map tokenizer, image processor and processor."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAPTIONS
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, pipeline
from transformers.image_utils import PILImageResampling

from show_attend_tell import (
    ShowAttendTellImageProcessor,
    ShowAttendTellProcessor,
    ShowAttendTellTokenizer,
    image_processing_show_attend_tell,
)
from show_attend_tell.image_processing_show_attend_tell import IMAGENET_MEAN, IMAGENET_STD
from show_attend_tell.saving import save_model_folder

pytestmark = pytest.mark.compat

# --- tokenizer ----------------------------------------------------------------------------------


def test_special_tokens_have_the_classic_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_min_freq_counts_only_the_given_captions():
    train = ["a dog runs"] * 5 + ["a cat sleeps"] * 4
    tokenizer = ShowAttendTellTokenizer.train_from_captions(train, min_freq=5)
    vocab = tokenizer.get_vocab()
    assert {"a", "dog", "runs"} <= vocab.keys()
    assert "cat" not in vocab and "sleeps" not in vocab  # seen 4 times: below min_freq
    assert tokenizer.decode(tokenizer("a cat runs")["input_ids"], skip_special_tokens=True) == "a <unk> runs"
    # most frequent word first
    assert vocab["a"] == 4


def test_lower_case_and_punctuation_removed(tokenizer):
    ids = tokenizer("A SMALL, red circle... (left) of a BLUE square!")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a small red circle left of a blue square"
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.normalize_caption("It's a Dog-shaped, RED kite.") == [
        "it",
        "s",
        "a",
        "dog",
        "shaped",
        "red",
        "kite",
    ]


def test_decode_stops_at_the_first_end_and_skips_padding(tokenizer):
    red, circle = tokenizer.convert_tokens_to_ids(["red", "circle"])
    assert tokenizer.decode([1, red, circle, 2, 0, 0], skip_special_tokens=True) == "red circle"
    # beam search pads finished rows with <end>; sampling with <pad>
    assert tokenizer.batch_decode([[1, red, 2, 2, 2], [1, circle, 2, 0, 0]], skip_special_tokens=True) == [
        "red",
        "circle",
    ]
    assert tokenizer.decode([1, red, 2], skip_special_tokens=False) == "<start> red <end>"


def test_padding_and_truncation(tokenizer):
    batch = tokenizer(["a red circle", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][1].tolist() == [1, tokenizer.convert_tokens_to_ids("a"), 2, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    long = tokenizer(" ".join(["red"] * 80), truncation=True)["input_ids"]
    assert len(long) == tokenizer.model_max_length == 52  # 50 words, <start>, <end>


def test_word_map_round_trip(tmp_path, tokenizer):
    path = tmp_path / "WORDMAP.json"
    tokenizer.save_word_map(path)
    word_map = json.loads(path.read_text())
    assert word_map == tokenizer.get_vocab()
    again = ShowAttendTellTokenizer.from_word_map(path)
    assert again("a blue star")["input_ids"] == tokenizer("a blue star")["input_ids"]


def test_classic_word_map_keeps_its_ids():
    """The paper implementation's layout: words from 1, then <unk>, <start>, <end>, and <pad> = 0."""
    classic = {"a": 1, "dog": 2, "<unk>": 3, "<start>": 4, "<end>": 5, "<pad>": 0}
    tokenizer = ShowAttendTellTokenizer.from_word_map(classic)
    assert tokenizer("a dog")["input_ids"] == [4, 1, 2, 5]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 4, 5)
    assert tokenizer.decode([4, 1, 2, 5, 0], skip_special_tokens=True) == "a dog"
    assert tokenizer.to_word_map() == dict(sorted(classic.items(), key=lambda item: item[1]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a valid word-map JSON"),
        ('["a", "b"]', "JSON object"),
        ('{"a": "one", "<pad>": 0}', "JSON object"),
        ('{"a": 1, "<pad>": 0}', "lacks the special tokens"),
        ('{"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 2}', "same id"),
        ('{"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 7}', "without gaps"),
    ],
)
def test_malformed_word_maps_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ShowAttendTellTokenizer.from_word_map(path)


def test_tokenizer_saves_as_tokenizer_json_and_loads_with_auto_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ShowAttendTellTokenizer"  # 4.x loads the saved code file
    for caption in CAPTIONS[:4]:
        assert loaded(caption)["input_ids"] == tokenizer(caption)["input_ids"]
    assert loaded.decode([1, 5, 2, 0], skip_special_tokens=True) == tokenizer.decode(
        [1, 5, 2, 0], skip_special_tokens=True
    )


# --- image processor ----------------------------------------------------------------------------


def test_image_processor_resizes_and_normalises(sample_image):
    processor = ShowAttendTellImageProcessor()
    pixel_values = processor(sample_image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 256, 256) and pixel_values.dtype == torch.float32
    resized = np.asarray(
        sample_image.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR), np.float32
    )
    expected = ((resized / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(pixel_values[0].numpy(), expected, atol=1e-5)


def test_image_processor_accepts_arrays_tensors_and_lists(sample_image):
    processor = ShowAttendTellImageProcessor(size=32)
    array = np.array(sample_image)  # a writable copy: torch.from_numpy warns on read-only arrays
    from_pil = processor(sample_image)["pixel_values"]
    torch.testing.assert_close(processor(array)["pixel_values"], from_pil)
    torch.testing.assert_close(processor(torch.from_numpy(array).permute(2, 0, 1))["pixel_values"], from_pil)
    torch.testing.assert_close(
        processor(array.astype(np.float32) / 255.0)["pixel_values"], from_pil, atol=1e-5, rtol=0
    )
    assert processor([sample_image, array, sample_image.convert("L")])["pixel_values"].shape == (3, 3, 32, 32)
    assert processor(sample_image, return_tensors="np")["pixel_values"].dtype == np.float32


def test_image_processor_sees_exif_rotated_photos_upright():
    upright = Image.new("RGB", (40, 20), "white")
    upright.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left half
    stored = upright.rotate(90, expand=True)  # how a phone stores a rotated shot
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes())
    photo = Image.open(io.BytesIO(buffer.getvalue()))
    processor = ShowAttendTellImageProcessor(size=16)
    pixels = processor(photo)["pixel_values"][0]
    reference = processor(upright)["pixel_values"][0]
    assert (pixels - reference).abs().mean() < 0.1


def test_image_processor_composites_transparency_on_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = ShowAttendTellImageProcessor(size=8)(transparent)["pixel_values"][0]
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[:, 0, 0], white.float())


def test_image_processor_rejects_unknown_arguments_and_shapes(sample_image):
    processor = ShowAttendTellImageProcessor()
    with pytest.raises(TypeError, match="unexpected arguments: do_crop"):
        processor(sample_image, do_crop=True)
    with pytest.raises(ValueError, match="cannot read an image of shape"):
        processor(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="no images"):
        processor([])


def test_image_processor_round_trip_with_auto_image_processor(tmp_path):
    ShowAttendTellImageProcessor(size={"height": 96, "width": 128}, resample="bicubic").save_pretrained(
        tmp_path
    )
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 96, "width": 128} and saved["resample"] == PILImageResampling.BICUBIC
    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ShowAttendTellImageProcessor"
    assert loaded.size == {"height": 96, "width": 128} and loaded.resample == PILImageResampling.BICUBIC


def reference_pixels(
    image: Image.Image,
    height: int,
    width: int,
    resample=Image.Resampling.BILINEAR,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> np.ndarray:
    """What the processor must return for one RGB picture, computed with Pillow and numpy alone: (3, h, w)."""
    resized = np.asarray(image.convert("RGB").resize((width, height), resample), np.float64) / 255.0
    return ((resized - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def test_a_folder_saved_in_the_0_1_format_loads_with_the_same_pixel_values(tmp_path, sample_image):
    # preprocessor_config.json exactly as version 0.1 wrote it: size one int, resample a filter's name
    legacy = {
        "auto_map": {"AutoImageProcessor": "image_processing_show_attend_tell.ShowAttendTellImageProcessor"},
        "image_mean": list(IMAGENET_MEAN),
        "image_processor_type": "ShowAttendTellImageProcessor",
        "image_std": list(IMAGENET_STD),
        "resample": "bicubic",
        "size": 40,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy, indent=2))
    code = Path(image_processing_show_attend_tell.__file__)
    (tmp_path / code.name).write_bytes(
        code.read_bytes()
    )  # a saved folder carries the code file (4.57 runs it)
    expected = reference_pixels(sample_image, 40, 40, Image.Resampling.BICUBIC)
    for loaded in (
        ShowAttendTellImageProcessor.from_pretrained(tmp_path),
        AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert loaded.size == {"height": 40, "width": 40}
        pixel_values = loaded(sample_image)["pixel_values"]
        assert pixel_values.shape == (1, 3, 40, 40)
        np.testing.assert_allclose(pixel_values[0].numpy(), expected, atol=1e-5)
    # re-saved, it is written in transformers' format and still gives the same pixels
    ShowAttendTellImageProcessor.from_pretrained(tmp_path).save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "preprocessor_config.json").read_text())
    assert resaved["size"] == {"height": 40, "width": 40} and resaved["resample"] == 3
    again = ShowAttendTellImageProcessor.from_pretrained(tmp_path / "resaved")(sample_image)["pixel_values"]
    np.testing.assert_allclose(again[0].numpy(), expected, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    resample=st.sampled_from(["nearest", "bilinear", "bicubic", "lanczos"]),
    do_rescale=st.booleans(),
    do_normalize=st.booleans(),
    at_init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_standard_arguments_at_init_and_per_call_match_pillow_and_numpy(
    height, width, resample, do_rescale, do_normalize, at_init, seed
):
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(
        rng.integers(0, 256, (rng.integers(1, 40), rng.integers(1, 40), 3), dtype=np.uint8)
    )
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)
    options = {
        "size": {"height": height, "width": width},
        "resample": resample,
        "do_rescale": do_rescale,
        "rescale_factor": 1 / 255 if do_rescale else 1.0,
        "do_normalize": do_normalize,
        "image_mean": mean,
        "image_std": std,
    }
    if at_init:
        pixel_values = ShowAttendTellImageProcessor(**options)(picture)["pixel_values"]
    else:  # the processor's own settings differ everywhere; the call's win
        pixel_values = ShowAttendTellImageProcessor(size=7, resample="box", do_rescale=not do_rescale)(
            picture, **options
        )["pixel_values"]
    filter_ = Image.Resampling[resample.upper()]
    resized = np.asarray(picture.resize((width, height), filter_), np.float64)
    expected = resized / 255.0 if do_rescale else resized
    if do_normalize:
        expected = (expected - np.asarray(mean)) / np.asarray(std)
    assert pixel_values.shape == (1, 3, height, width)
    np.testing.assert_allclose(pixel_values[0].numpy(), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-4)


def test_do_resize_false_keeps_each_size_and_layouts_follow_data_format(sample_image):
    processor = ShowAttendTellImageProcessor(size=16)
    kept = processor(sample_image, do_resize=False)["pixel_values"]
    assert kept.shape == (1, 3, 48, 64)
    np.testing.assert_allclose(kept[0].numpy(), reference_pixels(sample_image, 48, 64), atol=1e-5)
    small = sample_image.resize((20, 10))
    mixed = processor([sample_image, small], do_resize=False, return_tensors=None)["pixel_values"]
    assert [array.shape for array in mixed] == [(3, 48, 64), (3, 10, 20)]
    with pytest.raises(ValueError, match="different shapes"):
        processor([sample_image, small], do_resize=False)
    last = processor(sample_image, data_format="channels_last", return_tensors="np")["pixel_values"]
    assert last.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(last[0].transpose(2, 0, 1), processor(sample_image)["pixel_values"][0].numpy())
    # an array whose layout cannot be guessed (3 x 4 x 3) is read as the caller says
    array = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    as_first = processor(array, input_data_format="channels_first", do_resize=False)["pixel_values"]
    as_last = processor(array, input_data_format="channels_last", do_resize=False)["pixel_values"]
    assert as_first.shape == (1, 3, 4, 3) and as_last.shape == (1, 3, 3, 4)


def test_do_convert_rgb_false_uses_rgb_pixels_as_given_and_refuses_others(sample_image):
    processor = ShowAttendTellImageProcessor(size=16, do_convert_rgb=False)
    torch.testing.assert_close(
        processor(sample_image)["pixel_values"],
        ShowAttendTellImageProcessor(size=16)(sample_image)["pixel_values"],
    )
    with pytest.raises(ValueError, match="image 0: has mode L; do_convert_rgb=False needs RGB images"):
        processor(sample_image.convert("L"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"size": {"shortest_edge": 32}}, "size must be"),
        ({"size": 0}, "size must be"),
        ({"resample": "sharpest"}, "resample must be a PIL resampling filter"),
        ({"image_mean": (0.5, 0.5)}, "one per RGB channel"),
        ({"image_std": 0.0}, "image_std must be positive"),
    ],
)
def test_bad_settings_give_one_line_errors_at_init_and_per_call(sample_image, options, message):
    with pytest.raises(ValueError, match=message):
        ShowAttendTellImageProcessor(**options)
    with pytest.raises(ValueError, match=message):
        ShowAttendTellImageProcessor()(sample_image, **options)


# --- no noise on load ---------------------------------------------------------------------------------

BACKEND_NOISE = ("backend is not available", "Falling back to")


@pytest.mark.parametrize(
    "loader", ["AutoImageProcessor", "AutoProcessor", "ShowAttendTellProcessor", "pipeline"]
)
def test_loading_the_processor_warns_of_no_missing_backend(
    loader, tmp_path, tiny_model, processor, sample_image, caplog, capfd
):
    folder = save_model_folder(tmp_path / "model", tiny_model, processor)
    capfd.readouterr()
    # transformers says it once per process: forget earlier tests' warnings, or this test could not see one
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="transformers"):
        if loader == "AutoImageProcessor":
            loaded = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
            assert loaded(sample_image)["pixel_values"].shape == (1, 3, 64, 64)
        elif loader == "AutoProcessor":
            assert AutoProcessor.from_pretrained(folder, trust_remote_code=True)(images=sample_image)
        elif loader == "ShowAttendTellProcessor":
            assert ShowAttendTellProcessor.from_pretrained(folder)(images=sample_image)
        else:
            captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
            assert isinstance(captioner(sample_image, max_new_tokens=3)[0]["generated_text"], str)
    printed = capfd.readouterr().err + "\n".join(record.getMessage() for record in caplog.records)
    assert not any(noise in printed for noise in BACKEND_NOISE), printed


# --- processor ------------------------------------------------------------------------------------


def test_processor_combines_images_and_text(tmp_path, processor, sample_image):
    batch = processor(
        images=[sample_image, sample_image], text=["a red circle", "a blue star left of a square"]
    )
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert processor.batch_decode(batch["input_ids"]) == ["a red circle", "a blue star left of a square"]
    processor.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ShowAttendTellProcessor"
    torch.testing.assert_close(loaded(images=sample_image)["pixel_values"], batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="pass images, text, or both"):
        processor()


def test_processor_passes_the_image_processors_options_on(processor, sample_image):
    batch = processor(images=sample_image, text="a red circle", do_resize=False, do_normalize=False)
    assert batch["pixel_values"].shape == (1, 3, 48, 64)  # the picture's own size
    np.testing.assert_allclose(
        batch["pixel_values"][0].numpy(), np.asarray(sample_image).transpose(2, 0, 1) / 255.0, atol=1e-6
    )
    assert processor.batch_decode(batch["input_ids"]) == ["a red circle"]
    resized = processor(images=sample_image, size={"height": 20, "width": 30})["pixel_values"]
    assert resized.shape == (1, 3, 20, 30)
