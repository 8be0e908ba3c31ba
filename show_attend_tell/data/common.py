"""Schema, split names and helpers shared by every caption-dataset source.

Every loader in this package returns a :class:`datasets.DatasetDict` whose splits are named
``train``, ``validation`` and ``test`` and whose rows have at least these columns:

``image``
    a :class:`datasets.Image` feature (decodes to a PIL image),
``captions``
    a list of caption strings (five per image for Flickr30K and the synthetic data),
``image_id``
    a string that identifies the image uniquely within its split (used by the evaluation).

Sources may add columns (the synthetic data adds ``objects``); consumers ignore the ones they do not use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Image, Value

try:  # datasets >= 4 spells a list feature ``List``; 3.x only understands the list literal.
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - exercised only with datasets 3.x
    _ListFeature = None

#: Split names of every returned DatasetDict, in this order.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Accepted spellings of split names (file names, a ``split`` column, the ``splits=`` argument).
#: ``restval`` is Karpathy's "rest of the validation images"; by his convention they are trained on.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "restval": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def list_feature(feature: object) -> object:
    """A variable-length list feature that works with datasets 3.x and later."""
    return _ListFeature(feature) if _ListFeature is not None else [feature]


#: The columns every source provides.
CAPTION_FEATURES = Features(
    {"image": Image(), "captions": list_feature(Value("string")), "image_id": Value("string")}
)


def canonical_split(name: str, *, where: str = "split name") -> str:
    """Map a split name or alias (``val``, ``restval``, ...) to train / validation / test.

    Raises:
        ValueError: naming the accepted spellings, when ``name`` is none of them.
    """
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(
            f"Unknown {where} {name!r}: expected one of {list(SPLITS)} "
            f"(aliases accepted: {sorted(set(SPLIT_ALIASES) - set(SPLITS))})."
        )
    return SPLIT_ALIASES[key]


def resolve_requested_splits(splits: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise the ``splits=`` argument of the loaders to a tuple of canonical names."""
    if splits is None:
        return SPLITS
    if isinstance(splits, str):
        splits = [splits]
    resolved: list[str] = []
    for name in splits:
        canonical = canonical_split(name, where="requested split")
        if canonical not in resolved:
            resolved.append(canonical)
    if not resolved:
        raise ValueError(f"splits= selected no split; expected a subset of {list(SPLITS)}.")
    return tuple(name for name in SPLITS if name in resolved)


def select_splits(
    dataset: Mapping[str, Dataset],
    splits: str | Iterable[str] | None = None,
    max_samples_per_split: int | None = None,
    *,
    source: str = "the dataset",
) -> DatasetDict:
    """Keep the requested splits (all three by default), in train/validation/test order.

    Args:
        dataset: split name -> Dataset (split names already canonical).
        splits: the splits to keep; aliases such as ``"val"`` are accepted.
        max_samples_per_split: keep only the first N rows of each split (for smoke runs);
            the first rows rather than a random sample so that runs are reproducible.
        source: how error messages name where the data came from.

    Raises:
        ValueError: when a requested split is absent, naming the splits that exist.
    """
    wanted = resolve_requested_splits(splits)
    missing = [name for name in wanted if name not in dataset]
    if missing:
        raise ValueError(
            f"{source} has no {missing} split (found splits: {sorted(dataset)}); expected "
            f"{list(wanted)}. Pass splits=[...] to load only some of them."
        )
    if max_samples_per_split is not None and max_samples_per_split < 1:
        raise ValueError(f"max_samples_per_split must be a positive integer, got {max_samples_per_split}.")
    out = DatasetDict()
    for name in wanted:
        split = dataset[name]
        if max_samples_per_split is not None and len(split) > max_samples_per_split:
            split = split.select(range(max_samples_per_split))
        out[name] = split
    return out


def group_by_split_column(dataset: Dataset, column: str = "split", *, source: str) -> dict[str, Dataset]:
    """Partition rows by a split column (values such as train/val/test/restval).

    Only the split column is read, so images are not decoded; each part is an index selection
    of ``dataset`` (no copy). The split column itself is dropped from the parts.
    """
    values = dataset.select_columns([column])[column]
    indices: dict[str, list[int]] = {}
    unknown: dict[str, int] = {}
    for row, value in enumerate(values):
        key = str(value).strip().lower()
        if key in SPLIT_ALIASES:
            indices.setdefault(SPLIT_ALIASES[key], []).append(row)
        else:
            unknown[str(value)] = unknown.get(str(value), 0) + 1
    if unknown:
        raise ValueError(
            f"{source}: unknown values in the {column!r} column: {unknown} (value: row count); "
            f"expected {list(SPLITS)} or the aliases {sorted(set(SPLIT_ALIASES) - set(SPLITS))}."
        )
    rest = dataset.remove_columns([column])
    return {name: rest.select(rows) for name, rows in indices.items()}


def resolve_cache_root(subdir: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where this package caches generated data.

    ``cache_dir`` wins; otherwise ``$SHOW_ATTEND_TELL_CACHE/<subdir>``; otherwise
    ``~/.cache/show_attend_tell/<subdir>``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("SHOW_ATTEND_TELL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "show_attend_tell"
    return base / subdir


def ensure_string_column(dataset: Dataset, column: str) -> Dataset:
    """Cast a column to string (image ids are ints in some sources, strings in others)."""
    if dataset.features[column] != Value("string"):
        dataset = dataset.cast_column(column, Value("string"))
    return dataset


def describe_columns(names: Sequence[str]) -> str:
    """Column list for error messages."""
    return ", ".join(repr(name) for name in names)
