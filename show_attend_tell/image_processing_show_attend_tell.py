"""Image processor: any picture -> the normalised 256 x 256 RGB tensor the ResNet encoder expects."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import socket
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature, get_size_dict
from transformers.image_transforms import normalize, rescale, resize, to_channel_dimension_format
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.utils import TensorType

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Largest download `load_image` accepts from a URL; a picture worth captioning is far smaller, and the
#: limit keeps a wrong URL (a video, a disk image) from filling memory.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
#: Seconds a URL's whole download (connection, headers and body) may take.
DEFAULT_URL_TIMEOUT = 30.0


#: File name endings that folder scans read as pictures (compared in lower case); Pillow reads them all.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


def image_files(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """
    The pictures in `folder` (and its subfolders unless `recursive=False`), sorted: files whose suffix is in
    `IMAGE_SUFFIXES` in any case. Hidden files (a name starting with a dot, such as macOS's `._photo.jpg`
    companions or a writer's temporary file) are left out.
    """
    root = Path(folder)
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        path
        for path in found
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


class ImageLoadError(ValueError):
    """
    An image that cannot be used. The message is one line, `"<image>: <reason>"`; `image` and `reason` are
    also kept apart, for a caller that names the image itself (by its dataset id, say).
    """

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"{image}: {reason}")
        self.image = image
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Pickled across DataLoader worker processes: rebuilt from both parts, not from the joined message.
        return type(self), (self.image, self.reason)


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
        return error.reason
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


class _Deadline:
    """
    The total time limit of one download. urllib's own timeout bounds each socket operation only, so a server
    that trickles its headers or body a few bytes at a time keeps a download going for hours; at the deadline
    this shuts the download's sockets down, which ends a read that is waiting at once.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would unwrap it under a running read.
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedConnection:
    """Hands each connection's socket to the download's deadline as soon as it is connected."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _WatchedHTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _WatchedHandlerMixin:
    """urllib's http(s) handler, with each connection's socket (redirects included) given to a deadline."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class: type, request: urllib.request.Request, **kwargs: Any) -> Any:
        https = issubclass(http_class, http.client.HTTPSConnection)
        watched = _WatchedHTTPSConnection if https else _WatchedHTTPConnection
        return super().do_open(watched, request, deadline=self._deadline, **kwargs)


class _WatchedHTTPHandler(_WatchedHandlerMixin, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_WatchedHandlerMixin, urllib.request.HTTPSHandler):
    pass


def _download(url: str, timeout: float | None) -> bytes:
    """
    The body of an http(s) URL, with the status checked, the size bounded and the whole download (connection,
    headers, body) limited to `timeout` seconds in total (default `DEFAULT_URL_TIMEOUT`). Every URL that the
    package and its scripts read goes through here (via `load_image`).
    """
    limit = timeout or DEFAULT_URL_TIMEOUT
    request = urllib.request.Request(url, headers={"User-Agent": "show-attend-tell"})
    deadline = _Deadline(limit)
    opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline))
    chunks: list[bytes] = []
    size = 0
    try:
        with deadline, opener.open(request, timeout=limit) as response:
            while chunk := response.read1(1 << 16):  # whatever has arrived: a trickle is seen at the deadline
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ImageLoadError(
                        url, f"larger than {MAX_DOWNLOAD_BYTES // (1024 * 1024)} MiB, not downloaded"
                    )
                chunks.append(chunk)
    except urllib.error.HTTPError as error:  # before URLError: it is a subclass
        raise ImageLoadError(url, f"HTTP error {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets, a cut-off body
        if not deadline.expired:
            reason = " ".join(str(getattr(error, "reason", error)).split()) or type(error).__name__
            raise ImageLoadError(url, f"download failed ({reason})") from None
    if deadline.expired:  # the shut-down socket may also read as the end of the body
        raise ImageLoadError(url, f"download took longer than {limit:g} s in all, stopped")
    return b"".join(chunks)


def load_image(
    source: str | os.PathLike | bytes | IO[bytes] | Image.Image | Mapping[str, Any],
    *,
    timeout: float | None = None,
    name: str | None = None,
) -> Image.Image:
    """
    Reads one picture and returns it fully decoded as an upright RGB image (see `to_rgb`).

    `source` is a file path, an http(s) URL, the file's bytes, a binary file object, a PIL image, or a cell of a
    `datasets.Image` column read with `decode=False` (`{"bytes": ..., "path": ...}`). Anything
    that cannot be used raises `ImageLoadError` with a one-line message naming the image (`name`, or the path or
    URL) and the reason: missing or empty file, not an image, truncated data, or more pixels than Pillow's
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, which a caller may raise for huge scans).
    The whole image is decoded here, so corrupt data is found now rather than halfway through a batch.
    `timeout` is the seconds a URL's whole download may take (default `DEFAULT_URL_TIMEOUT`).
    """
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", "") or "image"
        try:
            return to_rgb(source)
        except Exception as error:
            raise ImageLoadError(label, describe_image_error(error)) from error

    if isinstance(source, Mapping):
        # A `datasets.Image` cell read with decode=False: the file's bytes, or its path when it was not embedded.
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise ImageLoadError(name or "dataset row", "holds neither image bytes nor a path")
        source, name = (data, name or path) if data is not None else (path, name)

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
                raise ImageLoadError(label, describe_image_error(error)) from None
            stream = location
    elif hasattr(source, "read"):
        label, stream, size = name or getattr(source, "name", None) or "image file object", source, None
    else:
        raise ImageLoadError(
            name or "image",
            f"cannot read an image from {type(source).__name__} "
            "(expected a path, an http(s) URL, bytes, a file object, a PIL image or a datasets Image cell)",
        )
    if size == 0:
        raise ImageLoadError(label, "empty file (0 bytes)")

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
                        label, _bomb_reason(f"{width} x {height} = {width * height:,} pixels")
                    )
                return to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as error:
        raise ImageLoadError(label, describe_image_error(error)) from error


