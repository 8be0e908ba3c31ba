"""Local files: parquet (ours or the hub's Flickr30K schema) and image folders with captions.

Split assignment, in order of precedence:

1. a ``split`` column (values train / validation / test or an alias such as ``val``, ``restval``);
2. otherwise the file or folder names (``train.parquet``, ``validation/0000.parquet``,
   ``data/test-00000-of-00001.parquet``, ``val/`` image sub-folders, ...).

Image folders are read by the ``imagefolder`` builder of ``datasets``: images plus a
``metadata.jsonl`` (or ``metadata.csv``) with a ``file_name`` column (relative to the metadata
file) and a ``captions`` column (a list of strings; in a CSV a JSON-encoded list, or a single
``caption`` string), optionally ``image_id`` and ``split``. Without ``image_id`` the image's file
name without extension is used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Image, Value, concatenate_datasets, load_dataset

from .common import (
    SPLIT_ALIASES,
    SPLITS,
    canonical_split,
    describe_columns,
    ensure_string_column,
    group_by_split_column,
    list_feature,
    select_splits,
)
from .flickr30k import flickr30k_to_caption_dataset, is_flickr30k_hub_schema


def _split_from_path(path: Path, root: Path) -> str | None:
    """The split a file's name or folders name, looking at the file name first, then folders."""
    relative = path.relative_to(root) if root in path.parents else Path(path.name)
    parts = [relative.stem, *reversed(relative.parts[:-1])]
    for part in parts:
        for token in re.split(r"[^a-z]+", part.lower()):
            if token in SPLIT_ALIASES:
                return SPLIT_ALIASES[token]
    return None


def _parse_captions(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            # CSV cannot hold lists: a JSON-encoded list is the documented way.
            return [str(item) for item in json.loads(text)]
        return [text] if text else []
    return [str(item) for item in value]  # type: ignore[union-attr]


def _standardize(dataset: Dataset, split: str, source: str) -> Dataset:
    """Bring one split to our columns: ``image`` (Image), ``captions`` (list), ``image_id`` (str)."""
    columns = dataset.column_names
    if "image" not in columns:
        raise ValueError(
            f"{source}: no 'image' column in split {split!r}; expected columns 'image', 'captions' "
            f"(or 'caption') and optionally 'image_id' and 'split', found {describe_columns(columns)}."
        )
    if not isinstance(dataset.features["image"], Image):
        # Parquet written by other tools: a {bytes, path} struct or a path string.
        dataset = dataset.cast_column("image", Image())

    caption_column = "captions" if "captions" in columns else "caption" if "caption" in columns else None
    if caption_column is None:
        raise ValueError(
            f"{source}: no 'captions' (or 'caption') column in split {split!r}; found "
            f"{describe_columns(columns)}. Image folders need a metadata.jsonl/metadata.csv with "
            "'file_name' and 'captions'."
        )
    if dataset.features[caption_column] != list_feature(Value("string")):
        dataset = dataset.map(
            lambda batch: {"captions": [_parse_captions(v) for v in batch[caption_column]]},
            batched=True,
            remove_columns=[caption_column],
            desc="captions to lists",
        )
        dataset = dataset.cast_column("captions", list_feature(Value("string")))
    elif caption_column == "caption":
        dataset = dataset.rename_column("caption", "captions")

    if "image_id" not in dataset.column_names:
        for alias in ("img_id", "imgid", "filename", "file_name"):
            if alias in dataset.column_names:
                dataset = dataset.rename_column(alias, "image_id")
                break
        else:
            # The image's own file name is the most meaningful id a folder of images has.
            paths = dataset.cast_column("image", Image(decode=False)).select_columns(["image"])["image"]
            ids = [
                Path(item["path"]).stem if item and item.get("path") else f"{split}-{row:06d}"
                for row, item in enumerate(paths)
            ]
            dataset = dataset.add_column("image_id", ids)
    return ensure_string_column(dataset, "image_id")


def _to_caption_splits(raw: Mapping[str, Dataset], source: str) -> dict[str, Dataset]:
    """Split names, split column and schema detection shared by the parquet and folder loaders."""
    parts = list(raw.values())
    if not parts:
        raise ValueError(f"{source}: no data was loaded.")
    if is_flickr30k_hub_schema(parts[0].column_names):
        return dict(flickr30k_to_caption_dataset(raw, source=source))
    if "split" in parts[0].column_names:
        table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        grouped = group_by_split_column(table, "split", source=source)
    else:
        grouped = {}
        for name, part in raw.items():
            canonical = canonical_split(name, where=f"split name in {source}")
            grouped[canonical] = (
                concatenate_datasets([grouped[canonical], part]) if canonical in grouped else part
            )
    return {name: _standardize(part, name, source) for name, part in grouped.items()}


def load_parquet_captions(
    path: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    splits: str | Iterable[str] | None = None,
    max_samples_per_split: int | None = None,
) -> DatasetDict:
    """Load caption data from parquet file(s) or a folder of them (searched recursively).

    Both our schema (``image``, ``captions``, ``image_id``, extra columns kept) and the hub's
    Flickr30K schema (``caption``, ``split``, ``img_id``, ...) are accepted; the latter is detected
    and mapped by :func:`flickr30k_to_caption_dataset`.

    Raises:
        FileNotFoundError: no parquet file at ``path``.
        ValueError: the split of some rows cannot be told, or columns are missing.
    """
    if isinstance(path, (str, os.PathLike)):
        root = Path(path).expanduser()
        if root.is_dir():
            files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
        elif root.is_file():
            files, root = [root], root.parent
        else:
            raise FileNotFoundError(f"No parquet file or folder at {root}")
    else:
        files = [Path(p).expanduser() for p in path]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"Parquet file not found: {file}")
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path()
    if not files:
        raise FileNotFoundError(f"No .parquet files under {root}")
    source = str(path) if isinstance(path, (str, os.PathLike)) else str(root)

    by_split: dict[str, list[str]] = {}
    unassigned: list[str] = []
    for file in files:
        split = _split_from_path(file, root)
        if split is None:
            unassigned.append(str(file))
        else:
            by_split.setdefault(split, []).append(str(file))
    if unassigned and by_split:
        raise ValueError(
            f"{source}: cannot tell the split of {len(unassigned)} file(s), e.g. {unassigned[0]}; name "
            f"files or folders after the splits {list(SPLITS)} (or val, dev, restval) for all files."
        )
    data_files = by_split or {"unsplit": unassigned}
    raw = load_dataset(
        "parquet", data_files=data_files, cache_dir=None if cache_dir is None else str(cache_dir)
    )
    columns = next(iter(raw.values())).column_names
    if "unsplit" in raw and "split" not in columns:
        raise ValueError(
            f"{source}: cannot tell which split each row belongs to; expected file or folder names "
            f"containing {list(SPLITS)} (or val, dev, restval), or a 'split' column (found "
            f"{describe_columns(columns)})."
        )
    return select_splits(_to_caption_splits(raw, source), splits, max_samples_per_split, source=source)


