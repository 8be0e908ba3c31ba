"""Image processor: any picture -> the normalised 256 x 256 RGB tensor the ResNet encoder expects."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """
    An upright RGB copy of `image`: EXIF orientation applied (phones store portraits sideways), the first
    frame of an animation, transparency composited on white, and any mode (palette, CMYK, 16-bit) converted.
    """
    image = ImageOps.exif_transpose(image)
    if getattr(image, "is_animated", False):
        image.seek(0)
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


class ShowAttendTellImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`ShowAttendTellForConditionalGeneration`]: converts to upright RGB, resizes to
    `size` x `size` (256 by default, the resolution of the paper's implementation, without keeping the
    aspect ratio), scales to [0, 1] and normalises with the ImageNet mean and standard deviation.

    Accepts PIL images, numpy arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` (uint8, or floats in [0, 1]),
    torch tensors of the same shapes, and lists of them. Returns `pixel_values` of shape
    `(images, 3, size, size)`.
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
            resized = self.to_pil(image).resize((self.size, self.size), _RESAMPLING[self.resample])
            scaled = np.asarray(resized, dtype=np.float32) / 255.0
            batch[i] = ((scaled - mean) / std).transpose(2, 0, 1)
        return BatchFeature(data={"pixel_values": batch}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["ShowAttendTellImageProcessor"]
