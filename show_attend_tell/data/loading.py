"""The one entry point that every script uses: :func:`load_caption_dataset`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import DatasetDict

from ..image_processing_show_attend_tell import image_files
from .common import select_splits
from .flickr30k import FLICKR30K_REPO_ID, load_flickr30k
from .karpathy import load_karpathy_json
from .local import load_image_folder_captions, load_parquet_captions
from .synthetic import SYNTHETIC_DEFAULT_SIZES, make_synthetic_dataset

if TYPE_CHECKING:
    import argparse

#: Source names that are not paths. ``karpathy``, ``parquet`` and ``imagefolder`` take the path
#: from ``data_dir``; a path given directly as the source is recognised by what it contains.
NAMED_SOURCES: tuple[str, ...] = ("synthetic", "flickr30k", "karpathy", "parquet", "imagefolder")


#: The `--help` of `--dataset-option` in every script: the meaning that :func:`parse_dataset_options` gives it.
DATASET_OPTION_HELP = (
    "an option of the dataset loader as KEY=VALUE, repeatable (a later KEY replaces an earlier one): VALUE is read "
    'as JSON when it is JSON (64, 0.5, true, false, null, [1, 2], "text"), else as plain text (revision=main); '
    "e.g. image_size=64 or num_test=100 for synthetic"
)
# Python's and other spellings of JSON's true/false/null: read as text they would be silently truthy strings.
_LITERAL_LOOKALIKES = {"true": "true", "false": "false", "none": "null", "null": "null"}


def add_dataset_option_argument(parser: argparse._ActionsContainer) -> None:
    """Declares `--dataset-option KEY=VALUE` (repeatable) on a parser or argument group, with its meaning in
    `--help`; :func:`parse_dataset_options` reads what it collects (`args.dataset_option`)."""
    parser.add_argument(
        "--dataset-option", action="append", default=[], metavar="KEY=VALUE", help=DATASET_OPTION_HELP
    )


def parse_dataset_options(items: Iterable[str]) -> dict[str, Any]:
    """
    The `--dataset-option KEY=VALUE` items of a command line as keyword arguments of
    :func:`load_caption_dataset`, with one meaning in every script: VALUE is read as JSON when it parses
    (``num_train=400`` -> 400, ``use_cache=false`` -> False, ``revision=null`` -> None, ``sizes=[1, 2]`` -> a
    list), else kept as plain text (``revision=main`` -> "main"); text after the first ``=`` is the value. A
    later KEY replaces an earlier one.

    Raises:
        ValueError: an item without ``=``, a KEY that is not a name (``image_size``), or a VALUE spelt like
            JSON's true, false or null but not quite (``True``, ``None``): as text it would count as true.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(
                f"--dataset-option expects KEY=VALUE (KEY a name such as image_size), got {item!r}"
            )
        try:
            options[key] = json.loads(text)
        except ValueError:  # not JSON: plain text
            meant = _LITERAL_LOOKALIKES.get(text.strip().lower())
            if meant is not None:
                raise ValueError(
                    f"--dataset-option {item!r}: VALUE is read as JSON, so write {key}={meant}"
                ) from None
            options[key] = text
    return options


def _find_karpathy_json(directory: Path) -> Path | None:
    candidates = sorted(directory.glob("dataset_*.json"))
    return candidates[0] if len(candidates) == 1 else None


def _has_images(directory: Path) -> bool:
    return bool(image_files(directory))


def _reject(option: str, value: object, source: str) -> None:
    if value is not None:
        raise ValueError(f"{option}= is not used by the {source!r} source (got {value!r}).")


def load_caption_dataset(
    source: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    splits: str | Iterable[str] | None = None,
    max_samples_per_split: int | None = None,
    **source_options: Any,
) -> DatasetDict:
    """Load an image-captioning dataset as train / validation / test with ``image``, ``captions``
    (list of strings) and ``image_id`` (string) columns.

    Args:
        source: one of

            * ``"synthetic"``: generated coloured shapes (:func:`make_synthetic_dataset`; options
              ``num_train``, ``num_validation``, ``num_test``, ``image_size``, ``use_cache``);
              adds an ``objects`` column with the boxes;
            * ``"flickr30k"``: Flickr30K, Karpathy splits, from the datasets hub
              (:func:`load_flickr30k`; options ``repo_id``, ``revision`` and any
              ``datasets.load_dataset`` argument); ``data_dir`` = a local copy of the hub
              repository's parquet branch instead;
            * a path to a Karpathy split JSON (``dataset_flickr30k.json``); ``image_dir`` defaults
              to ``images/`` next to it;
            * a path to a parquet file or a folder of them (ours or the hub's Flickr30K schema);
            * a path to an image folder with a ``metadata.jsonl``/``metadata.csv`` holding
              ``file_name`` and ``captions``;
            * ``"karpathy"``, ``"parquet"`` or ``"imagefolder"`` with the path in ``data_dir``.

            A folder holding parquet files is read as parquet; else one holding a single
            ``dataset_*.json`` as Karpathy JSON (images in ``images/``); else as an image folder.
        data_dir: the path for the named sources that read files.
        image_dir: the image folder of a Karpathy JSON.
        cache_dir: cache of the synthetic data, or the ``datasets`` cache for the other sources.
        seed: seed of the synthetic data (unused by the others).
        splits: which of train / validation / test to return (default all three; ``val`` etc. accepted).
        max_samples_per_split: keep only the first N images of each split (smoke runs); the
            synthetic source then generates only N.
        **source_options: passed to the source's loader (see above).

    Raises:
        ValueError: unknown source, options that the source does not use, unknown or missing splits.
        FileNotFoundError: a path that does not exist, or images listed but missing.
    """
    name = os.fspath(source)
    key = name.strip().lower()
    if key == "synthetic":
        return _load_synthetic(
            data_dir, image_dir, cache_dir, seed, splits, max_samples_per_split, source_options
        )
    if key == "flickr30k":
        _reject("image_dir", image_dir, key)
        return _load_flickr30k_source(data_dir, cache_dir, splits, max_samples_per_split, source_options)
    path, kind = _source_path(name, key, data_dir)
    if not kind:
        kind = _file_kind(path)
    options = {"splits": splits, "max_samples_per_split": max_samples_per_split}
    if kind == "karpathy":
        return load_karpathy_json(_karpathy_json_path(path), image_dir, **options, **source_options)
    _reject("image_dir", image_dir, kind)
    if kind == "parquet":
        return load_parquet_captions(path, cache_dir=cache_dir, **options, **source_options)
    return load_image_folder_captions(path, cache_dir=cache_dir, **options, **source_options)


