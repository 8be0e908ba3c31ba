"""Tests of the attention figure (show_attend_tell.visualization): layout, alignment, saving, errors."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from show_attend_tell.visualization import (
    attention_overlays,
    plot_attention,
    save_attention_figure,
    write_png,
)

GRID = 8  # the demo model's grid; the specification's 14 x 14 is covered where the size matters


def one_hot_maps(cells: list[tuple[int, int]], grid: int = GRID) -> np.ndarray:
    """Maps of shape (len(cells), grid * grid), each with all its attention on one cell (row, col)."""
    maps = np.zeros((len(cells), grid, grid), dtype=np.float32)
    for index, (row, col) in enumerate(cells):
        maps[index, row, col] = 1.0
    return maps.reshape(len(cells), grid * grid)


def grey_image(width: int = 256, height: int = 256) -> Image.Image:
    # Uniform, so any brightness difference in a rendered panel comes from the overlay alone.
    return Image.new("RGB", (width, height), (128, 128, 128))


def panels_with_images(fig) -> list:
    return [ax for ax in fig.axes if ax.get_images()]


def rendered_panel(fig, ax) -> np.ndarray:
    """The pixels of one axes as drawn on the figure's Agg canvas, as a grey-level (H, W) array."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    x0, y0, x1, y1 = ax.get_window_extent().extents
    height = rgba.shape[0]
    # Window coordinates have their origin at the bottom left; array rows start at the top.
    # Trim two pixels on each side to stay clear of antialiased borders.
    crop = rgba[int(height - y1) + 2 : int(height - y0) - 2, int(x0) + 2 : int(x1) - 2, :3]
    return crop.astype(np.float32).mean(axis=2)


@pytest.mark.parametrize("num_words", [3, 17])
def test_one_panel_per_word_plus_the_image(num_words: int) -> None:
    words = [f"w{i}" for i in range(num_words)]
    rng = np.random.default_rng(num_words)
    attention = rng.dirichlet(np.ones(GRID * GRID), size=num_words)
    fig = plot_attention(grey_image(), words, attention, columns=5, panel_size=1.0)

    panels = panels_with_images(fig)
    assert len(panels) == num_words + 1
    assert len(fig.axes) == num_words + 1  # no empty axes padding the last row
    assert [ax.get_title() for ax in panels[1:]] == words
    assert panels[0].get_title().split() == words  # the first panel carries the whole caption

    rows = {ax.get_subplotspec().get_geometry()[0] for ax in panels}
    cols = {ax.get_subplotspec().get_geometry()[1] for ax in panels}
    expected_cols = min(5, num_words + 1)
    assert cols == {expected_cols}
    assert rows == {-(-(num_words + 1) // expected_cols)}  # 17 words: 18 panels in 4 rows of 5
    # Every word panel shows the image and one overlay on top of it.
    assert all(len(ax.get_images()) == 2 for ax in panels[1:])
    assert len(panels[0].get_images()) == 1


def test_different_words_show_different_overlays_peaking_where_they_attended() -> None:
    cells = [(1, 2), (5, 6), (3, 3)]
    words = ["dog", "ball", "grass"]
    fig = plot_attention(grey_image(), words, one_hot_maps(cells), panel_size=2.0)
    panels = panels_with_images(fig)[1:]

    rendered = [rendered_panel(fig, ax) for ax in panels]
    for first in range(len(rendered)):
        for second in range(first + 1, len(rendered)):
            a, b = rendered[first], rendered[second]
            size = (min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1]))
            assert np.abs(a[: size[0], : size[1]] - b[: size[0], : size[1]]).mean() > 5.0

    for (row, col), pixels in zip(cells, rendered, strict=True):
        # The brightest pixels must sit in the block of the image that the attended cell covers.
        peak_row, peak_col = np.unravel_index(np.argmax(pixels), pixels.shape)
        assert int(peak_row * GRID / pixels.shape[0]) == row
        assert int(peak_col * GRID / pixels.shape[1]) == col
        # And the overlay really highlights it: the attended block is much brighter than the rest.
        h, w = pixels.shape
        inside = pixels[
            int(row * h / GRID) : int((row + 1) * h / GRID), int(col * w / GRID) : int((col + 1) * w / GRID)
        ]
        assert inside.mean() > pixels.mean() + 40