def _image_label(image: Any, index: int) -> str:
    """How an error names an image of a batch: its file name when Pillow knows one, else its position."""
    filename = getattr(image, "filename", None)
    if isinstance(image, (str, os.PathLike)):
        filename = os.fspath(image)
    return f"image {index} ({filename})" if filename else f"image {index}"


class ShowAttendTellImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`ShowAttendTellForConditionalGeneration`] with transformers' standard steps: convert to
    upright RGB, resize to `size` (`{"height": 256, "width": 256}` by default, the resolution of the paper's
    implementation, without keeping the aspect ratio), rescale by `rescale_factor` (1/255) and normalise with the
    ImageNet mean and standard deviation, channels first.

    The arguments are those of transformers' image processors (`do_convert_rgb`, `do_resize`, `size`, `resample`,
    `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `data_format`, `input_data_format`),
    given at creation or per call; `size` may also be one int (a square), as folders saved by version 0.1 store it,
    and `resample` a filter's name ("bilinear").

    Accepts PIL images, numpy arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` (uint8, or floats in [0, 1]), torch
    tensors of the same shapes, file paths and http(s) URLs (read with `load_image`), and lists of them.
    `do_convert_rgb` (the default) reads every picture as `to_rgb` does: EXIF orientation applied, transparency
    on white, 16-bit and palette modes converted. Returns `pixel_values` of shape `(images, 3, height, width)`.
    An image that cannot be used raises `ImageLoadError` (a `ValueError`) whose one-line message names the image
    and the reason.
    """

    model_input_names = ["pixel_values"]
    #: The keyword arguments a call accepts besides `return_tensors` (the processor routes these here).
    call_options = (
        "do_convert_rgb",
        "do_resize",
        "size",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "data_format",
        "input_data_format",
    )

    def __init__(
        self,
        size: int | dict[str, int] | None = None,
        resample: PILImageResampling | int | str = PILImageResampling.BILINEAR,
        image_mean: float | list[float] | tuple[float, ...] = IMAGENET_MEAN,
        image_std: float | list[float] | tuple[float, ...] = IMAGENET_STD,
        *,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        settings = _checked_settings(
            size={"height": 256, "width": 256} if size is None else size,
            resample=resample,
            image_mean=image_mean,
            image_std=image_std,
            rescale_factor=rescale_factor,
        )
        self.do_convert_rgb = bool(do_convert_rgb)
        self.do_resize = bool(do_resize)
        self.size = settings["size"]
        self.resample = settings["resample"]
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = settings["rescale_factor"]
        self.do_normalize = bool(do_normalize)
        self.image_mean = settings["image_mean"]
        self.image_std = settings["image_std"]

    def to_pil(self, image, input_data_format: ChannelDimension | str | None = None) -> Image.Image:
        """Any supported single image -> an upright RGB PIL image (see `to_rgb`)."""
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, (str, os.PathLike, bytes)):
            return load_image(image)
        return to_rgb(Image.fromarray(_as_uint8_hwc(image, input_data_format)))

    def _as_array(self, image, do_convert_rgb: bool, input_data_format) -> np.ndarray:
        """One image -> a `(H, W, 3)` uint8 array: read robustly (`to_pil`), or as given when not converting."""
        if do_convert_rgb or isinstance(image, (str, os.PathLike, bytes)):
            return np.asarray(self.to_pil(image, input_data_format))
        array = (
            np.asarray(image) if isinstance(image, Image.Image) else _as_uint8_hwc(image, input_data_format)
        )
        if array.ndim != 3 or array.shape[-1] != 3:
            shape = f"mode {image.mode}" if isinstance(image, Image.Image) else f"shape {tuple(array.shape)}"
            raise ValueError(f"has {shape}; do_convert_rgb=False needs RGB images with 3 channels")
        return array

    def preprocess(self, images, return_tensors: str | TensorType | None = "pt", **kwargs) -> BatchFeature:
        """
        Images (one or a list) -> `BatchFeature(pixel_values=(images, 3, height, width))`; keyword arguments
        override the processor's settings for this call.
        """
        unknown = sorted(set(kwargs) - set(self.call_options))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {', '.join(unknown)}")
        options = {name: kwargs.get(name, getattr(self, name, None)) for name in self.call_options}
        options.update(
            _checked_settings(**{name: options[name] for name in _CHECKED}),
            data_format=ChannelDimension(options["data_format"] or ChannelDimension.FIRST),
        )
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        pixel_values = []
        for i, image in enumerate(images):
            try:
                pixel_values.append(self._transform(image, options))
            except ImageLoadError:
                raise  # load_image already named the file
            except Exception as error:
                # Truncated data surfaces only when Pillow decodes, here; say which image of the batch it was.
                raise ImageLoadError(_image_label(image, i), describe_image_error(error)) from error
        if len({array.shape for array in pixel_values}) == 1:
            pixel_values = np.stack(pixel_values)
        elif return_tensors is not None:
            shapes = sorted({array.shape for array in pixel_values})
            raise ValueError(
                f"the images have different shapes {shapes} and cannot form one tensor: resize them "
                "(do_resize=True) or pass return_tensors=None for a list"
            )
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _transform(self, image, options: dict[str, Any]) -> np.ndarray:
        """One image through transformers' steps: resize, rescale, normalise, then the requested layout."""
        array = self._as_array(image, options["do_convert_rgb"], options["input_data_format"])
        last = ChannelDimension.LAST
        if options["do_resize"]:
            size = options["size"]
            array = resize(
                array, (size["height"], size["width"]), resample=options["resample"], input_data_format=last
            )
        if options["do_rescale"]:
            array = rescale(array, options["rescale_factor"], input_data_format=last)
        if options["do_normalize"]:
            array = normalize(array, options["image_mean"], options["image_std"], input_data_format=last)
        return to_channel_dimension_format(array, options["data_format"], input_channel_dim=last)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


