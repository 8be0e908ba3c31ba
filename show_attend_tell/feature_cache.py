"""Encoder features on disk: one format and one key for training and for text-to-image search.

Training with a frozen encoder (`show_attend_tell.training`) reads every picture's features in each epoch after
the first; search (`show_attend_tell.retrieval`) reads a gallery's features for every query. Both keep them in
this cache, under a key from :func:`feature_cache_key`.

Layout of one cache folder (`<root>/<key>/`):

- `features.npy`: `(rows, channels, height, width)`, the ResNet's last feature map at its *native* grid
  (8 x 8 for ResNet-101 at 256 px). Pooling to the model's `encoded_image_size` (14 x 14 in the
  specification) happens when the features are used: pooling 8 x 8 up to 14 x 14 only repeats values, so
  storing the pooled map would take 3 times the disk for nothing. float16 (training's choice: Flickr30K's
  29,000 training images take 29,000 x 2048 x 64 x 2 bytes = 7.6 GB) or float32 (search's: a randomly
  initialised ResNet's features overflow float16, and scores should not depend on the cache).
- `status.npy`: one byte per row: 0 not cached yet, 1 cached, 2 the image cannot be decoded.
- `ids.json` (optional): the picture of each row, for caches of a picture collection.
- `meta.json`: the shape, the dtype and what the key was computed from, for people looking at the folder.

Both `.npy` files are memory-mapped: a reader takes only the rows it needs (a two-stage search reads its 20
candidates, not the collection), and rows are written as they are encoded, so a run that is interrupted keeps
what it had encoded. A row's status is set only after its features are written, and the operating system
keeps both when the process is killed, so a status of 1 always means complete features. The folder name is a
hash of everything the features depend on (encoder weights, image preprocessing, precision, the pictures), so a
stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CACHE_FORMAT_VERSION", "FeatureCache", "feature_cache_key", "image_processor_settings"]

logger = logging.getLogger(__name__)

#: Part of every key: bumped when the layout changes, so older folders are never misread.
CACHE_FORMAT_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32}
# Files of the search cache before it shared this format (one safetensors file per gallery).
_OLD_SEARCH_CACHE = "features-*.safetensors"


def image_processor_settings(image_processor: Any) -> dict[str, Any]:
    """What of an image processor changes the pixels the encoder sees (part of a cache key)."""
    keys = (
        "size",
        "resample",
        "do_resize",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )
    settings = {key: getattr(image_processor, key, None) for key in keys}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def feature_cache_key(encoder_state: Mapping[str, torch.Tensor], description: Mapping[str, Any]) -> str:
    """
    A hash of the encoder's weights and buffers (BatchNorm statistics included) and of `description`
    (preprocessing, the pictures, precision...): the name of a cache folder. The decoder is not part of it:
    fine-tuning only the decoder keeps cached features valid.
    """
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"version": CACHE_FORMAT_VERSION, **description}, sort_keys=True, default=str).encode()
    )
    for name in sorted(encoder_state):
        tensor = encoder_state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:20]


def _report_old_caches(root: Path) -> None:
    """One line when `root` holds search caches of the earlier format: they are not read, only rebuilt."""
    old = list(root.glob(_OLD_SEARCH_CACHE))
    if old:
        size = sum(path.stat().st_size for path in old) / 2**20
        logger.warning(
            "feature cache %s: %d file(s) of an earlier format (%s, %.0f MiB) are not read; the features are "
            "encoded again in the current format (delete them to free the space)",
            root,
            len(old),
            _OLD_SEARCH_CACHE,
            size,
        )


class FeatureCache:
    """
    Memory-mapped feature grids, one per row (a dataset row or a gallery picture), with a status byte per row.

    The memory maps are opened lazily in each process that uses them (the training loop writes, the
    DataLoader workers read) and are not pickled with the object.
    """

    MISSING, CACHED, BAD = 0, 1, 2

    def __init__(
        self,
        directory: str | os.PathLike,
        num_rows: int,
        grid_shape: Sequence[int],
        dtype: str = "float16",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.directory = Path(directory)
        self.num_rows = int(num_rows)
        self.grid_shape = tuple(int(v) for v in grid_shape)
        self.dtype = dtype
        self._features: np.memmap | None = None
        self._status: np.memmap | None = None
        self._writable = False

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        key: str,
        num_rows: int,
        grid_shape: Sequence[int],
        meta: Mapping[str, Any] | None = None,
        *,
        dtype: str = "float16",
        ids: Sequence[str] | None = None,
    ) -> FeatureCache:
        """
        Opens the cache `<root>/<key>`, creating it if needed. Call it in one process only (the main one)
        and `FeatureCache(directory, ...)` in the others once it returns. `ids`: the picture of each row.

        A new folder is built under a temporary name and renamed, so that a process killed while
        creating it never leaves a folder that looks complete.
        """
        directory = Path(root) / key
        cache = cls(directory, num_rows, grid_shape, dtype)
        if cache.exists():
            return cache
        if ids is not None and len(ids) != cache.num_rows:
            raise ValueError(f"got {len(ids)} ids for {cache.num_rows} rows")
        directory.parent.mkdir(parents=True, exist_ok=True)
        _report_old_caches(directory.parent)
        staging = directory.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            # Sparse files: disk is used only for the rows that get written.
            features = np.lib.format.open_memmap(
                staging / "features.npy",
                mode="w+",
                dtype=_DTYPES[dtype],
                shape=(cache.num_rows, *cache.grid_shape),
            )
            del features
            status = np.lib.format.open_memmap(
                staging / "status.npy", mode="w+", dtype=np.uint8, shape=(cache.num_rows,)
            )
            del status
            if ids is not None:
                # ASCII JSON: ids from file names that are not UTF-8 (lone surrogates) survive.
                (staging / "ids.json").write_text(json.dumps(list(ids)), encoding="utf-8")
            info = {
                "format_version": CACHE_FORMAT_VERSION,
                "rows": cache.num_rows,
                "grid_shape": list(cache.grid_shape),
                "dtype": dtype,
                **dict(meta or {}),
            }
            (staging / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cache

    def exists(self) -> bool:
        """Whether the folder holds a cache of this shape and dtype (float16 in folders that do not say)."""
        try:
            meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (
            meta.get("rows") == self.num_rows
            and tuple(meta.get("grid_shape", ())) == self.grid_shape
            and meta.get("dtype", "float16") == self.dtype
        )

    def ids(self) -> list[str] | None:
        """The picture of each row, for a cache created with `ids`."""
        try:
            return json.loads((self.directory / "ids.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    # -- access -----------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_features"] = state["_status"] = None  # memory maps are reopened in the new process
        state["_writable"] = False
        return state

    def _open(self, writable: bool) -> None:
        if self._features is not None and (self._writable or not writable):
            return
        mode = "r+" if writable else "r"
        self._features = np.load(self.directory / "features.npy", mmap_mode=mode)
        self._status = np.load(self.directory / "status.npy", mmap_mode=mode)
        if self._features.shape != (self.num_rows, *self.grid_shape):
            raise ValueError(
                f"feature cache {self.directory} has shape {self._features.shape}, expected "
                f"{(self.num_rows, *self.grid_shape)}"
            )
        self._writable = writable

    def status(self, row: int) -> int:
        self._open(writable=False)
        return int(self._status[row])

    def statuses(self) -> np.ndarray:
        self._open(writable=False)
        return np.array(self._status)

    def read(self, row: int) -> torch.Tensor:
        """The grid `(channels, height, width)` of `row` (a copy, not a view of the file)."""
        self._open(writable=False)
        return torch.from_numpy(np.array(self._features[row]))

    def read_rows(self, rows: Sequence[int] | np.ndarray | slice) -> torch.Tensor:
        """The grids `(len(rows), channels, height, width)` of `rows`, read from the file (a copy)."""
        self._open(writable=False)
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(np.array(self._features[rows]))

    def write(self, rows: torch.Tensor | Sequence[int], grids: torch.Tensor) -> None:
        """Stores `grids` `(len(rows), channels, height, width)` in the cache's dtype and marks the rows cached."""
        self._open(writable=True)
        index = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if len(index) == 0:
            return
        self._features[index] = grids.detach().to("cpu", getattr(torch, self.dtype)).numpy()
        self._status[index] = self.CACHED  # after the features: a set status means complete features

    def mark_bad(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Remembers that these rows' images cannot be decoded, so later epochs do not try again."""
        self._open(writable=True)
        index = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if len(index):
            self._status[index] = self.BAD

    def flush(self) -> None:
        """Writes dirty pages to disk (the operating system keeps them across a killed process anyway)."""
        if self._writable and self._features is not None:
            self._features.flush()
            self._status.flush()

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.grid_shape)) * np.dtype(_DTYPES[self.dtype]).itemsize