def _load_synthetic(
    data_dir: str | os.PathLike | None,
    image_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    seed: int,
    splits: str | Iterable[str] | None,
    max_samples_per_split: int | None,
    source_options: dict[str, Any],
) -> DatasetDict:
    """The ``"synthetic"`` source: generated pictures, only as many per split as will be kept."""
    _reject("data_dir", data_dir, "synthetic")
    _reject("image_dir", image_dir, "synthetic")
    if max_samples_per_split is not None:
        # Pictures are generated per index, so the first N are the same as in the full set.
        for split, default in SYNTHETIC_DEFAULT_SIZES.items():
            option = f"num_{split}"
            source_options[option] = min(source_options.get(option, default), max_samples_per_split)
    dataset = make_synthetic_dataset(seed=seed, cache_dir=cache_dir, **source_options)
    return select_splits(dataset, splits, max_samples_per_split, source="synthetic")


def _load_flickr30k_source(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    splits: str | Iterable[str] | None,
    max_samples_per_split: int | None,
    source_options: dict[str, Any],
) -> DatasetDict:
    """The ``"flickr30k"`` source: the hub repository, or a local copy of it in ``data_dir``."""
    repo_id = source_options.pop("repo_id", FLICKR30K_REPO_ID)
    if data_dir is not None:
        local = Path(data_dir).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(f"data_dir for 'flickr30k' is not a folder: {local}")
        repo_id = str(local)
    return load_flickr30k(
        repo_id=repo_id,
        cache_dir=cache_dir,
        splits=splits,
        max_samples_per_split=max_samples_per_split,
        **source_options,
    )


def _source_path(name: str, key: str, data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The existing path that a file source reads, and its kind when the source names it ("" when the
    path itself is the source and its contents will tell)."""
    if key in ("karpathy", "parquet", "imagefolder"):
        if data_dir is None:
            raise ValueError(f"The {key!r} source needs data_dir= (the path to read).")
        path = Path(data_dir).expanduser()
        kind = key
    else:
        if data_dir is not None:
            raise ValueError(
                f"data_dir= is only used with the named sources {list(NAMED_SOURCES)}; got source {name!r}."
            )
        path = Path(name).expanduser()
        if not path.exists():
            looks_like_path = os.sep in name or "/" in name or path.suffix != ""
            if looks_like_path:
                raise FileNotFoundError(f"Dataset path not found: {path}")
            raise ValueError(
                f"Unknown dataset source {name!r}: expected one of {list(NAMED_SOURCES)}, or a path to a "
                "Karpathy split JSON, a parquet file or folder, or an image folder with captions."
            )
        kind = ""
    if not path.exists():
        raise FileNotFoundError(f"Dataset path not found: {path}")
    return path, kind


def _file_kind(path: Path) -> str:
    """What an existing path given as the source holds: "karpathy", "parquet" or "imagefolder"."""
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "karpathy"
        if path.suffix.lower() == ".parquet":
            return "parquet"
        raise ValueError(
            f"Cannot load {path}: expected a Karpathy split JSON (.json), a .parquet file, "
            "or a folder of parquet files or of images with captions."
        )
    if any(path.rglob("*.parquet")):
        return "parquet"
    if _find_karpathy_json(path) is not None:
        return "karpathy"
    if _has_images(path):
        return "imagefolder"
    raise ValueError(f"Cannot load {path}: found no parquet files, no dataset_*.json and no images in it.")


def _karpathy_json_path(path: Path) -> Path:
    """The split JSON itself, or the one dataset_*.json of a folder."""
    if not path.is_dir():
        return path
    found = _find_karpathy_json(path)
    if found is None:
        raise FileNotFoundError(f"Expected exactly one dataset_*.json in {path}.")
    return found
