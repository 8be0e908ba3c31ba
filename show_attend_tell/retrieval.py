"""Text to images: rank pictures by how likely the captioning model finds a query as their caption.

A captioning model is a conditional language model p(caption | image). Read backwards it is a
retrieval model: for a text query, every image of a gallery gets the score

    score(image, query) = (1 / T) * sum_t log p(w_t | w_<t, image)

the log-likelihood of the tokenised query (its words and the closing ``<end>``, T tokens) under
teacher forcing, divided by T so that long and short queries are on the same scale. The images are
returned best first, and the attention of each word over each returned image shows why it matched.

Cost and how it is kept down:

* The encoder (the expensive ResNet) runs once per gallery. Its native feature grid is stored on disk
  (safetensors, no pickle) under a key made of the encoder's weights, the image processor's settings
  and the gallery's contents, so later queries, in this process or the next, only run the decoder.
  The grid is stored before the adaptive pooling (8 x 8 for ResNet-101 at 256 px, 3 times smaller than
  the pooled 14 x 14 it is upsampled to) and pooled again on use, which gives the same features.
* Scoring is batched over images and queries at once: the decoder groups its rows by image
  (rows ``i * k ... i * k + k - 1`` belong to image ``i``), so one forward scores ``k`` queries against
  each image of a chunk without copying the image's features per query.

At scale (a collection too large to score per query), two stages: :class:`IndexedRetriever` asks a
:class:`~show_attend_tell.caption_index.CaptionIndex` (BM25 over every picture's n-best captions, built once
by ``scripts/search_images.py build``) for the top candidates, and re-ranks only those by the score above.

Public API: :class:`ImageGallery` (a folder, a dataset split or a list of images), :func:`encode_gallery`
(features, cached), :func:`score_captions` (the score matrix), :class:`CaptionRetriever` (search with
attention), :class:`IndexedRetriever` (two-stage search over a caption index) and :func:`index_model_record`
(what an index records of its model), :func:`plot_search_results` / :func:`save_search_figure` (the figure)
and :func:`retrieval_recall` (Recall@K of text-to-image retrieval over a dataset split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .errors import one_line
from .feature_cache import FeatureCache, feature_cache_key, image_processor_settings
from .image_processing_show_attend_tell import IMAGE_SUFFIXES, describe_image_error, image_files, load_image
from .modeling_show_attend_tell import ShowAttendTellCache
from .visualization import DISPLAY_SIZE, attention_overlays, write_png

if TYPE_CHECKING:  # annotations only: matplotlib and datasets are optional
    from datasets import Dataset
    from matplotlib.figure import Figure

    from .caption_index import CaptionIndex
    from .modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
    from .processing_show_attend_tell import ShowAttendTellProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CANDIDATES",
    "CaptionRetriever",
    "GalleryFeatures",
    "ImageGallery",
    "IndexedRetriever",
    "SearchHit",
    "SearchResult",
    "encode_gallery",
    "index_model_record",
    "plot_search_results",
    "query_words",
    "rank_by_likelihood",
    "retrieval_recall",
    "save_search_figure",
    "score_captions",
    "tokenize_queries",
]

DEFAULT_BATCH_SIZE = 256  # decoder rows (images x queries) per forward
DEFAULT_ENCODE_BATCH_SIZE = 32  # images per encoder forward


# --------------------------------------------------------------------------------------------------
# Galleries
# --------------------------------------------------------------------------------------------------


def _file_signature(path: Path) -> str:
    """Size and modification time, as ``make`` compares files; a missing file has its own signature."""
    try:
        stat = path.stat()
    except OSError:  # reported as unreadable when the gallery is encoded, not here
        return "missing"
    return f"{stat.st_size}\0{stat.st_mtime_ns}"


class ImageGallery:
    """
    An ordered collection of images with stable ids and a content fingerprint.

    Build one with :meth:`from_folder`, :meth:`from_dataset` or :meth:`from_images`. Images are loaded
    lazily, one at a time, so a gallery costs no memory until it is encoded.

    Args:
        ids: one identifier per image (a path relative to the folder, a dataset's ``image_id``, ...).
        loader: returns image ``i`` as a PIL image; may raise for an unreadable file.
        fingerprint: returns a hex digest that changes whenever any image changes (the cache key).
        name: a short description for messages.
    """

    def __init__(
        self,
        ids: Sequence[str],
        loader: Callable[[int], Image.Image],
        fingerprint: Callable[[], str],
        name: str = "gallery",
    ) -> None:
        self.ids = [str(image_id) for image_id in ids]
        self._loader = loader
        self._fingerprint = fingerprint
        self.name = name
        #: The image files, for a gallery made from a folder (None otherwise).
        self.paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, images={len(self)})"

    def load(self, index: int) -> Image.Image:
        """
        Image ``index``, decoded, upright and RGB. Raises ``ImageLoadError`` (a ``ValueError``) with a
        one-line message naming the image and the reason when it cannot be used.
        """
        return self._loader(index)

    def fingerprint(self) -> str:
        """A digest of the gallery's ids and contents: equal digests mean the same images in the same order."""
        return self._fingerprint()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, recursive: bool = True) -> ImageGallery:
        """
        Every image file under ``folder`` (by suffix), in sorted path order; ids are the paths relative
        to the folder. The fingerprint uses each file's path, size and modification time (as ``make``
        does), so an edited or replaced file is encoded again without reading every file on each query.
        """
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        paths = image_files(root, recursive=recursive)
        if not paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
        ids = [p.relative_to(root).as_posix() for p in paths]

        def fingerprint() -> str:
            digest = hashlib.sha256(b"folder\0")
            for image_id, path in zip(ids, paths, strict=True):
                digest.update(f"{image_id}\0{_file_signature(path)}\n".encode())
            return digest.hexdigest()

        def loader(index: int) -> Image.Image:
            return load_image(paths[index], name=ids[index])

        gallery = cls(ids, loader, fingerprint, name=str(root))
        gallery.paths = paths
        return gallery

    @classmethod
    def from_dataset(
        cls, dataset: Dataset, image_column: str = "image", id_column: str | None = "image_id"
    ) -> ImageGallery:
        """
        The images of a ``datasets.Dataset`` split (an ``image`` column of the ``datasets.Image`` type).

        The fingerprint hashes the encoded image bytes (or, for images stored as file paths, the path,
        size and modification time), read without decoding any picture: cheap next to encoding them,
        and unlike the dataset's own fingerprint it does not depend on how the dataset was built.
        """
        from datasets import Image as ImageFeature

        if image_column not in dataset.column_names:
            raise ValueError(f"the dataset has no {image_column!r} column (columns: {dataset.column_names})")
        if id_column is not None and id_column in dataset.column_names:
            ids = [str(value) for value in dataset[id_column]]
        else:
            ids = [str(index) for index in range(len(dataset))]
        raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))

        def fingerprint() -> str:
            digest = hashlib.sha256(b"dataset\0")
            records = (record for batch in raw.iter(batch_size=256) for record in batch[image_column])
            # In batches: Flickr30K's training split holds gigabytes of JPEG bytes.
            for image_id, record in zip(ids, records, strict=True):
                digest.update(image_id.encode() + b"\0")
                if record.get("bytes") is not None:
                    digest.update(hashlib.sha256(record["bytes"]).digest())
                else:
                    digest.update(f"{record['path']}\0{_file_signature(Path(record['path']))}".encode())
            return digest.hexdigest()

        def loader(index: int) -> Image.Image:
            record = raw[index][image_column]
            source = record["bytes"] if record.get("bytes") is not None else record["path"]
            return load_image(source, name=ids[index])

        return cls(ids, loader, fingerprint, name=f"dataset split ({len(ids)} images)")

    @classmethod
    def from_images(cls, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> ImageGallery:
        """Images already in memory; ids default to their positions. The fingerprint hashes the pixels."""
        images = list(images)
        ids = [str(index) for index in range(len(images))] if ids is None else list(ids)
        if len(ids) != len(images):
            raise ValueError(f"got {len(images)} images but {len(ids)} ids")

        def fingerprint() -> str:
            digest = hashlib.sha256(b"images\0")
            for image_id, image in zip(ids, images, strict=True):
                digest.update(f"{image_id}\0{image.mode}\0{image.size}\0".encode())
                digest.update(hashlib.sha256(image.tobytes()).digest())
            return digest.hexdigest()

        return cls(
            ids,
            lambda index: load_image(images[index], name=ids[index]),
            fingerprint,
            name=f"{len(images)} images",
        )


# --------------------------------------------------------------------------------------------------
# Encoding, with the on-disk cache
# --------------------------------------------------------------------------------------------------


class GalleryFeatures:
    """
    The encoder's output for every readable image of a gallery: in memory, or rows of a
    :class:`~show_attend_tell.feature_cache.FeatureCache` on disk, read only when used (a two-stage search
    reads its candidates' rows, not the collection).

    Attributes:
        ids: ids of the encoded images, in gallery order (unreadable images are left out).
        indices: their positions in the gallery.
        skipped: ``{id: reason}`` for images that could not be read.
        cache_path: the cache folder, if the disk cache is used.
        from_cache: whether the features were all read from the cache (the encoder did not run).
    """

    def __init__(
        self,
        ids: Sequence[str],
        indices: Sequence[int],
        grid: torch.Tensor | FeatureCache,
        skipped: dict[str, str] | None = None,
        cache_path: Path | None = None,
        from_cache: bool = False,
    ) -> None:
        if len(ids) != len(indices):
            raise ValueError(f"got {len(ids)} ids for {len(indices)} indices")
        self.ids = list(ids)
        self.indices = list(indices)
        # In memory: row i is image i. In a cache: row indices[i] (a gallery's rows are its positions).
        self._grid = grid
        self.skipped = dict(skipped or {})
        self.cache_path = cache_path
        self.from_cache = from_cache

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, skipped={len(self.skipped)}, cache={self.cache_path})"
        )

    def rows(self, positions: Sequence[int] | slice) -> torch.Tensor:
        """The native grids ``(images, encoder_dim, h, w)`` of images ``positions``, float32 on the CPU."""
        if isinstance(self._grid, torch.Tensor):
            if isinstance(positions, slice):
                return self._grid[positions]
            return self._grid[torch.as_tensor(list(positions), dtype=torch.long)]
        selected = (
            self.indices[positions] if isinstance(positions, slice) else [self.indices[p] for p in positions]
        )
        return self._grid.read_rows(selected).float()

    @property
    def grid(self) -> torch.Tensor:
        """Every image's native grid ``(images, encoder_dim, h, w)``, float32 on the CPU (read whole from a cache)."""
        return self.rows(slice(None))

    def features(
        self, model: ShowAttendTellForConditionalGeneration, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Pooled features ``(images, num_pixels, encoder_dim)`` of images ``start:end`` on the model's device."""
        grid = self.rows(slice(start, end)).to(model.device, dtype=model.dtype)
        return model.encoder.pool_grid(grid)

    def select(self, positions: Sequence[int]) -> GalleryFeatures:
        """The features of images ``positions`` only, in that order, in memory."""
        positions = list(positions)
        return GalleryFeatures(
            [self.ids[p] for p in positions], [self.indices[p] for p in positions], self.rows(positions)
        )


# Seeds the fingerprint that caption indexes record of their model. Kept as it was when the gallery cache
# had this name: indexes built since then record fingerprints made with it.
_INDEX_FINGERPRINT_SEED = "show_attend_tell.retrieval.features.v1"


def _model_fingerprint(
    model: ShowAttendTellForConditionalGeneration, processor: ShowAttendTellProcessor
) -> str:
    """
    What a caption depends on, the caption index's key: every weight of the model (encoder and decoder), the
    tokenizer's vocabulary and the image processor's resize and normalisation.
    """
    digest = hashlib.sha256(_INDEX_FINGERPRINT_SEED.encode())
    digest.update(json.dumps(processor.tokenizer.get_vocab(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    image_processor = processor.image_processor
    settings = {
        key: getattr(image_processor, key, None) for key in ("size", "resample", "image_mean", "image_std")
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    # Same root as the synthetic data's cache ($SHOW_ATTEND_TELL_CACHE or ~/.cache/show_attend_tell).
    root = os.environ.get("SHOW_ATTEND_TELL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "show_attend_tell"
    return base / "retrieval"


def _open_cache(directory: Path, gallery: ImageGallery) -> FeatureCache | None:
    """
    The gallery's cache folder when it holds a complete layout for this gallery, else None; a damaged folder is
    removed (with a one-line warning), so that the features are encoded into a new one.
    """
    if not directory.exists():
        return None
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        cache = FeatureCache(directory, meta["rows"], meta["grid_shape"], meta.get("dtype", "float16"))
        if cache.num_rows != len(gallery) or not cache.exists() or cache.ids() != gallery.ids:
            raise ValueError("it was made for other pictures")
        cache.statuses()  # opens both files: a truncated one fails here
        cache.read_rows([0])
    except Exception as error:  # a damaged or foreign folder: encode again rather than fail the query
        logger.warning("encoding again: unreadable feature cache %s (%s)", directory, one_line(error))
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return cache


def encode_gallery(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    gallery: ImageGallery,
    *,
    batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> GalleryFeatures:
    """
    Runs the encoder over every image of ``gallery`` once, or reads the result from the disk cache.

    The cache is a :class:`~show_attend_tell.feature_cache.FeatureCache` folder (float32 grids) named by
    :func:`~show_attend_tell.feature_cache.feature_cache_key` of the encoder's weights, the image processor's
    settings and the gallery's fingerprint, under ``cache_dir`` (default: ``$SHOW_ATTEND_TELL_CACHE/retrieval``
    or ``~/.cache/show_attend_tell/retrieval``): a changed model or image is never served stale features, and
    an interrupted encoding continues where it stopped. Images that cannot be read (corrupt, truncated, not an
    image, too large for Pillow) are skipped with a warning and listed in ``skipped``.

    Args:
        batch_size: images per encoder forward.
        use_cache: False neither reads nor writes the cache (the features stay in memory).
        progress: show a progress bar (tqdm) while encoding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    directory = _gallery_cache_directory(model, processor, gallery, cache_dir) if use_cache else None
    store = _open_cache(directory, gallery) if directory is not None else None
    status = store.statuses() if store is not None else np.zeros(len(gallery), dtype=np.uint8)
    todo = np.flatnonzero(status == FeatureCache.MISSING).tolist()
    skipped = {
        gallery.ids[row]: "could not be read (found when the gallery was first encoded)"
        for row in np.flatnonzero(status == FeatureCache.BAD).tolist()
    }
    store, grids = _encode_missing(
        model,
        processor,
        gallery,
        todo,
        status,
        skipped,
        store,
        directory,
        batch_size=batch_size,
        progress=progress,
    )
    return _gallery_features(gallery, status, skipped, store, grids, encoded_any=bool(todo))


def _gallery_cache_directory(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    gallery: ImageGallery,
    cache_dir: str | os.PathLike | None,
) -> Path:
    """The cache folder of this gallery's features: named by the encoder's weights, the image processor's
    settings and the pictures, so that a change to any of them is never served stale features."""
    description = {
        "pictures": gallery.fingerprint(),
        "rows": len(gallery),
        "image_processor": image_processor_settings(processor.image_processor),
        "dtype": "float32",
    }
    key = feature_cache_key(model.encoder.state_dict(), description)
    return (Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()) / key


def _encode_missing(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    gallery: ImageGallery,
    todo: list[int],
    status: np.ndarray,
    skipped: dict[str, str],
    store: FeatureCache | None,
    directory: Path | None,
    *,
    batch_size: int,
    progress: bool,
) -> tuple[FeatureCache | None, list[torch.Tensor]]:
    """
    Encodes the gallery's rows `todo` batch by batch, marking each CACHED or BAD in `status` and adding the
    unreadable ones to `skipped`. The grids go into `store`, or into a new cache in `directory` (created at the
    first batch that has a grid, when `directory` is given); without either, into the returned in-memory list.
    Returns the cache (None without one) and that list.
    """
    grids: list[torch.Tensor] = []  # without a cache
    starts = range(0, len(todo), batch_size)
    if progress and todo:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encoding images", unit="batch")
    was_training = model.training
    model.eval()
    try:
        for start in starts:
            rows, bad, grid = _encode_batch(
                model, processor, gallery, todo[start : start + batch_size], skipped
            )
            if directory is not None and store is None and grid is not None:
                store = _create_cache(directory, gallery, tuple(grid.shape[1:]))
                if store is None:  # the disk refused it: keep the features in memory from now on
                    directory = None
            if store is not None and grid is not None:
                store.write(rows, grid)
            elif grid is not None:
                grids.append(grid)
            status[rows] = FeatureCache.CACHED
            status[bad] = FeatureCache.BAD
    finally:
        model.train(was_training)
    return store, grids


def _encode_batch(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    gallery: ImageGallery,
    rows: list[int],
    skipped: dict[str, str],
) -> tuple[list[int], list[int], torch.Tensor | None]:
    """
    Reads and encodes the gallery's `rows`: returns the rows read, the rows that could not be (their reasons
    added to `skipped`), and the read rows' float32 grids on the CPU (None when no row could be read).
    """
    images, read, bad = [], [], []
    for row in rows:
        try:
            images.append(gallery.load(row))
            read.append(row)
        except (OSError, ValueError) as error:
            # One unreadable file must not lose the rest of the gallery (ImageLoadError is a
            # ValueError; a file removed since the gallery was listed is an OSError).
            reason = describe_image_error(error)
            logger.warning("skipping image %s: %s", gallery.ids[row], reason)
            skipped[gallery.ids[row]] = reason
            bad.append(row)
    if not images:
        return read, bad, None
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        grid, _ = model.encoder.encode_grid(pixel_values.to(model.device, dtype=model.dtype))
    return read, bad, grid.float().cpu()


def _gallery_features(
    gallery: ImageGallery,
    status: np.ndarray,
    skipped: dict[str, str],
    store: FeatureCache | None,
    grids: list[torch.Tensor],
    *,
    encoded_any: bool,
) -> GalleryFeatures:
    """The features of the rows marked CACHED in `status`, from `store` or else from the in-memory `grids`;
    records in the cache the rows that could not be read (when this call tried some) so that they are not
    tried again."""
    positions = np.flatnonzero(status == FeatureCache.CACHED).tolist()
    if not positions:
        raise ValueError(f"none of the {len(gallery)} images of {gallery.name} could be read")
    if store is not None:
        bad_rows = np.flatnonzero(status == FeatureCache.BAD).tolist()
        if bad_rows and encoded_any:
            store.mark_bad(bad_rows)  # not tried again next time
        store.flush()
        source: torch.Tensor | FeatureCache = store
    else:
        source = torch.cat(grids)
    return GalleryFeatures(
        [gallery.ids[p] for p in positions],
        positions,
        source,
        skipped,
        cache_path=store.directory if store is not None else None,
        from_cache=store is not None and not encoded_any,
    )


def _create_cache(directory: Path, gallery: ImageGallery, grid_shape: tuple[int, ...]) -> FeatureCache | None:
    """A new cache folder for the gallery; None (features kept in memory) when the disk refuses it."""
    try:
        return FeatureCache.create(
            directory.parent,
            directory.name,
            len(gallery),
            grid_shape,
            {"gallery": gallery.name},
            dtype="float32",
            ids=gallery.ids,
        )
    except OSError as error:  # a read-only or full disk costs speed next time, not this result
        logger.warning("could not write the feature cache %s: %s", directory, error)
        return None


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def tokenize_queries(processor: ShowAttendTellProcessor, queries: Sequence[str]) -> torch.Tensor:
    """``(queries, steps)`` token ids: ``<start> words <end>`` padded with ``<pad>`` to the longest query."""
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings; wrap a single query in a list")
    encoded = processor.tokenizer(list(queries), padding="longest", truncation=True, return_tensors="pt")
    return encoded["input_ids"]


def decoding_state(
    model: ShowAttendTellForConditionalGeneration,
    rows_per_image: int,
    *,
    grid: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
) -> ShowAttendTellCache:
    """
    The decoder's state before the first word, for ``rows_per_image`` rows (queries) per picture: the pooled
    features, their attention keys ``W_e a`` and the initial LSTM state, from the native ``grid`` ``(images,
    encoder_dim, h, w)`` or the pooled ``features`` ``(images, num_pixels, encoder_dim)`` on the model's device.

    From a grid smaller than the pooled map (8 x 8 against 14 x 14 for ResNet-101 at 256 px), the keys are
    projected on the grid and pooled after: pooling averages grid cells, and an average of projections is the
    projection of the average, for 3 times fewer products. The projection was two thirds of a re-ranking's time.
    """
    encoder, decoder = model.encoder, model.decoder
    if grid is not None:
        cells = grid.flatten(2).transpose(1, 2)  # (images, h * w, encoder_dim)
        # The encoder's pooling as a matrix (each pooled cell averages a window of grid cells), made by pooling
        # the identity: one matrix product, where the pooling op on a (images, 2048, 8, 8) grid took a sixth of
        # a re-ranking.
        eye = torch.eye(cells.shape[1], device=grid.device, dtype=grid.dtype)
        pooling = encoder.pool_grid(eye.view(-1, 1, *grid.shape[2:]))[:, :, 0].T  # (num_pixels, h * w)
        features = pooling @ cells
        if cells.shape[1] < features.shape[1]:
            keys = pooling @ decoder.attention.project_features(cells)
        else:
            keys = decoder.attention.project_features(features)
    elif features is not None:
        keys = decoder.attention.project_features(features)
    else:
        raise ValueError("pass the grid or the pooled features")
    hidden, cell = decoder.initial_state(features, rows_per_image)
    return ShowAttendTellCache(features, keys, hidden, cell)


def _query_log_likelihood(
    model: ShowAttendTellForConditionalGeneration,
    state: ShowAttendTellCache,
    input_ids: torch.Tensor,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Teacher-forced scores of ``input_ids`` (rows grouped by image, from the :func:`decoding_state` ``state``):
    the mean log-probability of each row's tokens after ``<start>`` up to and including ``<end>``, and optionally
    the attention ``(rows, steps, num_pixels)`` of each of those steps.
    """
    pad = model.config.pad_token_id
    targets = input_ids[:, 1:]
    outputs = model(
        input_ids=input_ids[:, :-1],
        cache=state,
        use_cache=False,
        output_attentions=output_attentions,
        return_dict=True,
    )
    log_probs = outputs.logits.float().log_softmax(dim=-1)
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = (targets != pad).to(token_log_probs.dtype)
    lengths = mask.sum(dim=1).clamp_min(1.0)
    scores = (token_log_probs * mask).sum(dim=1) / lengths
    return scores, outputs.attention_maps if output_attentions else None


def score_captions(
    model: ShowAttendTellForConditionalGeneration,
    features: GalleryFeatures | torch.Tensor,
    input_ids: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> torch.Tensor:
    """
    The length-normalised log-likelihood of every query as the caption of every image.

    Args:
        features: a gallery's :class:`GalleryFeatures`, or pooled features ``(images, num_pixels, encoder_dim)``.
        input_ids: ``(queries, steps)`` from :func:`tokenize_queries` (``<start> ... <end>``, ``<pad>`` after).
        batch_size: decoder rows per forward (images x queries); memory grows with it.

    Returns:
        ``(images, queries)`` float32 scores on the CPU: mean log-probability per token, so 0 is a
        certain caption and more negative is less likely.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad = model.config.pad_token_id
    num_images = len(features) if isinstance(features, GalleryFeatures) else features.shape[0]
    num_queries = input_ids.shape[0]
    scores = torch.empty(num_images, num_queries)
    if num_images == 0 or num_queries == 0:
        return scores
    # Queries sorted by length and chunked: every row of a chunk is decoded to the chunk's longest query,
    # so similar lengths together waste fewer steps on padding.
    lengths = (input_ids != pad).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    queries_per_chunk = min(num_queries, batch_size)
    images_per_chunk = max(1, batch_size // queries_per_chunk)
    chunks = [
        (q, i)
        for q in range(0, num_queries, queries_per_chunk)
        for i in range(0, num_images, images_per_chunk)
    ]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="scoring", unit="batch")
    was_training = model.training
    model.eval()  # dropout would make scores random
    try:
        with torch.inference_mode():
            for q_start, i_start in chunks:
                query_index = order[q_start : q_start + queries_per_chunk]
                ids = input_ids[query_index]
                ids = ids[:, : int(lengths[query_index].max())].to(model.device)
                i_end = min(i_start + images_per_chunk, num_images)
                if isinstance(features, GalleryFeatures):
                    grid = features.rows(slice(i_start, i_end)).to(model.device, dtype=model.dtype)
                    state = decoding_state(model, len(ids), grid=grid)
                else:
                    pooled = features[i_start:i_end].to(model.device, dtype=model.dtype)
                    state = decoding_state(model, len(ids), features=pooled)
                # Rows grouped by image: the whole query block once per image of the chunk.
                rows = ids.repeat(i_end - i_start, 1)
                chunk_scores, _ = _query_log_likelihood(model, state, rows)
                scores[i_start:i_end, query_index] = chunk_scores.view(i_end - i_start, -1).cpu()
    finally:
        model.train(was_training)
    return scores


# --------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchHit:
    """One retrieved image: its rank (1 = best), gallery position and id, score, and the query's attention."""

    rank: int
    index: int
    image_id: str
    score: float
    attention: np.ndarray | None = None  # (len(words), num_pixels): one map per query token over this image
    captions: tuple[str, ...] = ()  # what the caption index holds for this image (two-stage search only)


@dataclass
class SearchResult:
    """
    A query's top images. ``words`` are the tokens scored (the query's words as the model sees them, then
    ``<end>``). ``reason`` says why there are no hits, when that is not simply an empty gallery; ``gallery``
    holds the images that ``hit.index`` refers to when the search made one (the candidates of
    :class:`IndexedRetriever`).
    """

    query: str
    words: list[str]
    unknown_words: list[str]
    hits: list[SearchHit]
    reason: str | None = None
    gallery: ImageGallery | None = None
    candidates: int | None = None  # images the caption index proposed and the model re-ranked


class CaptionRetriever:
    """
    Text-to-image search over one gallery with a captioning model.

    The gallery is encoded once when the retriever is made (or read from the disk cache); every query
    afterwards runs only the decoder.

    Example:

    ```python
    >>> retriever = CaptionRetriever(model, processor, ImageGallery.from_folder("photos/"))
    >>> result = retriever.search("a dog running on the beach", top_k=5)
    >>> [(hit.image_id, hit.score) for hit in result.hits]
    >>> save_search_figure("search.png", result, retriever.gallery)
    ```
    """

    def __init__(
        self,
        model: ShowAttendTellForConditionalGeneration,
        processor: ShowAttendTellProcessor,
        gallery: ImageGallery,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.gallery = gallery
        self.batch_size = batch_size
        self.features = encode_gallery(
            model,
            processor,
            gallery,
            batch_size=encode_batch_size,
            cache_dir=cache_dir,
            use_cache=use_cache,
            progress=progress,
        )

    def score(self, queries: Sequence[str]) -> torch.Tensor:
        """``(queries, images)`` scores of each query against every encoded image (see :func:`score_captions`)."""
        input_ids = tokenize_queries(self.processor, queries)
        return score_captions(self.model, self.features, input_ids, batch_size=self.batch_size).T

    def query_words(self, query: str) -> tuple[list[str], list[str]]:
        """The query's words as the tokenizer sees them (lower case, no punctuation) and those it does not know."""
        return query_words(self.processor, query)

    def search(self, query: str, top_k: int = 5, return_attention: bool = True) -> SearchResult:
        """
        The ``top_k`` images that best fit ``query`` as their caption, best first, each with the query's
        attention over it (one map per word and one for ``<end>``) when ``return_attention`` is set.
        """
        words, unknown = self.query_words(query)
        if not words:
            raise ValueError(f"the query {query!r} has no words")
        if unknown:
            logger.info("words unknown to the model (scored as <unk>): %s", ", ".join(unknown))
        hits, tokens = rank_by_likelihood(
            self.model,
            self.processor,
            self.features,
            query,
            top_k=top_k,
            return_attention=return_attention,
            batch_size=self.batch_size,
        )
        return SearchResult(query=query, words=tokens, unknown_words=unknown, hits=hits)


def query_words(processor: ShowAttendTellProcessor, query: str) -> tuple[list[str], list[str]]:
    """The query's words as the tokenizer sees them (lower case, no punctuation) and those it does not know."""
    tokenizer = processor.tokenizer
    words = tokenizer.normalize_caption(query)
    unknown = [word for word in words if tokenizer.convert_tokens_to_ids(word) == tokenizer.unk_token_id]
    return words, unknown


def rank_by_likelihood(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    features: GalleryFeatures,
    query: str,
    *,
    top_k: int = 5,
    return_attention: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[SearchHit], list[str]]:
    """
    The ``top_k`` images of ``features`` that best fit ``query`` as their caption (:func:`score_captions`),
    best first, each with the query's attention over it when ``return_attention`` is set; and the tokens
    scored (the query's words, then ``<end>``). Both retrievers rank with this.
    """
    input_ids = tokenize_queries(processor, [query])
    # Few images (a two-stage search's candidates, a small gallery): one forward gives the scores and the
    # attention, instead of a second forward over the winners (a quarter of the time of a re-ranking).
    single_pass = return_attention and 0 < len(features) <= batch_size
    if single_pass:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                rows = input_ids.to(model.device).repeat(len(features), 1)
                grid = features.rows(slice(None)).to(model.device, dtype=model.dtype)
                scores, all_attention = _query_log_likelihood(
                    model, decoding_state(model, 1, grid=grid), rows, output_attentions=True
                )
        finally:
            model.train(was_training)
        scores = scores.float().cpu()
    else:
        scores = score_captions(model, features, input_ids, batch_size=batch_size)[:, 0]
    top_k = max(0, min(top_k, len(features)))
    best = torch.argsort(scores, descending=True, stable=True)[:top_k].tolist()
    hits = [
        SearchHit(
            rank=rank,
            index=features.indices[position],
            image_id=features.ids[position],
            score=float(scores[position]),
        )
        for rank, position in enumerate(best, start=1)
    ]
    tokens = [*(processor.tokenizer.convert_ids_to_tokens(input_ids[0, 1:-1].tolist())), "<end>"]
    if single_pass and hits:
        for hit, position in zip(hits, best, strict=True):
            hit.attention = all_attention[position].float().cpu().numpy()
    elif return_attention and hits:
        # One more forward over just the winners, with attention: cheaper than keeping the
        # attention of every image while scoring the whole gallery.
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                winners = features.rows(best).to(model.device, dtype=model.dtype)
                rows = input_ids.to(model.device).repeat(len(best), 1)
                state = decoding_state(model, 1, grid=winners)
                _, attention = _query_log_likelihood(model, state, rows, output_attentions=True)
        finally:
            model.train(was_training)
        for hit, maps in zip(hits, attention.float().cpu().numpy(), strict=True):
            hit.attention = maps
    return hits, tokens


# --------------------------------------------------------------------------------------------------
# Two-stage search over a caption index
# --------------------------------------------------------------------------------------------------

DEFAULT_CANDIDATES = 100  # pictures the caption index proposes per query, re-ranked by the model


def index_model_record(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    *,
    num_beams: int | None = None,
    num_return_sequences: int = 1,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """
    What a caption index records about the model that captioned its pictures: a fingerprint of every weight
    and of the vocabulary, and the generation settings (``None`` resolved from the model's generation config).
    """
    config = model.generation_config
    generation = {
        "num_beams": int(num_beams or config.num_beams or 1),
        "num_return_sequences": int(num_return_sequences),
        "max_new_tokens": max_new_tokens or config.max_new_tokens,
        "max_length": None if max_new_tokens else config.max_length,
        "length_penalty": config.length_penalty,  # None: generate()'s default
    }
    return {"fingerprint": _model_fingerprint(model, processor), "generation": generation}


class IndexedRetriever:
    """
    Text-to-image search over a collection too large to score exhaustively: a :class:`CaptionIndex` built
    from the model's own captions proposes ``candidates`` pictures in milliseconds, and the model re-ranks
    them by the caption likelihood of the query (:func:`rank_by_likelihood`, as :class:`CaptionRetriever`
    ranks a whole gallery), with attention.

    The candidates' encoder features come from ``features`` when given (a gallery's cached
    :func:`encode_gallery` result; no encoder runs), else the encoder runs on them, reading each picture from
    ``gallery`` (by id) or from the path the index recorded.

    Example:

    ```python
    >>> retriever = IndexedRetriever(model, processor, "photos.index")
    >>> result = retriever.search("a dog running on the beach", top_k=5)
    >>> save_search_figure("search.png", result)
    ```

    Raises:
        CaptionIndexError: no index at the path, or a damaged one (one-line message).
        IndexModelMismatchError: the index was built with another model.
    """

    def __init__(
        self,
        model: ShowAttendTellForConditionalGeneration,
        processor: ShowAttendTellProcessor,
        index: CaptionIndex | str | os.PathLike,
        *,
        gallery: ImageGallery | None = None,
        features: GalleryFeatures | None = None,
        candidates: int = DEFAULT_CANDIDATES,
        batch_size: int = DEFAULT_BATCH_SIZE,
        encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
    ) -> None:
        from .caption_index import CaptionIndex, IndexModelMismatchError

        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        if features is not None and gallery is None:
            raise ValueError(
                "features need the gallery they were encoded from (features.indices refer to it)"
            )
        self.index = index if isinstance(index, CaptionIndex) else CaptionIndex.open(index)
        fingerprint = _model_fingerprint(model, processor)
        if self.index.model.get("fingerprint") != fingerprint:
            raise IndexModelMismatchError(
                f"caption index {self.index.path} was built with model {str(self.index.model.get('fingerprint'))[:12]}, "
                f"not with this one ({fingerprint[:12]}): search it with that model, or build a new index"
            )
        self.model = model
        self.processor = processor
        self.gallery = gallery
        self.features = features
        self.candidates = candidates
        self.batch_size = batch_size
        self.encode_batch_size = encode_batch_size
        # A gallery picture is found by its id or, for a folder, by its file: the index keys pictures by the
        # paths given to `build` (relative to where it ran), the gallery by paths relative to its folder.
        self._gallery_positions: dict[str, int] = {}
        if gallery is not None:
            self._gallery_positions.update((image_id, i) for i, image_id in enumerate(gallery.ids))
            self._gallery_positions.update((os.path.abspath(p), i) for i, p in enumerate(gallery.paths or ()))
        self._feature_rows = (
            {position: row for row, position in enumerate(features.indices)} if features else {}
        )

    def _position(self, hit: Any) -> int | None:
        position = self._gallery_positions.get(hit.image_id)
        if position is None and hit.source is not None:
            position = self._gallery_positions.get(os.path.abspath(hit.source))
        return position

    def _loader(self, hit: Any) -> Callable[[], Image.Image]:
        image_id, source = hit.image_id, hit.source
        position = self._position(hit)
        if position is not None:
            return lambda: self.gallery.load(position)
        if source is not None:
            return lambda: load_image(source, name=image_id)

        def missing() -> Image.Image:
            raise ValueError(f"{image_id}: the index does not record where this picture is; pass its gallery")

        return missing

    def _candidate_features(self, found: Sequence[Any]) -> tuple[GalleryFeatures | None, ImageGallery]:
        """The candidates' features (cached rows first, encoder for the rest) and a gallery to show them."""
        loaders = [self._loader(hit) for hit in found]
        rows = [self._feature_rows.get(self._position(hit), -1) for hit in found]
        candidates = ImageGallery(
            [hit.image_id for hit in found],
            lambda i: loaders[i](),
            lambda: "",  # never cached: a candidate set is one query's
            name=f"{len(found)} candidates",
        )
        cached = [i for i, row in enumerate(rows) if row >= 0]
        missing = [i for i, row in enumerate(rows) if row < 0]
        positions: list[int] = []
        grids: list[torch.Tensor] = []
        skipped: dict[str, str] = {}
        if cached:
            grids.append(self.features.rows([rows[i] for i in cached]))
            positions.extend(cached)
        if missing:
            subset = ImageGallery(
                [found[i].image_id for i in missing],
                lambda j: loaders[missing[j]](),
                lambda: "",
                name="candidates",
            )
            try:
                encoded = encode_gallery(
                    self.model, self.processor, subset, batch_size=self.encode_batch_size, use_cache=False
                )
            except ValueError:  # none of them could be read; each was logged
                encoded = None
                skipped.update({found[i].image_id: "unreadable" for i in missing})
            if encoded is not None:
                grids.append(encoded.grid)
                positions.extend(missing[j] for j in encoded.indices)
                skipped.update(encoded.skipped)
        if not grids:
            return None, candidates
        features = GalleryFeatures(
            ids=[found[i].image_id for i in positions],
            indices=positions,
            grid=torch.cat(grids),
            skipped=skipped,
        )
        return features, candidates

    def search(
        self, query: str, top_k: int = 5, return_attention: bool = True, candidates: int | None = None
    ) -> SearchResult:
        """
        The ``top_k`` pictures that best fit ``query`` as their caption, among the index's ``candidates``
        (default: the retriever's) best matches, best first, with the query's attention over each. A query
        that cannot match anything (no words, only unknown or common words, nothing indexed shares a word)
        gives no hits and a ``reason``; it never raises for its text.
        """
        from .caption_index import query_terms

        words, unknown = query_words(self.processor, query)
        tokens = [*words, "<end>"]

        def empty(reason: str, proposed: int | None = None) -> SearchResult:
            return SearchResult(query, tokens, unknown, [], reason=reason, candidates=proposed)

        if not words:
            return empty("the query has no words")
        if len(unknown) == len(words):
            return empty(f"no word of the query is known to the model ({', '.join(unknown)})")
        if not query_terms(query):
            return empty(
                "the query has only common words (such as 'a', 'the', 'of'); add one that describes the picture"
            )
        limit = max(candidates or self.candidates, top_k)
        found = self.index.search(query, limit=limit)
        if not found:
            return empty("no indexed caption shares a word with the query", 0)
        features, gallery = self._candidate_features(found)
        if features is None:
            return empty(f"none of the {len(found)} candidate pictures could be read", len(found))
        hits, tokens = rank_by_likelihood(
            self.model,
            self.processor,
            features,
            query,
            top_k=top_k,
            return_attention=return_attention,
            batch_size=self.batch_size,
        )
        for hit in hits:
            hit.captions = found[hit.index].captions
        return SearchResult(query, tokens, unknown, hits, gallery=gallery, candidates=len(found))


# --------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------


def plot_search_results(
    result: SearchResult,
    gallery: ImageGallery | None = None,
    *,
    panel_size: float = 1.6,
    alpha: float = 0.6,
    cmap: str = "Greys_r",
    fontsize: float = 9.0,
    dpi: float = 100.0,
) -> Figure:
    """
    One row per retrieved image: the image with its rank, id and score, then the attention of each
    query word over it (:func:`show_attend_tell.visualization.attention_overlays`, normalised per word,
    bright where the model looked). Hits without attention show the image only.

    The images are shown resized to the processor's square, as in
    :func:`show_attend_tell.visualization.plot_attention`, so each map lies exactly over what it refers to.
    ``gallery`` defaults to the result's own (the candidates of an :class:`IndexedRetriever` search).
    """
    gallery = gallery if gallery is not None else result.gallery
    if gallery is None and result.hits:
        raise ValueError("the result holds no gallery: pass the gallery that was searched")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the search figure needs matplotlib: pip install matplotlib") from error
    rows = max(1, len(result.hits))
    columns = 1 + len(result.words)
    title_height = 0.5
    fig = Figure(
        figsize=(columns * panel_size, rows * (panel_size + 0.45) + title_height),
        dpi=dpi,
        layout="constrained",
    )
    FigureCanvasAgg(fig)  # no pyplot: nothing global changes and no window opens
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    fig.suptitle(
        textwrap.shorten(f"query: {result.query}", width=int(columns * panel_size * 12)),
        fontsize=fontsize * 1.2,
    )
    if not result.hits:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, result.reason or "no images", ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return fig
    for row, hit in enumerate(result.hits):
        picture = gallery.load(hit.index).resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.BILINEAR)
        pixels = np.asarray(picture)
        ax = fig.add_subplot(rows, columns, row * columns + 1)
        ax.imshow(pixels)
        label = textwrap.shorten(hit.image_id, width=int(panel_size * 14))
        ax.set_title(f"#{hit.rank} {label}\nscore {hit.score:.3f}", fontsize=fontsize)
        ax.set_axis_off()
        if hit.attention is None:
            continue
        overlays = attention_overlays(None, hit.attention, image_size=DISPLAY_SIZE)
        for column, (word, overlay) in enumerate(zip(result.words, overlays, strict=True), start=2):
            ax = fig.add_subplot(rows, columns, row * columns + column)
            ax.imshow(pixels)
            # Fixed limits, as in plot_attention: an evenly spread map must look evenly lit, not black.
            ax.imshow(overlay, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
            ax.set_title(word, fontsize=fontsize)
            ax.set_axis_off()
    return fig


def save_search_figure(
    path: str | os.PathLike, result: SearchResult, gallery: ImageGallery | None = None, **kwargs: Any
) -> Path:
    """Draws :func:`plot_search_results` (same keyword arguments) and writes it as a PNG; returns the path."""
    path = Path(path)
    write_png(plot_search_results(result, gallery, **kwargs), path)
    return path


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def retrieval_recall(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    dataset_split: Dataset,
    ks: Iterable[int] = (1, 5, 10),
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
    captions_per_image: int | None = None,
    max_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    image_column: str = "image",
    captions_column: str = "captions",
    id_column: str = "image_id",
    progress: bool = False,
) -> dict[str, float | int]:
    """
    Recall@K of text-to-image retrieval over one dataset split.

    Every caption of the split queries the gallery of the split's images; its own image is the only
    positive. A query's rank is 1 + the number of images that score strictly higher than its own image.
    With Flickr30K's test split that is 5,000 queries over 1,000 images, the usual protocol.

    Args:
        dataset_split: a ``datasets.Dataset`` with ``image``, ``captions`` (list of strings) and ``image_id``.
        ks: the K of Recall@K.
        batch_size: decoder rows (images x captions) per forward.
        encode_batch_size: images per encoder forward (the features are cached, see :func:`encode_gallery`).
        captions_per_image: use only the first N captions of each image (default: all).
        max_images: use only the first N images (smoke runs).

    Returns:
        ``{"recall@1": ..., "recall@5": ..., "recall@10": ..., "median_rank", "mean_rank",
        "mean_reciprocal_rank", "num_images", "num_queries", "skipped_images"}``; recalls are fractions
        in [0, 1]. Chance level of Recall@K is K / num_images.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if max_images is not None:
        dataset_split = dataset_split.select(range(min(max_images, len(dataset_split))))
    if len(dataset_split) == 0:
        raise ValueError("the dataset split is empty")
    gallery = ImageGallery.from_dataset(dataset_split, image_column=image_column, id_column=id_column)
    features = encode_gallery(
        model,
        processor,
        gallery,
        batch_size=encode_batch_size,
        cache_dir=cache_dir,
        use_cache=use_cache,
        progress=progress,
    )
    all_captions = list(dataset_split[captions_column])
    queries: list[str] = []
    positives: list[int] = []
    for position, index in enumerate(features.indices):
        captions = [caption for caption in all_captions[index] if caption and caption.strip()]
        if captions_per_image is not None:
            captions = captions[:captions_per_image]
        queries.extend(captions)
        positives.extend([position] * len(captions))
    if not queries:
        raise ValueError("the dataset split has no captions")
    input_ids = tokenize_queries(processor, queries)
    scores = score_captions(model, features, input_ids, batch_size=batch_size, progress=progress)
    positive_index = torch.tensor(positives)
    positive_scores = scores[positive_index, torch.arange(len(queries))]
    ranks = 1 + (scores > positive_scores.unsqueeze(0)).sum(dim=0)
    ranks_float = ranks.double()
    metrics: dict[str, float | int] = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    metrics.update(
        median_rank=float(np.median(ranks.numpy())),
        mean_rank=float(ranks_float.mean()),
        mean_reciprocal_rank=float((1.0 / ranks_float).mean()),
        num_images=len(features),
        num_queries=len(queries),
        skipped_images=len(features.skipped),
    )
    return metrics
