"""Encoder features on disk, so that epochs after the first skip the (frozen) encoder entirely.

Layout of one cache folder (`<root>/<key>/`):

- `features.npy`: `(rows, channels, height, width)` float16, the ResNet's last feature map at its
  *native* grid (8 x 8 for ResNet-101 at 256 px). Pooling to the model's `encoded_image_size` (14 x 14 in
  the specification) happens when the features are used: pooling 8 x 8 up to 14 x 14 only repeats values,
  so storing the pooled map would take 3 times the disk for nothing. float16 halves it again: Flickr30K's
  29,000 training images take 29,000 x 2048 x 64 x 2 bytes = 7.6 GB.
- `status.npy`: one byte per row: 0 not cached yet, 1 cached, 2 the image cannot be decoded.
- `meta.json`: what the key was computed from, for people looking at the folder.

Both `.npy` files are memory-mapped; rows are written as the first epoch encodes them, so a run that is
interrupted keeps what it had encoded. A row's status is set only after its features are written, and
the operating system keeps both when the process is killed, so a status of 1 always means complete
features. The folder name is a hash of everything the features depend on (encoder weights, image
preprocessing, mixed precision, the dataset's fingerprint), so a stale cache is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE_FORMAT_VERSION = 1


def feature_cache_key(encoder_state: Mapping[str, torch.Tensor], description: Mapping[str, Any]) -> str:
    """A hash of the encoder's weights and of `description` (preprocessing, dataset, precision...)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_FORMAT_VERSION, **description}, sort_keys=True).encode())
    for name in sorted(encoder_state):
        tensor = encoder_state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:20]


class FeatureCache:
    """
    Memory-mapped float16 feature grids, one per dataset row, with a status byte per row.

    The memory maps are opened lazily in each process that uses them (the training loop writes, the
    DataLoader workers read) and are not pickled with the object.
    """

    MISSING, CACHED, BAD = 0, 1, 2

    def __init__(self, directory: str | os.PathLike, num_rows: int, grid_shape: Sequence[int]) -> None:
        self.directory = Path(directory)
        self.num_rows = int(num_rows)
        self.grid_shape = tuple(int(v) for v in grid_shape)
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
    ) -> FeatureCache:
        """
        Opens the cache `<root>/<key>`, creating it if needed. Call it in one process only (the main one)
        and `FeatureCache(directory, ...)` in the others once it returns.

        A new folder is built under a temporary name and renamed, so that a process killed while
        creating it never leaves a folder that looks complete.
        """
        directory = Path(root) / key
        cache = cls(directory, num_rows, grid_shape)
        if cache.exists():
            return cache
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            # Sparse files: disk is used only for the rows that get written.
            features = np.lib.format.open_memmap(
                staging / "features.npy",
                mode="w+",
                dtype=np.float16,
                shape=(cache.num_rows, *cache.grid_shape),
            )
            del features
            status = np.lib.format.open_memmap(
                staging / "status.npy", mode="w+", dtype=np.uint8, shape=(cache.num_rows,)
            )
            del status
            info = {
                "format_version": CACHE_FORMAT_VERSION,
                "rows": cache.num_rows,
                "grid_shape": list(cache.grid_shape),
                "dtype": "float16",
                **dict(meta or {}),
            }
            (staging / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cache

    def exists(self) -> bool:
        """Whether the folder holds a cache of this shape."""
        try:
            meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return meta.get("rows") == self.num_rows and tuple(meta.get("grid_shape", ())) == self.grid_shape

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
        """The float16 grid `(channels, height, width)` of `row` (a copy, not a view of the file)."""
        self._open(writable=False)
        return torch.from_numpy(np.array(self._features[row]))

    def write(self, rows: torch.Tensor | Sequence[int], grids: torch.Tensor) -> None:
        """Stores float16 `grids` `(len(rows), channels, height, width)` and marks the rows cached."""
        self._open(writable=True)
        index = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if len(index) == 0:
            return
        self._features[index] = grids.detach().to("cpu", torch.float16).numpy()
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
        return int(np.prod(self.grid_shape)) * 2


class FrozenEncoderFeatures:
    """
    The pooled features `(images, num_pixels, encoder_dim)` of a training batch for a frozen encoder.

    Images whose features the cache holds are not encoded again; the others go through the encoder once
    (one pass per image, however many captions it has in the batch) and are written to the cache. The
    native grid is rounded to float16 with or without a cache, so that `--cache-features` changes the
    speed of training and nothing else; pooling to the model's grid happens after.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        grid_shape: Sequence[int],
        cache: FeatureCache | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.encoder = encoder
        self.grid_shape = tuple(grid_shape)
        self.cache = cache
        self.autocast = autocast or contextlib.nullcontext
        self.images_encoded = 0  # a counter for logs and tests: 0 in epochs served by the cache

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        rows, cached = batch["rows"], batch["cached_mask"]
        grids = torch.empty((len(rows), *self.grid_shape), dtype=torch.float16, device=device)
        if cached.any():
            grids[cached.to(device)] = batch["cached_grids"].to(device)
        if not cached.all():
            with self.autocast():
                fresh = self.encoder.encode_grid(batch["pixel_values"].to(device))[0].to(torch.float16)
            if not torch.isfinite(fresh).all():
                raise FloatingPointError(
                    "the frozen encoder's features overflow float16 (a randomly initialised deep ResNet gives "
                    "values above 65504): load the ImageNet weights or pass --fine-tune-encoder"
                )
            grids[(~cached).to(device)] = fresh
            self.images_encoded += int((~cached).sum())
            if self.cache is not None:
                self.cache.write(rows[~cached], fresh)
        return self.encoder.pool_grid(grids.float())


__all__ = ["CACHE_FORMAT_VERSION", "FeatureCache", "FrozenEncoderFeatures", "feature_cache_key"]
