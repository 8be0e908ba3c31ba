"""Synthetic captioning data: coloured shapes with captions and object boxes.

Each picture shows one to three non-overlapping filled shapes on a light, slightly noisy
background. Five differently worded captions name every object (size, colour, shape) and the
spatial relations between them, and the ``objects`` column stores each object's box, so that the
attention of the decoding step that emits a shape word can be compared with where the shape is.

Design choices that the demo and its checks rely on:

* Shape, colour, size and relation words are single lower-case words, so a word-level tokenizer
  gives exactly one token per shape word.
* The shapes in one picture are all different, so a shape word identifies exactly one box.
* A small object spans at least ``image_size / 8`` pixels, so every box contains the centre of at
  least one cell of an 8 x 8 attention grid.
* Shapes are drawn without anti-aliasing in colours that cannot occur in the background, and each
  shape touches all four sides of its box, so the box is exactly where the object's pixels are.
* Every picture comes from its own random generator seeded with ``(seed, split, index)``: the
  first N pictures of a split do not depend on how many are generated.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the stored image, ``x1``/``y1`` exclusive
(``image[y0:y1, x0:x1]`` is the box).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from .common import SPLITS, list_feature, resolve_cache_root

#: Shape words (single tokens).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Colour words (single tokens).
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
#: Size words (single tokens).
SIZES: tuple[str, ...] = ("small", "large")
#: Relation words that appear in captions.
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

#: RGB value of each colour. Every one has a channel <= 60 while the background has all channels
#: >= 200, so object pixels and background pixels can never be confused.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 30),
}
#: Side of each size class as a fraction of the image side.
SIZE_FRACTION: dict[str, float] = {"small": 0.2, "large": 0.36}

#: Bump when the pictures, captions or the cache's file layout change, so stale caches are not reused.
#: (2: one Arrow file per split instead of `save_to_disk`, which printed progress bars on every run.)
SYNTHETIC_VERSION = 2
#: Default split sizes: enough for a small model to learn the task in a ~3-minute CPU demo.
SYNTHETIC_DEFAULT_SIZES: dict[str, int] = {"train": 4000, "validation": 250, "test": 250}
#: Default image side in pixels (the demo's size; 256 also works).
SYNTHETIC_DEFAULT_IMAGE_SIZE = 64
#: Smallest supported image side: below it small shapes become unrecognisable blobs.
MIN_IMAGE_SIZE = 32

_BACKGROUND_RANGE = (205, 246)  # per-channel base colour of the background, light
_NOISE_AMPLITUDE = 6  # +- per noise block, only on the background
_GAP = 2  # minimum empty pixels between two boxes, so shapes never touch
_MARGIN = 1  # minimum empty pixels between a box and the border
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

SYNTHETIC_FEATURES = Features(
    {
        "image": Image(),
        "captions": list_feature(Value("string")),
        "image_id": Value("string"),
        "objects": list_feature(
            {
                "shape": Value("string"),
                "color": Value("string"),
                "size": Value("string"),
                "box": list_feature(Value("int32")),
            }
        ),
    }
)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; ``box`` is [x0, y0, x1, y1] with exclusive x1, y1."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def as_dict(self) -> dict[str, object]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}


def object_side(size: str, image_size: int) -> int:
    """Side in pixels of a shape of the given size class (at least one 8 x 8 grid cell)."""
    return max(math.ceil(image_size / 8), round(SIZE_FRACTION[size] * image_size))


# ---------------------------------------------------------------------------------------------
# Layout


def _overlaps(box: tuple[int, int, int, int], others: Sequence[ShapeObject]) -> bool:
    x0, y0, x1, y1 = box
    for other in others:
        a0, b0, a1, b1 = other.box
        if x0 < a1 + _GAP and a0 < x1 + _GAP and y0 < b1 + _GAP and b0 < y1 + _GAP:
            return True
    return False


def _sample_objects(rng: np.random.Generator, image_size: int) -> list[ShapeObject]:
    count = int(rng.integers(1, 4))
    # Distinct shapes per picture: a shape word then points at exactly one box.
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    colors = [COLORS[i] for i in rng.integers(0, len(COLORS), size=count)]
    sizes = [SIZES[i] for i in rng.integers(0, len(SIZES), size=count)]
    # Large ones first: they are the hard ones to fit once others are placed.
    order = sorted(range(count), key=lambda i: sizes[i] != "large")
    placed: list[ShapeObject] = []
    for i in order:
        for size in (sizes[i], "small") if sizes[i] == "large" else (sizes[i],):
            side = object_side(size, image_size)
            high = image_size - _MARGIN - side
            box = None
            for _ in range(64):
                x0, y0 = (int(v) for v in rng.integers(_MARGIN, high + 1, size=2))
                candidate = (x0, y0, x0 + side, y0 + side)
                if not _overlaps(candidate, placed):
                    box = candidate
                    break
            if box is not None:
                placed.append(ShapeObject(shapes[i], colors[i], size, box))
                break
        # An object that fits nowhere is dropped; the first one always fits.
    return placed


# ---------------------------------------------------------------------------------------------
# Drawing


def _star_unit_polygon() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.42
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*points, strict=True)
    # Stretch to the unit square so the star touches all four sides of its box.
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points]


_STAR = _star_unit_polygon()


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x0, y0, x1, y1 = obj.box
    right, bottom = x1 - 1, y1 - 1  # PIL's coordinates are inclusive
    fill = COLOR_RGB[obj.color]
    if obj.shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=fill)
    elif obj.shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0, bottom), (right, bottom), ((x0 + right) / 2, y0)], fill=fill)
    elif obj.shape == "star":
        w, h = right - x0, bottom - y0
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _STAR], fill=fill)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"unknown shape {obj.shape!r}")


def _render(rng: np.random.Generator, objects: Sequence[ShapeObject], image_size: int) -> bytes:
    base = rng.integers(_BACKGROUND_RANGE[0], _BACKGROUND_RANGE[1], size=3)
    # Noise in blocks of image_size/32 pixels: per-pixel noise makes the PNGs 3x (64 px) to 20x
    # (256 px) larger, and the cache with them, for no benefit to the model.
    block = max(1, image_size // 32)
    cells = -(-image_size // block)
    noise = rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=(cells, cells, 3))
    noise = np.repeat(np.repeat(noise, block, axis=0), block, axis=1)[:image_size, :image_size]
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = PILImage.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    buffer = io.BytesIO()
    # Level 1: ~3x faster than the default for a few percent more bytes.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Captions

_LONG_RELATION = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_SHORT_RELATION = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_REGION = {
    ("top", "left"): "in the top left corner",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right corner",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the middle",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left corner",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right corner",
}


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b`` along the axis on which they are further apart."""
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def _region(obj: ShapeObject, image_size: int) -> str:
    cx, cy = obj.center
    third = image_size / 3
    col = ("left", "center", "right")[min(2, int(cx // third))]
    row = ("top", "middle", "bottom")[min(2, int(cy // third))]
    return _REGION[(row, col)]


def make_captions(objects: Sequence[ShapeObject], image_size: int) -> list[str]:
    """Five differently worded captions naming every object (size, colour, shape) and relations."""
    # Objects in left-to-right order, so "from left to right" and the relations stay true.
    objs = sorted(objects, key=lambda o: o.center)
    if len(objs) == 1:
        (a,) = objs
        where = _region(a, image_size)
        captions = [
            f"a {a.phrase}",
            f"a {a.phrase} {where}",
            f"there is one {a.phrase} in the picture",
            f"a single {a.phrase} on a light background",
            f"the picture shows a {a.phrase} {where}",
        ]
    elif len(objs) == 2:
        a, b = objs
        rel = relation(a, b)
        inv = relation(b, a)
        captions = [
            f"a {a.phrase} {_SHORT_RELATION[rel]} a {b.phrase}",
            f"there is a {b.phrase} {_LONG_RELATION[inv]} a {a.phrase}",
            f"a {a.phrase} and a {b.phrase}",
            f"the {a.phrase} is {_LONG_RELATION[rel]} the {b.phrase}",
            f"two shapes: a {b.phrase} and a {a.phrase}",
        ]
    elif len(objs) == 3:
        a, b, c = objs
        captions = [
            f"a {a.phrase}, a {b.phrase} and a {c.phrase}",
            f"from left to right: a {a.phrase}, a {b.phrase} and a {c.phrase}",
            f"a {a.phrase} {_SHORT_RELATION[relation(a, b)]} a {b.phrase}, "
            f"which is {_SHORT_RELATION[relation(b, c)]} a {c.phrase}",
            f"three shapes: a {c.phrase}, a {b.phrase} and a {a.phrase}",
            f"there is a {a.phrase} {_LONG_RELATION[relation(a, b)]} a {b.phrase} "
            f"and a {c.phrase} {_LONG_RELATION[relation(c, b)]} it",
        ]
    else:  # pragma: no cover - the sampler draws 1 to 3 objects
        raise ValueError(f"expected 1 to 3 objects, got {len(objs)}")
    return captions


# ---------------------------------------------------------------------------------------------
# Generation and cache


def generate_example(seed: int, split: str, index: int, image_size: int) -> dict[str, object]:
    """One row of the synthetic dataset (PNG bytes, captions, id, objects), deterministic."""
    rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])
    objects = _sample_objects(rng, image_size)
    png = _render(rng, objects, image_size)
    return {
        "image": {"bytes": png, "path": None},
        "captions": make_captions(objects, image_size),
        "image_id": f"synthetic-{split}-{index:06d}",
        "objects": [obj.as_dict() for obj in objects],
    }


def _generate_split(seed: int, split: str, count: int, image_size: int) -> Dataset:
    rows = [generate_example(seed, split, i, image_size) for i in range(count)]
    columns = {name: [row[name] for row in rows] for name in SYNTHETIC_FEATURES}
    return Dataset.from_dict(columns, features=SYNTHETIC_FEATURES)


def _write_arrow_files(dataset: DatasetDict, folder: Path) -> None:
    """One Arrow stream file per split, `<split>.arrow`, the features in its schema (what `Dataset.from_file`
    reads back). Written directly rather than with `save_to_disk`, which draws a progress bar per split."""
    folder.mkdir()
    for name, split in dataset.items():
        schema = split.features.arrow_schema
        with (
            pa.OSFile(str(folder / f"{name}.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, schema) as writer,
        ):
            for table in split.with_format("arrow").iter(batch_size=256):
                writer.write_table(table.cast(schema))


def _read_arrow_files(folder: Path) -> DatasetDict:
    """The splits written by `_write_arrow_files`, memory-mapped."""
    return DatasetDict({name: Dataset.from_file(str(folder / f"{name}.arrow")) for name in SPLITS})


def synthetic_cache_path(
    cache_dir: str | os.PathLike | None, *, sizes: dict[str, int], image_size: int, seed: int
) -> Path:
    """The folder that holds (or will hold) the dataset for these parameters."""
    counts = "-".join(f"{name}{sizes[name]}" for name in SPLITS)
    name = f"v{SYNTHETIC_VERSION}-{image_size}px-seed{seed}-{counts}"
    return resolve_cache_root("synthetic", cache_dir) / name


def make_synthetic_dataset(
    num_train: int = SYNTHETIC_DEFAULT_SIZES["train"],
    num_validation: int = SYNTHETIC_DEFAULT_SIZES["validation"],
    num_test: int = SYNTHETIC_DEFAULT_SIZES["test"],
    image_size: int = SYNTHETIC_DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    use_cache: bool = True,
) -> DatasetDict:
    """Generate (or load from the disk cache) the synthetic shapes dataset.

    Args:
        num_train, num_validation, num_test: split sizes (0 gives an empty split).
        image_size: side of the square pictures in pixels (>= 32; 64 for the demo, 256 works).
        seed: the same seed gives byte-identical pictures and identical captions.
        cache_dir: folder of the cache; default ``$SHOW_ATTEND_TELL_CACHE/synthetic`` or
            ``~/.cache/show_attend_tell/synthetic``. One sub-folder per parameter set and
            :data:`SYNTHETIC_VERSION`.
        use_cache: False generates in memory and writes nothing.

    Returns:
        train / validation / test with columns ``image`` (PNG bytes embedded, so ``to_parquet``
        is self-contained), ``captions`` (5 strings), ``image_id`` and ``objects`` (list of
        ``{"shape", "color", "size", "box": [x0, y0, x1, y1]}``, x1/y1 exclusive).
    """
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for name, count in sizes.items():
        if int(count) != count or count < 0:
            raise ValueError(f"num_{name} must be a non-negative integer, got {count!r}.")
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}.")
    sizes = {name: int(count) for name, count in sizes.items()}
    image_size, seed = int(image_size), int(seed)

    if not use_cache:
        return DatasetDict({name: _generate_split(seed, name, sizes[name], image_size) for name in SPLITS})

    path = synthetic_cache_path(cache_dir, sizes=sizes, image_size=image_size, seed=seed)
    stale = False
    if path.is_dir():
        try:
            cached = _read_arrow_files(path)
            if {n: len(cached[n]) for n in SPLITS} == sizes:
                return cached
        except (OSError, ValueError):
            pass
        stale = True  # a damaged or foreign folder: replace it below
    dataset = DatasetDict({name: _generate_split(seed, name, sizes[name], image_size) for name in SPLITS})
    # Write next to the target and rename, so a concurrent reader never sees a partial folder.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _write_arrow_files(dataset, tmp)
    if stale:
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:
        # Another process finished first; its copy is identical, keep it.
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_arrow_files(path)
