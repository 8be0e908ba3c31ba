"""Bad and unusual image files (issue 7): processor, pipeline and scripts/caption.py.

Every generated file either works sensibly or fails with a one-line error naming the file and the reason;
the caption tool goes on with the other files and exits non-zero at the end.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import pipeline

from show_attend_tell import ShowAttendTellImageProcessor
from show_attend_tell.image_processing_show_attend_tell import (
    IMAGE_SUFFIXES,
    ImageLoadError,
    describe_image_error,
    image_files,
    load_image,
)
from show_attend_tell.saving import save_model_folder

# file name -> None when it must work, or a fragment of the one-line reason when it must be refused
EXPECTED: dict[str, str | None] = {
    "zero_bytes.jpg": "empty file (0 bytes)",
    "random_bytes.jpg": "not an image file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text_file.txt": "not an image file",
    "grayscale.png": None,
    "rgba_transparent.png": None,
    "la_transparent.png": None,
    "palette.png": None,
    "palette_transparent.gif": None,
    "cmyk.jpg": None,
    "gray_16bit.png": None,
    "one_pixel.png": None,
    "wide_10000x10.png": None,
    "exif_rotated.jpg": None,
    "animated.gif": None,
    "bomb_over_2x_limit.png": "decompression-bomb limit",
    "bomb_over_limit.png": "decompression-bomb limit",
}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` RGB pixels but holds no data: what a decompression bomb's
    header looks like, without writing gigabytes to build one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _upright_scene() -> Image.Image:
    """Red left half, blue right half: turning it sideways is easy to detect."""
    image = Image.new("RGB", (60, 30), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 30))
    return image


def make_bad_images(folder: Path) -> dict[str, Path]:
    """Writes every case of issue 7 into `folder`; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    photo = Image.fromarray(generator.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    files: dict[str, bytes] = {}

    def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    files["zero_bytes.jpg"] = b""
    files["random_bytes.jpg"] = generator.bytes(4000)
    jpeg, png = encoded(photo, "JPEG"), encoded(photo, "PNG")
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["truncated.png"] = png[: len(png) // 2]
    files["text_file.txt"] = b"a dog runs on the grass\n"
    files["grayscale.png"] = encoded(photo.convert("L"), "PNG")
    files["rgba_transparent.png"] = encoded(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG")
    files["la_transparent.png"] = encoded(Image.new("LA", (40, 30), (0, 0)), "PNG")
    files["palette.png"] = encoded(photo.convert("P"), "PNG")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    files["palette_transparent.gif"] = encoded(palette, "GIF", transparency=0)
    files["cmyk.jpg"] = encoded(photo.convert("CMYK"), "JPEG", quality=95)
    deep = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    files["gray_16bit.png"] = encoded(Image.fromarray(deep), "PNG")
    files["one_pixel.png"] = encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    files["wide_10000x10.png"] = encoded(Image.new("RGB", (10000, 10), (200, 30, 30)), "PNG")
    stored = _upright_scene().rotate(90, expand=True)  # a phone stores the shot sideways ...
    exif = stored.getexif()
    exif[0x0112] = 6  # ... and records "rotate 90 degrees clockwise to display"
    files["exif_rotated.jpg"] = encoded(stored, "JPEG", exif=exif.tobytes(), quality=95)
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.gif"] = buffer.getvalue()
    files["bomb_over_2x_limit.png"] = _png_header_only(30000, 30000)  # Pillow itself refuses to open it
    files["bomb_over_limit.png"] = _png_header_only(10000, 10000)  # Pillow only warns: we refuse it
    assert set(files) == set(EXPECTED)
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    return make_bad_images(tmp_path_factory.mktemp("bad-images"))


def _small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


_SMALL_PNG = _small_png()  # cut anywhere, with junk after it: the truncation cases hypothesis explores


# --- loading and the processor ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_file_loads_or_fails_with_one_line_naming_it(name, bad_images):
    path = bad_images[name]
    processor = ShowAttendTellImageProcessor(size=32)
    expected = EXPECTED[name]
    started = time.perf_counter()
    if expected is None:
        image = load_image(path)
        assert image.mode == "RGB" and min(image.size) >= 1
        for source in (path, str(path), Image.open(path)):  # a path, or a PIL image the caller opened
            pixel_values = processor(source)["pixel_values"]
            assert pixel_values.shape == (1, 3, 32, 32) and torch.isfinite(pixel_values).all()
    else:
        with pytest.raises(ImageLoadError) as caught:
            load_image(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert expected in message
        with pytest.raises(
            ValueError, match=re.escape(expected)
        ):  # the processor, given the path, says the same
            processor(str(path))
    assert time.perf_counter() - started < 10  # a bomb is refused from its header, never decoded


def test_images_opened_by_the_caller_are_named_when_their_data_is_bad(bad_images):
    processor = ShowAttendTellImageProcessor(size=32)
    with pytest.raises(ImageLoadError) as caught:
        processor([Image.open(bad_images["one_pixel.png"]), Image.open(bad_images["truncated.png"])])
    message = str(caught.value)
    assert message.startswith(f"image 1 ({bad_images['truncated.png']}): truncated") and "\n" not in message


def test_the_model_sees_the_sensible_picture(bad_images):
    # EXIF orientation applied: the caption is made from the upright picture
    upright = np.asarray(_upright_scene(), dtype=np.float32)
    rotated = np.asarray(load_image(bad_images["exif_rotated.jpg"]), dtype=np.float32)
    assert rotated.shape == upright.shape
    assert np.abs(rotated - upright).mean() < 10
    # the first frame of an animation (red), not a later one
    assert tuple(np.asarray(load_image(bad_images["animated.gif"]))[10, 10]) == (255, 0, 0)
    # transparency composited on white, as a viewer shows it
    assert (np.asarray(load_image(bad_images["rgba_transparent.png"])) == 255).all()
    assert (np.asarray(load_image(bad_images["la_transparent.png"])) == 255).all()
    assert (np.asarray(load_image(bad_images["palette_transparent.gif"]))[0, 0] == 255).all()
    # 16-bit grey scaled to 8 bits (a ramp from black to white), not clipped to white
    deep = np.asarray(load_image(bad_images["gray_16bit.png"]))[..., 0]
    assert deep.min() == 0 and deep.max() == 255 and 100 < deep.mean() < 155
    # CMYK converted back to colours close to the original photo
    generator = np.random.default_rng(0)
    photo = generator.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    assert np.abs(np.asarray(load_image(bad_images["cmyk.jpg"]), dtype=np.float32) - photo).mean() < 40
    # extreme shapes keep their pixels' colour after the resize
    assert tuple(np.asarray(load_image(bad_images["one_pixel.png"]))[0, 0]) == (10, 200, 30)
    assert load_image(bad_images["wide_10000x10.png"]).size == (10000, 10)


def test_a_missing_file_a_folder_and_an_unknown_type_are_named(tmp_path):
    for source, reason in [(tmp_path / "nope.jpg", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(ImageLoadError, match=f"^{re.escape(str(source))}: {reason}"):
            load_image(source)
    with pytest.raises(ImageLoadError, match="cannot read an image from int"):
        load_image(42)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_datasets_image_cell_loads_like_its_file(name, bad_images):
    # What training, evaluation and caption.py --dataset read: a datasets.Image cell (decode=False), with the
    # bytes embedded or only the file's path. Same picture, or the same reason, as the file itself.
    path = bad_images[name]
    cells = [{"bytes": path.read_bytes(), "path": "photos/" + name}, {"bytes": None, "path": str(path)}]
    for cell in cells:
        if EXPECTED[name] is None:
            assert np.array_equal(np.asarray(load_image(cell)), np.asarray(load_image(path)))
            continue
        with pytest.raises(ImageLoadError) as from_file:
            load_image(path)
        with pytest.raises(ImageLoadError) as from_cell:
            load_image(cell, name="row 7")
        assert str(from_cell.value) == f"row 7: {from_file.value.reason}"
        assert from_cell.value.reason == from_file.value.reason and "\n" not in from_cell.value.reason
    with pytest.raises(ImageLoadError, match=r"^row 7: holds neither image bytes nor a path$"):
        load_image({"bytes": None, "path": None}, name="row 7")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), st.builds(lambda n, tail: _SMALL_PNG[:n] + tail,
    st.integers(0, len(_SMALL_PNG)), st.binary(max_size=20))))  # fmt: skip
def test_any_bytes_give_a_picture_or_one_line_that_names_it(data: bytes) -> None:
    try:
        image = load_image(data, name="upload 3")
    except ImageLoadError as error:
        message = str(error)
        assert message == f"upload 3: {error.reason}" and "\n" not in message and error.reason
        assert describe_image_error(error) == error.reason  # the one wording, without the name
        copy = pickle.loads(pickle.dumps(error))  # crosses DataLoader worker processes whole
        assert (type(copy), str(copy), copy.image, copy.reason) == (
            ImageLoadError,
            message,
            "upload 3",
            error.reason,
        )
    else:
        assert image.mode == "RGB"


def test_image_files_finds_the_pictures_of_a_folder(tmp_path):
    for relative in ["b.png", "A.JPG", "sub/c.webp", "sub/deeper/d.TIFF", ".hidden.jpg", "._a.jpg",
                     "notes.txt", "sub/no_suffix", ".cache/e.png"]:  # fmt: skip
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder whose name looks like a picture
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == [
        ".cache/e.png",
        "A.JPG",
        "b.png",
        "sub/c.webp",
        "sub/deeper/d.TIFF",
    ]
    assert [p.name for p in image_files(tmp_path, recursive=False)] == ["A.JPG", "b.png"]
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".bmp"} == IMAGE_SUFFIXES


# --- the pipeline --------------------------------------------------------------------------------------


@pytest.mark.compat
def test_pipeline_captions_the_odd_files_and_names_the_bad_ones(tmp_path, tiny_model, processor, bad_images):
    folder = save_model_folder(tmp_path / "model", tiny_model, processor)
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    for name, expected in sorted(EXPECTED.items()):
        path = str(bad_images[name])
        if expected is None:
            (record,) = captioner(path, max_new_tokens=4)
            assert isinstance(record["generated_text"], str)
        else:
            with pytest.raises(ValueError) as caught:
                captioner(path, max_new_tokens=4)
            assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)
            assert "\n" not in str(caught.value)


# --- the caption tool --------------------------------------------------------------------------------


def test_caption_tool_goes_on_past_bad_files_and_exits_non_zero(
    tmp_path, tiny_model, processor, bad_images, capsys
):
    caption = load_script("caption")
    folder = save_model_folder(tmp_path / "model", tiny_model, processor)
    output = tmp_path / "captions.jsonl"
    files = [str(bad_images[name]) for name in sorted(EXPECTED)]
    status = caption.main(
        [
            "--model",
            str(folder),
            *files,
            "--max-new-tokens",
            "4",
            "--output",
            str(output),
            "--batch-size",
            "4",
        ]
    )
    assert status == 1
    captured_err = capsys.readouterr().err
    err_lines = [line for line in captured_err.splitlines() if line.startswith("caption.py: error:")]
    rows = {row["path"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert list(rows) == files  # every file once, in input order
    for name, expected in EXPECTED.items():
        row = rows[str(bad_images[name])]
        if expected is None:
            assert "caption" in row and "error" not in row, row
            assert row["caption"] == _caption_of(tiny_model, processor, bad_images[name])
        else:
            assert expected in row["error"], row
            (line,) = [line for line in err_lines if f" {bad_images[name]}: " in line]
            assert expected in line
    assert len(err_lines) == sum(expected is not None for expected in EXPECTED.values())


def _caption_of(model, processor, path: Path) -> str:
    """What the model says about the file as load_image reads it (upright, first frame, ...)."""
    with torch.no_grad():
        ids = model.generate(**processor(images=load_image(path)), max_new_tokens=4)
    return processor.batch_decode(ids)[0]
