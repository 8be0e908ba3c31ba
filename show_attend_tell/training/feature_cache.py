"""The frozen encoder's features for training batches, through the feature cache on disk.

With a frozen encoder, the epochs after the first skip it entirely: the first epoch writes every picture's
native feature grid (float16) to a :class:`~show_attend_tell.feature_cache.FeatureCache`, the format and key
that text-to-image search uses too (see that module for the layout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..feature_cache import CACHE_FORMAT_VERSION, FeatureCache, feature_cache_key


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
