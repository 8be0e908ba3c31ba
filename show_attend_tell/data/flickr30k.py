"""Flickr30K with Karpathy's splits, from the datasets hub.

``nlphuji/flickr30k`` is a script dataset, which current ``datasets`` refuses to run. The hub's
automatic parquet conversion of it (git revision ``refs/convert/parquet``) loads without the
script. Its schema is not ours: every image is in ONE hub split (named ``test`` there) and the
Karpathy split is a column:

======== ========================= ===========================================
column   type                      meaning
======== ========================= ===========================================
image    Image                     the photo (JPEG bytes)
caption  list of 5 strings         the captions
sentids  list of strings           sentence ids of the captions
split    string                    Karpathy split: ``train`` / ``val`` / ``test``
img_id   string                    Karpathy image index (same as ``imgid`` in
                                   ``dataset_flickr30k.json``)
filename string                    e.g. ``1000092795.jpg``
======== ========================= ===========================================

:func:`flickr30k_to_caption_dataset` maps that to our schema and split names; the hub loader and
the local-parquet loader (when it recognises this schema) both go through it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetNotFoundError

from ..errors import one_line
from .common import (
    SPLITS,
    describe_columns,
    ensure_string_column,
    group_by_split_column,
    select_splits,
)

#: Hub repository of the dataset.
FLICKR30K_REPO_ID = "nlphuji/flickr30k"
#: Git revision holding the hub's parquet conversion (the main branch only has the loading script).
FLICKR30K_REVISION = "refs/convert/parquet"
#: Karpathy's Flickr30K split: images per split (5 captions each). A loaded copy that differs
#: (a partial conversion, a truncated download) triggers a warning, not an error, so subsets
#: made on purpose still load.
FLICKR30K_KARPATHY_SPLIT_SIZES: dict[str, int] = {"train": 29000, "validation": 1014, "test": 1000}
#: The columns that identify the nlphuji schema.
FLICKR30K_HUB_COLUMNS: tuple[str, ...] = ("image", "caption", "split", "img_id")


def hub_download_command(repo_id: str = FLICKR30K_REPO_ID, revision: str | None = FLICKR30K_REVISION) -> str:
    """The `hf` command that copies the dataset's files into a folder DIR for use without network."""
    branch = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id} --repo-type dataset{branch} --local-dir DIR"


class DatasetDownloadError(ConnectionError):
    """The dataset could not be fetched from the datasets hub: no network, offline mode (`HF_HUB_OFFLINE=1`),
    a missing repository or revision, or a download cut off half-way. `str()` says what to do in Python;
    `command_line_message()` says the same with the scripts' options."""

    def __init__(self, repo_id: str, revision: str | None, reason: str) -> None:
        self.repo_id, self.revision, self.reason = repo_id, revision, reason
        super().__init__(
            f"{self._what()}. Without network access, run `{hub_download_command(repo_id, revision)}` where "
            "there is network and pass that folder: load_caption_dataset('flickr30k', data_dir=DIR); or use a "
            "Karpathy JSON with its images: load_caption_dataset('path/to/dataset_flickr30k.json', image_dir=...)"
        )

    def _what(self) -> str:
        return f"could not download {self.repo_id} (revision {self.revision}) from the datasets hub: {self.reason}"

    def command_line_message(self) -> str:
        """One line for the scripts: the options that load the same data without network."""
        return (
            f"{self._what()}. Without network access, run `{hub_download_command(self.repo_id, self.revision)}` "
            "where there is network, then pass --data-dir DIR; or use a Karpathy JSON with its images: "
            "--dataset path/to/dataset_flickr30k.json --image-dir IMAGES"
        )


def _download_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the hub could not be reached or a download broke off. Which HTTP library
    raises them depends on the huggingface_hub version (httpx in 1.x, requests before)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, DatasetNotFoundError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import HfHubHTTPError

        found.append(HfHubHTTPError)
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import XetDownloadError

        found.append(XetDownloadError)
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import httpx

        found.append(httpx.HTTPError)
    with contextlib.suppress(ImportError):
        import requests

        found.append(requests.RequestException)
    return tuple(found)


def is_flickr30k_hub_schema(column_names: Iterable[str]) -> bool:
    """Whether a table has the nlphuji/flickr30k columns (rather than ours)."""
    names = set(column_names)
    return set(FLICKR30K_HUB_COLUMNS) <= names and "captions" not in names


