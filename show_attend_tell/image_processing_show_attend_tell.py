"""Image processor: any picture -> the normalised 256 x 256 RGB tensor the ResNet encoder expects."""

from __future__ import annotations

import io
import os
import re
import urllib.error
import urllib.request
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


#: Largest download `load_image` accepts from a URL; a picture worth captioning is far smaller, and the
#: limit keeps a wrong URL (a video, a disk image) from filling memory.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_URL_TIMEOUT = 30.0


class ImageLoadError(ValueError):
    """An image that cannot be used. The message is one line: which image, then why."""


def to_rgb(image: Image.Image) -> Image.Image:
    """
    An upright RGB copy of `image`: EXIF orientation applied (phones store portraits sideways), the first
    frame of an animation, transparency composited on white, and any mode (palette, CMYK, 16-bit) converted.
    """
    if getattr(image, "is_animated", False) and image.tell() != 0:
        # Before anything copies the image: a copy keeps the current frame and is no longer animated.
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping, which would turn most pixels white.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def describe_image_error(error: BaseException) -> str:
    """A short, one-line reason for an exception raised while reading or converting an image."""
    if isinstance(error, ImageLoadError):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        return _bomb_reason(pixels)
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read (unknown format, or corrupt data)"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (OSError, SyntaxError)) and "truncated" in message:
        # Pillow raises OSError for truncated data and SyntaxError for some broken headers.
        return f"truncated or corrupt image data ({message})"
    if isinstance(error, ValueError):
        return message  # our own checks (e.g. an array of the wrong shape) already say what is wrong
    if isinstance(error, (OSError, SyntaxError, EOFError)):
        return f"corrupt or unsupported image data ({message})"
    return f"{type(error).__name__}: {message}"


def _bomb_reason(pixels: str) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return (
        f"{pixels} is above Pillow's decompression-bomb limit of {limit:,} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS); not decoded"
    )