def load_image_folder_captions(
    directory: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    splits: str | Iterable[str] | None = None,
    max_samples_per_split: int | None = None,
) -> DatasetDict:
    """Load an image folder with a captions metadata file (see the module documentation).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: there is no metadata with captions, or a split is missing or unknown.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    raw = load_dataset(
        "imagefolder", data_dir=str(root), cache_dir=None if cache_dir is None else str(cache_dir)
    )
    return select_splits(_to_caption_splits(raw, str(root)), splits, max_samples_per_split, source=str(root))


def embed_image_bytes_table(table: pa.Table, column: str = "image") -> pa.Table:
    """Replace image paths by the files' bytes in an arrow table of Image storage structs."""
    index = table.schema.get_field_index(column)
    items = table.column(column).to_pylist()
    embedded = []
    for item in items:
        if item is not None and item.get("bytes") is None and item.get("path"):
            with open(item["path"], "rb") as handle:
                # Keep only the file name: the extension tells decoders the format, and a local
                # absolute path means nothing on another machine.
                item = {"bytes": handle.read(), "path": os.path.basename(item["path"])}
        embedded.append(item)
    return table.set_column(index, table.field(index), pa.array(embedded, type=table.field(index).type))


def write_parquet(
    dataset: Mapping[str, Dataset],
    directory: str | os.PathLike,
    *,
    max_rows_per_file: int | None = None,
    batch_size: int = 256,
) -> list[Path]:
    """Write each split as parquet with the image bytes embedded (``Dataset.to_parquet`` would
    store only the paths of images loaded from files).

    Files are ``<split>-00000-of-0000N.parquet`` in ``directory``, the layout the hub uses and
    :func:`load_parquet_captions` reads back with the same splits and features.

    Returns:
        The written files.
    """
    out_dir = Path(directory).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, split in dataset.items():
        schema = split.features.arrow_schema  # carries the features, so Image() survives a reload
        rows = len(split)
        per_file = max(1, max_rows_per_file or rows or 1)
        shards = max(1, -(-rows // per_file))
        image_columns = [key for key, feature in split.features.items() if isinstance(feature, Image)]
        for shard in range(shards):
            target = out_dir / f"{name}-{shard:05d}-of-{shards:05d}.parquet"
            part = split.select(range(shard * per_file, min(rows, (shard + 1) * per_file)))
            with pq.ParquetWriter(str(target), schema) as writer:
                for table in part.with_format("arrow").iter(batch_size=batch_size):
                    for column in image_columns:
                        table = embed_image_bytes_table(table, column)
                    writer.write_table(table.cast(schema))
                if len(part) == 0:
                    writer.write_table(schema.empty_table())
            written.append(target)
    return written
