"""Text-to-image search as ``scripts/search_images.py`` and the web demo run it, callable from Python.

:func:`open_retriever` makes the searcher for what a user has: a gallery (a folder, a dataset split) searched
exhaustively, or a caption index (two-stage search), with the gallery's cached features serving the index's
candidates that are in it. :func:`search_rows` runs queries and gives each result as the row that
``search_images.py --json`` prints, writing the attention figures on the way. :func:`build_index` is
``search_images.py build`` and ``add``: it captions pictures (resumably, on one or many processes) into a
caption index.

Example:

```python
>>> from show_attend_tell.hub import load_model_and_processor
>>> model, processor = load_model_and_processor("outputs/demo/run/model")
>>> build_index(model, processor, "photos.index", ["photos/"])  # run again after a kill: it continues
>>> retriever = open_retriever(model, processor, index="photos.index")
>>> for result, row in search_rows(retriever, ["a dog on the beach"], top_k=3, figure="hits.png"):
...     print(row["hits"])
```
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .caption_files import Inputs, caption_to_jsonl, collect_inputs
from .caption_index import CaptionIndex, pictures_from_caption_rows
from .retrieval import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CANDIDATES,
    DEFAULT_ENCODE_BATCH_SIZE,
    CaptionRetriever,
    ImageGallery,
    IndexedRetriever,
    SearchResult,
    encode_gallery,
    index_model_record,
    save_search_figure,
)

if TYPE_CHECKING:
    from .modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
    from .processing_show_attend_tell import ShowAttendTellProcessor

__all__ = ["PENDING_FILE", "IndexBuild", "build_index", "figure_path", "open_retriever", "search_rows"]


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


# --------------------------------------------------------------------------------------------------
# Building a caption index: `search_images.py build` and `add`
# --------------------------------------------------------------------------------------------------

#: The captions of a build in progress, in the index folder: a killed build resumes from it (and from its
#: per-process parts), and it is removed only once its pictures are committed to the index.
PENDING_FILE = "pending.jsonl"


@dataclasses.dataclass
class IndexBuild:
    """What :func:`build_index` did (``added``, ``total`` and ``failed`` are 0 in processes other than the main one)."""

    added: int  # pictures committed to the index by this run (a resumed run's earlier captions included)
    total: int  # pictures in the index afterwards
    already_indexed: int  # pictures of the inputs found in the index, not captioned again
    failed: int  # pictures that could not be read or captioned (not indexed)


def _open_for_writing(path: Path, record: dict[str, Any], create: bool, state: Any) -> CaptionIndex:
    """
    The index to extend, checked against the model's ``record``. The main process creates it (``create``) or
    opens it first and shares its outcome, so that every process stops together on a refusal; the others
    open it once it exists.
    """
    index = failure = None
    if state.is_main_process:
        try:
            index = (
                CaptionIndex.create(path, record, exist_ok=True)
                if create
                else CaptionIndex.open(path, record)
            )
        except Exception as error:  # re-raised below, in every process
            failure = error
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [failure]
        broadcast_object_list(shared)
        failure = failure or shared[0]
    if failure is not None:
        raise failure
    return index if index is not None else CaptionIndex.open(path, record)


def _select(inputs: Inputs, positions: Sequence[int]) -> Inputs:
    """The pictures of ``inputs`` at ``positions``, in order (a dataset stays a dataset, undecoded)."""
    if len(positions) == len(inputs.keys):
        return inputs
    items = inputs.items
    selected = items.select(positions) if hasattr(items, "select") else [items[p] for p in positions]
    return dataclasses.replace(inputs, keys=[inputs.keys[p] for p in positions], items=selected)


def build_index(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    index: str | os.PathLike,
    inputs: Inputs | Sequence[str | os.PathLike],
    *,
    create: bool = True,
    state: Any = None,
    num_beams: int = 5,
    num_return_sequences: int = 5,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    autocast: Callable[[], Any] | None = None,
    progress: bool = True,
    label: str = "",
) -> IndexBuild:
    """
    Captions the pictures of ``inputs`` (their ``num_return_sequences`` best beam-search captions) and adds
    them to the caption index in the folder ``index``: what ``search_images.py build`` (``create=True``: made
    when missing) and ``add`` (``create=False``: it must exist) do.

    Pictures already in the index are not captioned again. The captions go to :data:`PENDING_FILE` in the
    index folder first (``caption_files.caption_to_jsonl``: a killed build continues where it stopped when run
    again with the same inputs), and are committed to the index by the main process at the end. Every process
    of ``state`` (an ``Accelerator`` or ``PartialState``; default: this process alone) captions its share.

    Args:
        inputs: from ``caption_files.collect_inputs`` or ``dataset_inputs``, or files, folders (scanned
            recursively), globs and URLs.
        batch_size, num_workers, autocast, progress, label: see ``caption_files.caption_to_jsonl``.

    Raises:
        CaptionIndexError: no index to add to, a folder that is not one, or an index built with another model
            or other generation settings (one line; a ``ValueError``).
        ValueError: more returned captions than beams.
    """
    from accelerate import PartialState

    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences must be between 1 and num_beams ({num_beams}), not {num_return_sequences}"
        )
    state = state if state is not None else PartialState()
    if not isinstance(inputs, Inputs):
        inputs = collect_inputs([os.fspath(entry) for entry in inputs])
    path = Path(index).expanduser()
    record = index_model_record(
        model,
        processor,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        max_new_tokens=max_new_tokens,
    )
    caption_index = _open_for_writing(path, record, create, state)
    fresh = [position for position, key in enumerate(inputs.keys) if key not in caption_index]
    already = len(inputs.keys) - len(fresh)
    if already and state.is_main_process:
        print(f"{label}{already} pictures already indexed", file=sys.stderr)
    pending = path / PENDING_FILE
    failed = 0
    if fresh:
        generation = {"num_beams": num_beams, "num_return_sequences": num_return_sequences}
        if max_new_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens
        run = caption_to_jsonl(
            model,
            processor,
            _select(inputs, fresh),
            pending,
            state=state,
            progress=progress,
            label=label,
            batch_size=batch_size,
            num_workers=num_workers,
            autocast=autocast,
            **generation,
        )
        failed = run.failed + len(run.missing)
    if not state.is_main_process:
        return IndexBuild(0, 0, already, 0)
    # A killed run's captions are committed too (its pending file), even when no picture is new this time.
    added = caption_index.add(pictures_from_caption_rows(pending)) if pending.is_file() else 0
    pending.unlink(missing_ok=True)
    return IndexBuild(added, len(caption_index), already, failed)