def _download(url: str, timeout: float | None) -> bytes:
    """The body of an http(s) URL, with the status checked and the size bounded."""
    request = urllib.request.Request(url, headers={"User-Agent": "show-attend-tell"})
    try:
        with urllib.request.urlopen(request, timeout=timeout or DEFAULT_URL_TIMEOUT) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as error:  # before URLError: it is a subclass
        raise ImageLoadError(f"{url}: HTTP error {error.code} {error.reason}") from None
    except OSError as error:  # URLError, timeouts, connection resets
        reason = getattr(error, "reason", error)
        raise ImageLoadError(f"{url}: download failed ({' '.join(str(reason).split())})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageLoadError(f"{url}: larger than {MAX_DOWNLOAD_BYTES // (1024 * 1024)} MiB, not downloaded")
    return data


def load_image(
    source: str | os.PathLike | bytes | IO[bytes] | Image.Image,
    *,
    timeout: float | None = None,
    name: str | None = None,
) -> Image.Image:
    """
    Reads one picture and returns it fully decoded as an upright RGB image (see `to_rgb`).

    `source` is a file path, an http(s) URL, the file's bytes, a binary file object, or a PIL image. Anything
    that cannot be used raises `ImageLoadError` with a one-line message naming the image (`name`, or the path or
    URL) and the reason: missing or empty file, not an image, truncated data, or more pixels than Pillow's
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, which a caller may raise for huge scans).
    The whole image is decoded here, so corrupt data is found now rather than halfway through a batch.
    """
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", "") or "image"
        try:
            return to_rgb(source)
        except Exception as error:
            raise ImageLoadError(f"{label}: {describe_image_error(error)}") from error

    if isinstance(source, (bytes, bytearray, memoryview)):
        label, stream, size = name or "image bytes", io.BytesIO(bytes(source)), len(source)
    elif isinstance(source, (str, os.PathLike)):
        location = os.fspath(source)
        if location.startswith(("http://", "https://")):
            label = name or location
            data = _download(location, timeout)
            stream, size = io.BytesIO(data), len(data)
        else:
            label = name or location
            try:
                size = os.path.getsize(location)
            except OSError as error:
                raise ImageLoadError(f"{label}: {describe_image_error(error)}") from None
            stream = location
    elif hasattr(source, "read"):
        label, stream, size = name or getattr(source, "name", None) or "image file object", source, None
    else:
        raise ImageLoadError(
            f"{name or 'image'}: cannot read an image from {type(source).__name__} "
            "(expected a path, an http(s) URL, bytes, a file object or a PIL image)"
        )
    if size == 0:
        raise ImageLoadError(f"{label}: empty file (0 bytes)")

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the explicit check below refuses
            # the whole range with one clear message instead of decoding a few hundred megabytes.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and width * height > limit:
                    raise ImageLoadError(
                        f"{label}: {_bomb_reason(f'{width} x {height} = {width * height:,} pixels')}"
                    )
                return to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as error:
        raise ImageLoadError(f"{label}: {describe_image_error(error)}") from error


def _image_label(image: Any, index: int) -> str:
    """How an error names an image of a batch: its file name when Pillow knows one, else its position."""
    filename = getattr(image, "filename", None)
    if isinstance(image, (str, os.PathLike)):
        filename = os.fspath(image)
    return f"image {index} ({filename})" if filename else f"image {index}"


class ShowAttendTellImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`ShowAttendTellForConditionalGeneration`]: converts to upright RGB, resizes to
    `size` x `size` (256 by default, the resolution of the paper's implementation, without keeping the
    aspect ratio), scales to [0, 1] and normalises with the ImageNet mean and standard deviation.

    Accepts PIL images, numpy arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` (uint8, or floats in [0, 1]),
    torch tensors of the same shapes, file paths and http(s) URLs (read with `load_image`), and lists of
    them. Returns `pixel_values` of shape `(images, 3, size, size)`. An image that cannot be used raises
    `ImageLoadError` (a `ValueError`) whose one-line message names the image and the reason.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 256,
        resample: str = "bilinear",
        image_mean: tuple[float, float, float] = IMAGENET_MEAN,
        image_std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs,
    ) -> None:
        if isinstance(size, dict):  # {"height": h, "width": w}, the transformers convention
            size = int(size.get("height", size.get("shortest_edge", 256)))
        if resample not in _RESAMPLING:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLING)}, got {resample!r}")
        super().__init__(**kwargs)
        self.size = int(size)
        self.resample = resample
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    def to_pil(self, image) -> Image.Image:
        """Any supported single image -> an upright RGB PIL image."""
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, (str, os.PathLike, bytes)):
            return load_image(image)
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # channels first -> last
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"cannot read an image of shape {tuple(array.shape)}")
        if array.dtype != np.uint8:
            array = np.asarray(array, dtype=np.float64)
            if array.size and array.max() <= 1.0:
                array = array * 255.0
            array = np.clip(np.round(array), 0, 255).astype(np.uint8)
        return to_rgb(Image.fromarray(array))

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images (one or a list) -> `BatchFeature(pixel_values=(images, 3, size, size))`."""
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {unknown}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        batch = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        for i, image in enumerate(images):
            try:
                resized = self.to_pil(image).resize((self.size, self.size), _RESAMPLING[self.resample])
            except Exception as error:
                # Truncated data surfaces only when Pillow decodes, here; say which image of the batch it was.
                if isinstance(error, ImageLoadError):
                    raise  # load_image already named the file
                raise ImageLoadError(f"{_image_label(image, i)}: {describe_image_error(error)}") from error
            scaled = np.asarray(resized, dtype=np.float32) / 255.0
            batch[i] = ((scaled - mean) / std).transpose(2, 0, 1)
        return BatchFeature(data={"pixel_values": batch}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["ImageLoadError", "ShowAttendTellImageProcessor", "load_image", "to_rgb"]
