"""Text-to-image search as ``scripts/search_images.py`` and the web demo run it, callable from Python.

:func:`open_retriever` makes the searcher for what a user has: a gallery (a folder, a dataset split) searched
exhaustively, or a caption index (two-stage search), with the gallery's cached features serving the index's
candidates that are in it. :func:`search_rows` runs queries and gives each result as the row that
``search_images.py --json`` prints, writing the attention figures on the way.

Example:

```python
>>> from show_attend_tell.hub import load_model_and_processor
>>> model, processor = load_model_and_processor("outputs/demo/run/model")
>>> retriever = open_retriever(model, processor, index="photos.index")
>>> for result, row in search_rows(retriever, ["a dog on the beach"], top_k=3, figure="hits.png"):
...     print(row["hits"])
```
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .retrieval import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CANDIDATES,
    DEFAULT_ENCODE_BATCH_SIZE,
    CaptionRetriever,
    ImageGallery,
    IndexedRetriever,
    SearchResult,
    encode_gallery,
    save_search_figure,
)

if TYPE_CHECKING:
    from .modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
    from .processing_show_attend_tell import ShowAttendTellProcessor

__all__ = ["figure_path", "open_retriever", "search_rows"]


def open_retriever(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    *,
    gallery: ImageGallery | None = None,
    index: str | os.PathLike | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> CaptionRetriever | IndexedRetriever:
    """
    An :class:`IndexedRetriever` over the caption ``index`` when one is given (re-ranking from the ``gallery``'s
    encoder features, cached on disk, for the candidates that are in it, and with the encoder for the others),
    else a :class:`CaptionRetriever` scoring every picture of ``gallery``.

    Raises:
        ValueError: neither a gallery nor an index, or no picture of the gallery could be read.
        CaptionIndexError: a missing, damaged or foreign index (a ``ValueError`` too; one line).
    """
    cache = {"cache_dir": cache_dir, "use_cache": use_cache, "progress": progress}
    if index is None:
        if gallery is None:
            raise ValueError("give a gallery of pictures or a caption index to search")
        return CaptionRetriever(
            model, processor, gallery, batch_size=batch_size, encode_batch_size=encode_batch_size, **cache
        )
    features = None
    if gallery is not None:
        features = encode_gallery(model, processor, gallery, batch_size=encode_batch_size, **cache)
    return IndexedRetriever(
        model,
        processor,
        index,
        gallery=gallery,
        features=features,
        candidates=candidates,
        batch_size=batch_size,
        encode_batch_size=encode_batch_size,
    )


def figure_path(base: str | os.PathLike, position: int) -> Path:
    """FILE.png for the first query, FILE-2.png, FILE-3.png ... for the next ones."""
    base = Path(base)
    return base if position == 0 else base.with_name(f"{base.stem}-{position + 1}{base.suffix or '.png'}")


def search_rows(
    retriever: CaptionRetriever | IndexedRetriever,
    queries: Sequence[str],
    *,
    top_k: int = 5,
    figure: str | os.PathLike | None = None,
) -> Iterator[tuple[SearchResult, dict[str, Any]]]:
    """
    Each query's :class:`SearchResult` and its row: ``{"query", "unknown_words", "figure", "hits": [{"rank",
    "score", "image"[, "captions"]}]}``, plus ``"reason"`` and ``"candidates"`` from an index. With ``figure``,
    the hits and their attention are drawn to :func:`figure_path` ``(figure, position)`` for each query.
    """
    for position, query in enumerate(queries):
        result = retriever.search(query, top_k=top_k, return_attention=figure is not None)
        written = None
        if figure is not None:
            # An index search carries its own gallery (the candidates); hit.index refers to it.
            written = save_search_figure(
                figure_path(figure, position), result, result.gallery or retriever.gallery
            )
        row: dict[str, Any] = {
            "query": query,
            "unknown_words": result.unknown_words,
            "figure": str(written) if written else None,
            "hits": [
                {"rank": hit.rank, "score": hit.score, "image": hit.image_id}
                | ({"captions": list(hit.captions)} if hit.captions else {})
                for hit in result.hits
            ],
        }
        if isinstance(retriever, IndexedRetriever):
            row.update(reason=result.reason, candidates=result.candidates)
        yield result, row