_CHECKED = ("size", "resample", "image_mean", "image_std", "rescale_factor")


def _checked_settings(
    size: Any, resample: Any, image_mean: Any, image_std: Any, rescale_factor: Any
) -> dict[str, Any]:
    """
    The settings in their canonical form, or a one-line ValueError: `size` as `{"height", "width"}`
    (transformers' `get_size_dict`, which also reads the one int that folders saved by version 0.1 hold),
    `resample` as PIL's filter (its number, or its name as those folders hold it), mean and std per channel.
    """
    try:
        size = get_size_dict(size, default_to_square=True)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"size must be an int or {{'height': h, 'width': w}}, got {size!r} ({error})"
        ) from None
    if set(size) != {"height", "width"} or not all(isinstance(v, int) and v > 0 for v in size.values()):
        raise ValueError(f"size must be {{'height': h, 'width': w}} with positive ints, got {size!r}")
    if isinstance(resample, str) and resample.upper() in PILImageResampling.__members__:
        resample = PILImageResampling[resample.upper()]
    try:
        resample = PILImageResampling(resample)
    except (ValueError, TypeError):
        names = ", ".join(name.lower() for name in PILImageResampling.__members__)
        raise ValueError(f"resample must be a PIL resampling filter ({names}), got {resample!r}") from None
    try:
        mean, std = (np.broadcast_to(np.asarray(v, dtype=np.float64), (3,)) for v in (image_mean, image_std))
    except (ValueError, TypeError):
        raise ValueError(
            f"image_mean and image_std must be one number or 3 (one per RGB channel), got {image_mean!r} "
            f"and {image_std!r}"
        ) from None
    if not np.all(std > 0):
        raise ValueError(f"image_std must be positive, got {image_std!r}")
    return {
        "size": {"height": size["height"], "width": size["width"]},
        "resample": resample,
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
        "rescale_factor": float(rescale_factor),
    }


def _as_uint8_hwc(image, input_data_format: ChannelDimension | str | None) -> np.ndarray:
    """A numpy array or torch tensor `(H, W)`, `(H, W, C)` or `(C, H, W)` -> uint8 `(H, W)` or `(H, W, C)`."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3:
        if input_data_format is None:
            # transformers' own guess, which looks for 1 or 3 channels (and 4 here, RGBA) at either end
            first = array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
        else:
            first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
        if first:
            array = array.transpose(1, 2, 0)
        if array.shape[-1] == 1:
            array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot read an image of shape {tuple(np.shape(image))}")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.size and array.max() <= 1.0:
            array = array * 255.0  # floats in [0, 1], as to_tensor-style pipelines hold them
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return array


__all__ = ["ImageLoadError", "ShowAttendTellImageProcessor", "load_image", "to_rgb"]
