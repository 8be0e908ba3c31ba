"""Where did the model look? Attention-over-image figures for generated captions.

The decoder attends over the encoder's grid (14 x 14 for the specification's ResNet-101 setup,
8 x 8 for a ResNet at 256 px or the demo's small model) once per generated word. This module turns
those maps into the specification's ``caption_vis.png`` figure: the image, then one panel per word
with that word's attention map upsampled smoothly over the image and the word written above it,
laid out in rows of ``columns`` panels.

Three functions:

* :func:`attention_overlays` returns the per-word maps upsampled to the displayed image's size
  (``(num_words, H, W)``, each normalised to [0, 1]); the figure uses it, and a web demo can too.
* :func:`plot_attention` builds the figure and returns a :class:`matplotlib.figure.Figure`.
* :func:`save_attention_figure` writes that figure to a PNG file.

Alignment with what the model saw: the image processor resizes every image to a square
(256 x 256) without keeping its aspect ratio, so the encoder's grid cells are squares of that
resized image. The figure therefore shows the image resized the same way (a wide photo looks
squeezed); the overlay is then exact, cell for cell. Grayscale, palette and RGBA images are
converted to RGB (transparency composited on white, as the processor does).

matplotlib is an optional dependency (``pip install matplotlib``, or ``pip install -e ".[vis]"`` in a clone). It is imported only
when a figure is built, so :func:`attention_overlays` works without it. The figure is drawn with
matplotlib's object-oriented API and the Agg canvas, never through ``pyplot``: no global backend is
changed, no window opens on a headless machine, and a notebook still displays the returned figure.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imported for annotations only: matplotlib is optional
    import torch
    from matplotlib.figure import Figure

__all__ = ["DISPLAY_SIZE", "attention_overlays", "plot_attention", "save_attention_figure", "write_png"]

#: Side of the square the image processor resizes images to, and so the default display size.
DISPLAY_SIZE = 256

# Special tokens a caller may leave in the word list; they never have a map of their own
# except ``<end>``, which the decoder emits (and attends for) at its last step.
_START_TOKEN = "<start>"
_END_TOKEN = "<end>"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _to_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a float32 numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(array, "detach"):  # a torch tensor: avoid importing torch just to check the type
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def _attention_grid(attention: Any) -> np.ndarray:
    """Return the maps as ``(num_words, side, side)`` float32, validating the shape.

    Accepts ``(num_words, num_pixels)`` with ``num_pixels`` a perfect square (the flattened encoder
    grid, as the model returns it), ``(num_words, H, W)``, or a list of per-word maps (as collected
    step by step from ``generate``).
    """
    if isinstance(attention, (list, tuple)):
        if not attention:
            raise ValueError("attention is empty: expected one map per word")
        maps = np.stack([_to_numpy(a) for a in attention])
    else:
        maps = _to_numpy(attention)
    if maps.ndim == 2:
        num_pixels = maps.shape[1]
        side = math.isqrt(num_pixels)
        if side * side != num_pixels or num_pixels == 0:
            raise ValueError(
                f"attention has {num_pixels} pixels per word, which is not a square grid "
                f"(expected side * side, e.g. 14 * 14 = 196 or 8 * 8 = 64); pass (num_words, H, W) "
                "for a non-square grid"
            )
        maps = maps.reshape(maps.shape[0], side, side)
    elif maps.ndim != 3:
        raise ValueError(
            f"attention must have shape (num_words, num_pixels) or (num_words, H, W) for one image, "
            f"got {tuple(maps.shape)}; select one image of a batch first (e.g. attention[0])"
        )
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"attention maps are empty: shape {tuple(maps.shape)}")
    if not np.isfinite(maps).all():
        raise ValueError("attention contains NaN or infinite values")
    return maps


def _align_words(words: Sequence[str], num_maps: int) -> list[str]:
    """Match the words to the maps, forgiving special tokens that have no map.

    Callers pass decoded words without special tokens, one per map. A leading ``<start>`` (the
    decoder's input, never generated, so it has no map) and a trailing ``<end>`` given without its
    map are dropped; an ``<end>`` that has its own map is kept and shown like any word.
    Anything else that does not match is an error: a silent off-by-one would put every word
    over its neighbour's attention.
    """
    if isinstance(words, str):
        raise TypeError("words must be a sequence of words (e.g. caption.split()), not one string")
    words = [str(w) for w in words]
    if len(words) == num_maps + 1 and words and words[0] == _START_TOKEN:
        words = words[1:]
    if len(words) == num_maps + 1 and words and words[-1] == _END_TOKEN:
        words = words[:-1]
    if len(words) != num_maps:
        raise ValueError(
            f"got {len(words)} words but {num_maps} attention maps: attention must have one map "
            "(row) per word, i.e. shape (len(words), num_pixels)"
        )
    return words


def _display_image(image: Any, size: int | tuple[int, int] | None) -> Image.Image:
    """Return ``image`` as the RGB picture to draw, resized to what the model saw.

    ``size`` is the square side (or ``(width, height)``) to resize to; ``None`` keeps the image's own
    size, for callers that already pass the resized image. numpy arrays may be ``(H, W)``,
    ``(H, W, C)`` or channels-first ``(C, H, W)``, uint8 or float in [0, 1].
    """
    if not isinstance(image, Image.Image):
        array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels-first, as torch stores images
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        if array.dtype != np.uint8:
            array = array.astype(np.float32)
            # Floats in [0, 1] are the usual "image as array" convention; larger values mean 0-255.
            if array.size and float(array.max()) <= 1.0:
                array = array * 255.0
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode != "RGB":
        # Composite transparency on white (what the image processor's RGB conversion does) rather
        # than dropping alpha, which would show transparent pixels in whatever colour they hide.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if size is not None:
        target = (size, size) if isinstance(size, int) else tuple(size)
        if image.size != target:
            # Bilinear, like the image processor, so the picture matches the model's input.
            image = image.resize(target, Image.Resampling.BILINEAR)
    return image


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def _upsample(grid: np.ndarray, width: int, height: int, smooth: bool) -> np.ndarray:
    """Resize one ``(h, w)`` map to ``(height, width)``.

    PIL's resampling treats pixels as areas (half-pixel centres), so cell ``(i, j)`` of the grid
    lands exactly over the block of the image it was computed from; ``smooth=False`` shows those
    blocks as they are.
    """
    resample = Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST
    resized = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32)).resize((width, height), resample)
    return np.asarray(resized, dtype=np.float32)


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Scale each map to [0, 1] by its own minimum and maximum.

    Attention weights sum to one over the grid, so a word that spreads its attention has tiny
    values everywhere and would look blank on a shared scale; per-map scaling shows where each word
    looked *relative to the rest of the image*, not how sharply. A constant map (attention spread
    evenly) becomes all ones: every place was looked at equally.
    """
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    flat = span <= 1e-12 * np.maximum(1.0, np.abs(low))
    out = (maps - low) / np.where(flat, 1.0, span)
    out[np.broadcast_to(flat, out.shape)] = 1.0
    return np.clip(out, 0.0, 1.0)


def attention_overlays(
    image: Image.Image | np.ndarray | tuple[int, int] | None,
    attention: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    *,
    smooth: bool = True,
    normalize: bool = True,
    image_size: int | tuple[int, int] | None = DISPLAY_SIZE,
) -> np.ndarray:
    """Upsample each word's attention map to the displayed image's size.

    Args:
        image: the captioned image (PIL image or array). Only its size matters, and only when
            ``image_size`` is ``None``; a ``(width, height)`` tuple works too, or ``None`` together
            with an explicit ``image_size``.
        attention: ``(num_words, num_pixels)`` with ``num_pixels`` a perfect square (the flattened
            encoder grid, e.g. 196 = 14 x 14), ``(num_words, H, W)``, or a list of per-word maps.
            A torch tensor is accepted (detached and moved to the CPU).
        smooth: bicubic interpolation between grid cells (the paper's look); ``False`` gives the
            blocky nearest-neighbour maps, which show the grid exactly.
        normalize: scale each map to [0, 1] by its own min and max (see the module docstring);
            ``False`` returns the interpolated attention weights unscaled (bicubic interpolation
            can then dip slightly below zero next to a sharp peak).
        image_size: the side of the square the model's processor resized the image to (256), or
            ``(width, height)``; ``None`` uses ``image``'s own size.

    Returns:
        float32 array ``(num_words, H, W)``; with ``normalize`` each map lies in [0, 1].
    """
    maps = _attention_grid(attention)
    if image_size is not None:
        width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    elif isinstance(image, Image.Image):
        width, height = image.size
    elif isinstance(image, tuple):
        width, height = image
    elif image is not None:
        array = np.asarray(image)
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
        height, width = array.shape[1:3] if channels_first else array.shape[:2]
    else:
        raise ValueError("pass an image or an image_size to upsample the attention to")
    up = np.zeros((0, int(height), int(width)), dtype=np.float32)  # no words: no maps
    if len(maps):
        up = np.stack([_upsample(m, int(width), int(height), smooth) for m in maps])
    return _normalise(up) if normalize else up


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def _figure_class() -> type[Figure]:
    """Import matplotlib's Figure lazily, with an install hint when the optional extra is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the attention figure needs matplotlib: pip install matplotlib") from error
    return Figure


def _grid_shape(num_panels: int, columns: int) -> tuple[int, int]:
    """Rows and columns of the panels: rows of ``columns``, fewer columns when there are fewer panels."""
    cols = min(columns, num_panels)
    return math.ceil(num_panels / cols), cols


def _caption_text(words: Sequence[str], panel_size: float, fontsize: float) -> str:
    """The caption for the first panel: the words without ``<end>``, wrapped to the panel's width."""
    # Roughly the characters that fit across one panel at the caption's font size (0.85 of the
    # words'; an average glyph is about 0.6 em wide), so the caption in the first panel wraps
    # instead of running over its neighbours.
    width = int(panel_size * 72 / (0.6 * fontsize * 0.85))
    caption = " ".join(w for w in words if w != _END_TOKEN)
    return textwrap.fill(caption, width=max(width, 10)) if caption else "<image>"


def plot_attention(
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    attention: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    *,
    columns: int = 5,
    smooth: bool = True,
    alpha: float = 0.6,
    cmap: str = "Greys_r",
    panel_size: float = 2.5,
    title: str | None = None,
    image_size: int | tuple[int, int] | None = DISPLAY_SIZE,
    fontsize: float = 11.0,
    dpi: float = 100.0,
) -> Figure:
    """Draw the image, then one panel per word with its attention map over the image.

    The first panel shows the image with the whole caption above it (``"<image>"`` when there are
    no words); every following panel shows the image under that word's attention map, upsampled
    smoothly (:func:`attention_overlays`), normalised to [0, 1] per word and drawn with ``cmap`` at
    opacity ``alpha``, with the word as the panel's title. With the default ``"Greys_r"`` the places
    the word attended stay bright and the rest of the image is darkened. Panels are laid out in rows
    of ``columns``.

    The image is shown resized to ``image_size`` (the processor's 256 x 256 square, aspect ratio not
    kept) because that is the image whose grid the attention refers to; pass ``image_size=None`` to
    keep the image's own size (the maps are then stretched to it, which is equally aligned since
    the processor stretches the same way).

    Args:
        image: the captioned image: a PIL image or an ``(H, W[, C])`` / ``(C, H, W)`` array (uint8, or
            float in [0, 1]); grayscale and RGBA images are converted to RGB.
        words: the generated words, one per attention map, without special tokens; a trailing
            ``"<end>"`` is shown as a panel when it has a map and dropped when it does not, and a
            leading ``"<start>"`` without a map is dropped.
        attention: ``(num_words, num_pixels)`` with ``num_pixels`` a perfect square,
            ``(num_words, H, W)``, or a list of per-word maps; numpy or torch.
        columns: panels per row; long captions wrap onto more rows.
        smooth: interpolate the maps bicubically (``False``: show the grid cells as blocks).
        alpha: opacity of the attention overlay.
        cmap: matplotlib colormap of the overlay.
        panel_size: width of one panel, in inches.
        title: optional title over the whole figure.
        image_size: display size (see above).
        fontsize: font size of the words.
        dpi: the figure's resolution (pixels per inch) when drawn or saved.

    Returns:
        The figure, drawn on an Agg canvas (no pyplot state involved): display it in a notebook,
        call ``fig.savefig(...)``, or use :func:`save_attention_figure`.

    Raises:
        ValueError: if the number of words differs from the number of maps, or the maps' shape is
            not ``(num_words, side * side)`` or ``(num_words, H, W)``.
    """
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    figure_class = _figure_class()  # first: without matplotlib, say so before any other work
    maps = _attention_grid(attention)
    words = _align_words(words, maps.shape[0])
    picture = _display_image(image, image_size)
    overlays = attention_overlays(picture, maps, smooth=smooth, image_size=None)
    pixels = np.asarray(picture)

    rows, cols = _grid_shape(len(words) + 1, columns)
    caption = _caption_text(words, panel_size, fontsize)
    fig = _empty_figure(
        figure_class,
        rows,
        cols,
        image_shape=pixels.shape[:2],
        caption_lines=caption.count("\n") + 1,
        panel_size=panel_size,
        fontsize=fontsize,
        titled=bool(title),
        dpi=dpi,
    )
    _draw_caption_panel(fig, rows, cols, pixels, caption, fontsize)
    _draw_word_panels(fig, rows, cols, pixels, words, overlays, cmap=cmap, alpha=alpha, fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=fontsize * 1.2)
    # Jupyter renders figures made through pyplot with its inline backend, but a Figure built
    # directly is only known to it when that backend happens to be active; a PNG representation on
    # the instance makes the returned figure display in any notebook. (When the inline backend is
    # active, its formatter takes precedence and this is not used.)
    fig._repr_png_ = lambda: _png_bytes(fig)
    return fig


def _empty_figure(
    figure_class: type[Figure],
    rows: int,
    cols: int,
    *,
    image_shape: tuple[int, int],
    caption_lines: int,
    panel_size: float,
    fontsize: float,
    titled: bool,
    dpi: float,
) -> Figure:
    """A figure on an Agg canvas sized for ``rows`` x ``cols`` panels of the image's ``(height, width)``, with room
    for each panel's word, the caption's lines over the first row and the figure's title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # Leave room above each row for one line of title (the words); the first row also holds the
    # caption, which may wrap onto several lines.
    line_height = fontsize * 1.5 / 72
    height, width = image_shape
    panel_height = panel_size * height / width
    fig_height = rows * (panel_height + line_height) + (caption_lines - 1) * line_height * 0.85
    if titled:
        fig_height += 2 * line_height
    fig = figure_class(figsize=(cols * panel_size, fig_height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: rendering and buffers without pyplot
    # Small paddings: the panels are pictures meant to be compared side by side, and the default
    # margins would leave wide white gaps between them.
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    return fig


def _draw_caption_panel(
    fig: Figure, rows: int, cols: int, pixels: np.ndarray, caption: str, fontsize: float
) -> None:
    """The first panel: the image with the whole caption above it."""
    first = fig.add_subplot(rows, cols, 1)
    first.imshow(pixels, interpolation="antialiased")
    first.set_title(caption, fontsize=fontsize * 0.85, linespacing=1.1)
    first.set_axis_off()  # ticks mean nothing over a photograph


def _draw_word_panels(
    fig: Figure,
    rows: int,
    cols: int,
    pixels: np.ndarray,
    words: Sequence[str],
    overlays: np.ndarray,
    *,
    cmap: str,
    alpha: float,
    fontsize: float,
) -> None:
    """The panels after the first: the image under each word's attention map, the word as the title."""
    for index, (word, overlay) in enumerate(zip(words, overlays, strict=True), start=2):
        ax = fig.add_subplot(rows, cols, index)
        ax.imshow(pixels, interpolation="antialiased")
        # Fixed limits: without them matplotlib rescales each panel to its own range, and an
        # evenly spread (all-ones) map would come out black instead of "looked everywhere".
        ax.imshow(overlay, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="antialiased")
        ax.set_title(word, fontsize=fontsize)
        ax.set_axis_off()


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_attention_figure(
    path: str | Path,
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    attention: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    **kwargs: Any,
) -> Path:
    """Draw the attention figure (:func:`plot_attention`, same keyword arguments) and write a PNG.

    The PNG is written at the figure's ``dpi`` (100 unless given), so it is
    ``columns * panel_size * dpi`` pixels wide; parent folders are created. The figure is cleared
    afterwards so that scripts captioning many images do not accumulate memory.

    Returns:
        The path written.
    """
    path = Path(path)
    fig = plot_attention(image, words, attention, **kwargs)  # first: bad input leaves no folder behind
    write_png(fig, path)
    return path


def write_png(fig: Figure, target: str | os.PathLike | IO[bytes]) -> None:
    """
    Writes `fig` as a PNG at the figure's own `dpi` to `target` (a path, whose folders are created, or a binary
    file object such as `io.BytesIO`), then clears the figure: every figure the package draws is saved this way.
    """
    if isinstance(target, (str, os.PathLike)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(target, format="png", dpi=fig.dpi)
    finally:
        # Not created through pyplot, so nothing global holds the figure: clearing it releases the
        # images and text it holds even if the caller keeps a reference to something inside.
        fig.clear()