def flickr30k_to_caption_dataset(
    raw: Dataset | Mapping[str, Dataset],
    *,
    expected_sizes: Mapping[str, int] | None = FLICKR30K_KARPATHY_SPLIT_SIZES,
    source: str = FLICKR30K_REPO_ID,
) -> DatasetDict:
    """Map rows in the nlphuji/flickr30k schema to train / validation / test in our schema.

    Args:
        raw: the loaded table, or a DatasetDict of them (the hub's split names are ignored:
            the ``split`` column decides, ``val`` becoming ``validation``).
        expected_sizes: warn when the split sizes differ from these; None disables the check.
        source: how warnings and errors name the data.

    Returns:
        A DatasetDict with ``image``, ``captions`` (the 5 captions) and ``image_id`` (``img_id``).
    """
    if isinstance(raw, Mapping):
        parts = [raw[name] for name in raw]
        if not parts:
            raise ValueError(f"{source}: no data was loaded.")
        table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    else:
        table = raw
    missing = [name for name in FLICKR30K_HUB_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {describe_columns(missing)}; expected the nlphuji/flickr30k "
            f"schema ({describe_columns(FLICKR30K_HUB_COLUMNS)}, ...), found "
            f"{describe_columns(table.column_names)}."
        )
    table = table.select_columns(["image", "caption", "img_id", "split"])
    groups = group_by_split_column(table, "split", source=source)
    out = DatasetDict()
    for name in SPLITS:
        if name not in groups:
            continue
        part = groups[name].rename_columns({"caption": "captions", "img_id": "image_id"})
        out[name] = ensure_string_column(part, "image_id")
    if expected_sizes is not None:
        found = {name: len(out[name]) if name in out else 0 for name in SPLITS}
        if found != dict(expected_sizes):
            warnings.warn(
                f"{source}: split sizes {found} differ from Karpathy's Flickr30K split "
                f"{dict(expected_sizes)} (FLICKR30K_KARPATHY_SPLIT_SIZES); a partial or modified copy?",
                UserWarning,
                stacklevel=2,
            )
    return out


def load_flickr30k(
    *,
    repo_id: str | os.PathLike = FLICKR30K_REPO_ID,
    revision: str | None = FLICKR30K_REVISION,
    cache_dir: str | os.PathLike | None = None,
    splits: str | Iterable[str] | None = None,
    max_samples_per_split: int | None = None,
    **load_kwargs: Any,
) -> DatasetDict:
    """Load Flickr30K (Karpathy splits) from the datasets hub, or a local copy of the same files.

    Args:
        repo_id: hub dataset id, or a local folder laid out like the hub repository's parquet
            branch (e.g. made by ``hf download nlphuji/flickr30k --repo-type dataset
            --revision refs/convert/parquet --local-dir DIR``); both are read by the same
            ``datasets.load_dataset`` call and mapped by :func:`flickr30k_to_caption_dataset`.
        revision: git revision on the hub (ignored for a local folder).
        cache_dir: datasets cache folder (default: the datasets library's own).
        splits: which of train / validation / test to return (default all three).
        max_samples_per_split: keep the first N images of each split. The whole dataset
            (about 4 GB) is still downloaded once; pass ``data_files=`` to fetch fewer shards.
        **load_kwargs: passed on to ``datasets.load_dataset`` (``data_files``, ``token``,
            ``num_proc``, ...).

    Returns:
        train (29,000) / validation (1,014) / test (1,000) with ``image``, ``captions``, ``image_id``.

    Raises:
        DatasetDownloadError: no network, offline mode, the repository or revision is missing on the hub,
            or a download broke off; the message says how to download the files for use without network.
    """
    repo = os.fspath(repo_id)
    local = Path(repo).expanduser().is_dir()
    try:
        raw = load_dataset(
            repo, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir), **load_kwargs
        )
    except _download_error_types() as error:
        if local and not isinstance(error, (ConnectionError, TimeoutError)):
            raise  # a local folder's own problem (no parquet files...), not the network's
        raise DatasetDownloadError(repo, revision, one_line(error)) from error
    dataset = flickr30k_to_caption_dataset(raw, source=repo)
    return select_splits(dataset, splits, max_samples_per_split, source=repo)