def test_overlays_are_normalised_upsampled_and_aligned() -> None:
    cells = [(0, 0), (2, 11), (13, 13), (7, 4)]
    maps = one_hot_maps(cells, grid=14) * 0.5 + 0.5 / 196  # not already in [0, 1]
    overlays = attention_overlays(grey_image(), maps)
    assert overlays.shape == (4, 256, 256)
    assert overlays.dtype == np.float32
    for overlay, (row, col) in zip(overlays, cells, strict=True):
        assert overlay.min() == pytest.approx(0.0) and overlay.max() == pytest.approx(1.0)
        peak_row, peak_col = np.unravel_index(np.argmax(overlay), overlay.shape)
        assert (int(peak_row * 14 / 256), int(peak_col * 14 / 256)) == (row, col)

    # Without smoothing each grid cell is an exact block of the displayed image.
    blocky = attention_overlays(None, one_hot_maps([(3, 5)]), smooth=False, image_size=64)[0]
    expected = np.zeros((64, 64), dtype=np.float32)
    expected[24:32, 40:48] = 1.0
    np.testing.assert_array_equal(blocky, expected)

    # An evenly spread map has no "where": it is shown as all ones rather than divided by zero.
    even = attention_overlays(None, np.full((1, 64), 1 / 64), image_size=32)
    np.testing.assert_array_equal(even, np.ones((1, 32, 32), dtype=np.float32))


def test_accepts_torch_tensors_grids_and_lists_of_steps() -> None:
    torch = pytest.importorskip("torch")
    maps = one_hot_maps([(1, 1), (6, 6)])
    expected = attention_overlays(None, maps)
    from_tensor = attention_overlays(None, torch.tensor(maps, requires_grad=True))
    from_grid = attention_overlays(None, maps.reshape(2, GRID, GRID))
    from_steps = attention_overlays(None, [torch.tensor(m) for m in maps])
    for other in (from_tensor, from_grid, from_steps):
        np.testing.assert_allclose(other, expected, atol=1e-6)
    # Rectangular grids are fine in the (num_words, H, W) form.
    assert attention_overlays(None, np.ones((2, 4, 6)), image_size=(60, 40)).shape == (2, 40, 60)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_any_image_mode_and_aspect_is_shown_as_the_square_rgb_model_input(mode: str) -> None:
    image = Image.new("RGB", (300, 120), (200, 40, 40)).convert(mode)
    fig = plot_attention(image, ["red"], one_hot_maps([(4, 4)]), panel_size=1.0)
    for ax in panels_with_images(fig):
        shown = ax.get_images()[0].get_array()
        assert shown.shape == (256, 256, 3)  # the processor's square, where the grid lines up
    # The caller's own size can be kept instead; the overlay follows it.
    fig = plot_attention(image, ["red"], one_hot_maps([(4, 4)]), image_size=None, panel_size=1.0)
    word_panel = panels_with_images(fig)[1]
    assert word_panel.get_images()[0].get_array().shape == (120, 300, 3)
    assert word_panel.get_images()[1].get_array().shape == (120, 300)


def test_numpy_images_float_and_channels_first() -> None:
    hwc = np.full((64, 48, 3), 0.5, dtype=np.float32)
    chw = np.moveaxis(hwc, -1, 0)
    for image in (hwc, chw, (hwc * 255).astype(np.uint8), hwc[..., 0]):
        fig = plot_attention(image, ["x"], one_hot_maps([(0, 0)]), panel_size=1.0)
        shown = fig.axes[0].get_images()[0].get_array()
        assert shown.shape == (256, 256, 3)
        assert abs(int(shown[0, 0, 0]) - 128) <= 1


def test_end_token_shown_with_its_map_and_dropped_without() -> None:
    maps = one_hot_maps([(1, 1), (2, 2), (3, 3)])
    with_map = plot_attention(grey_image(), ["a", "cat", "<end>"], maps, panel_size=1.0)
    assert [ax.get_title() for ax in with_map.axes[1:]] == ["a", "cat", "<end>"]
    assert with_map.axes[0].get_title() == "a cat"  # the caption itself leaves <end> out

    without_map = plot_attention(grey_image(), ["a", "cat", "<end>"], maps[:2], panel_size=1.0)
    assert [ax.get_title() for ax in without_map.axes[1:]] == ["a", "cat"]

    empty = plot_attention(grey_image(), [], np.zeros((0, GRID * GRID)), panel_size=1.0)
    assert len(empty.axes) == 1 and empty.axes[0].get_title() == "<image>"


def test_save_writes_a_png_of_the_expected_size(tmp_path) -> None:
    words = ["a", "man", "riding", "a", "bike", "down", "the", "road"]
    maps = np.random.default_rng(0).dirichlet(np.ones(196), size=len(words))
    path = save_attention_figure(
        tmp_path / "figures" / "caption_vis.png",
        grey_image(320, 200),
        words,
        maps,
        columns=4,
        panel_size=1.5,
        dpi=80,
    )
    assert path == tmp_path / "figures" / "caption_vis.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.load()  # decodes the whole file: it is complete and readable
        width, height = png.size
    assert width == round(4 * 1.5 * 80)  # columns * panel_size * dpi
    # Three rows of square panels plus their titles: at least the panels, and not much more.
    assert 3 * 1.5 * 80 <= height <= 3 * 1.5 * 80 * 1.5


def test_write_png_to_a_path_or_a_buffer_at_the_figures_dpi_and_clears_it(tmp_path) -> None:
    # The one way figures become PNGs (attention figures, search figures, the web demo, the model card).
    maps = np.random.default_rng(1).dirichlet(np.ones(GRID * GRID), size=2)
    sizes = []
    for target in (tmp_path / "new" / "folder" / "fig.png", io.BytesIO()):
        fig = plot_attention(grey_image(), ["a", "dog"], maps, columns=3, panel_size=1.0, dpi=50)
        write_png(fig, target)
        assert not fig.axes  # released: a script drawing thousands of figures does not grow
        data = target.read_bytes() if isinstance(target, Path) else target.getvalue()
        with Image.open(io.BytesIO(data)) as png:
            assert png.format == "PNG"
            sizes.append(png.size)
    assert sizes[0] == sizes[1] and sizes[0][0] == 3 * 50


def test_mismatched_shapes_raise_clear_errors(tmp_path) -> None:
    maps = one_hot_maps([(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="3 words but 2 attention maps"):
        plot_attention(grey_image(), ["a", "b", "c"], maps)
    with pytest.raises(ValueError, match="1 words but 2 attention maps"):
        save_attention_figure(tmp_path / "out" / "never.png", grey_image(), ["a"], maps)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
    with pytest.raises(ValueError, match="not a square grid"):
        plot_attention(grey_image(), ["a", "b"], np.ones((2, 10)))
    with pytest.raises(ValueError, match="for one image"):
        plot_attention(grey_image(), ["a", "b"], np.ones((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        attention_overlays(None, np.full((1, 4), np.nan))
    with pytest.raises(TypeError, match="sequence of words"):
        plot_attention(grey_image(), "ab", maps)
    with pytest.raises(ValueError, match="columns"):
        plot_attention(grey_image(), ["a", "b"], maps, columns=0)


def test_figure_needs_no_pyplot_and_displays_in_notebooks() -> None:
    # In a fresh interpreter, since other tests may have imported pyplot: building the figure must
    # leave the user's pyplot/backend state alone (no pyplot import), and the figure must still
    # offer a PNG for notebooks to display.
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from PIL import Image
        from show_attend_tell.visualization import plot_attention

        fig = plot_attention(Image.new("RGB", (32, 32)), ["a"], np.ones((1, 4)), panel_size=1.0)
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        png = fig._repr_png_()
        assert png.startswith(b"\\x89PNG"), png[:8]
        print("ok")
        """
    )
    repo = Path(__file__).resolve().parents[1]  # importable from the checkout even if not installed
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
