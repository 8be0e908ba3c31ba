"""Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, ...) plus an image folder.

The JSON looks like::

    {"dataset": "flickr30k",
     "images": [{"filename": "1000092795.jpg", "imgid": 0, "split": "train",
                 "sentences": [{"raw": "Two young guys ...", "tokens": ["two", ...], ...}, ...],
                 "sentids": [0, 1, 2, 3, 4]}, ...]}

COCO's version adds ``filepath`` (``train2014`` / ``val2014``), a sub-folder of the image folder.
Splits are ``train`` / ``val`` / ``test`` / ``restval``; ``restval`` images are trained on, as in
Karpathy's own code and the usual "Karpathy split" numbers. Captions are the ``raw`` sentences
(stripped), or the joined ``tokens`` when ``raw`` is absent; the tokenizer normalises case and
punctuation later. An image whose captions are all empty is kept with ``captions == []``: training skips
and counts such rows (``check_training_rows``). ``image_id`` is ``imgid``, the same value as ``img_id`` in the hub's Flickr30K.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from datasets import Dataset, DatasetDict

from .common import CAPTION_FEATURES, SPLITS, canonical_split, resolve_requested_splits, select_splits


def _captions(entry: dict, where: str) -> list[str]:
    """The non-empty captions of an entry; [] when they are all empty (the row is kept: training skips and
    counts rows without captions instead of refusing the whole dataset for one of them)."""
    sentences = entry.get("sentences", [])
    if not isinstance(sentences, list):
        raise ValueError(f"{where}: image {entry.get('filename')!r}: 'sentences' is not a list.")
    captions = []
    for sentence in sentences:
        if not isinstance(sentence, dict) or ("raw" not in sentence and "tokens" not in sentence):
            raise ValueError(
                f"{where}: image {entry.get('filename')!r} has a sentence without 'raw' or 'tokens': "
                f"{sentence!r:.80}"
            )
        text = sentence.get("raw")
        if text is None and sentence.get("tokens"):
            text = " ".join(str(token) for token in sentence["tokens"])
        if isinstance(text, str) and text.strip():
            captions.append(text.strip())
    return captions


def load_karpathy_json(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    splits: str | Iterable[str] | None = None,
    max_samples_per_split: int | None = None,
) -> DatasetDict:
    """Load a Karpathy split JSON and the images it lists.

    Args:
        json_path: the JSON file.
        image_dir: folder holding the images (default: ``images/`` next to the JSON).
        splits: which of train / validation / test to return (default all three).
        max_samples_per_split: keep the first N images of each split.

    Returns:
        train (train + restval) / validation (val) / test with ``image`` (absolute paths, decoded
        on access), ``captions`` and ``image_id``. Use :func:`write_parquet` to make a copy that
        embeds the image bytes.

    Raises:
        FileNotFoundError: the JSON or the image folder is missing, or images listed in the JSON
            are; the message names the first missing image and how many are missing.
        ValueError: the JSON is not in Karpathy's format, or has an unknown split name. (Empty captions
            are not an error: such an image gets ``captions == []``.)
    """
    json_path = Path(json_path).expanduser()
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split JSON not found: {json_path}")
    image_root = Path(image_dir).expanduser() if image_dir is not None else json_path.parent / "images"
    if not image_root.is_dir():
        how = "" if image_dir is not None else " (the default: 'images' next to the JSON; pass image_dir=...)"
        raise FileNotFoundError(f"Image folder for {json_path.name} not found: {image_root}{how}")
    image_root = image_root.resolve()
    with open(json_path, encoding="utf-8") as handle:
        document = json.load(handle)
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ValueError(
            f"{json_path}: not a Karpathy split JSON; expected an object with an 'images' list of "
            "{'filename', 'split', 'sentences': [{'raw', 'tokens'}], 'imgid'} entries."
        )
    wanted = resolve_requested_splits(splits)
    columns: dict[str, dict[str, list]] = {
        name: {"image": [], "captions": [], "image_id": []} for name in SPLITS
    }
    missing: list[Path] = []
    for position, entry in enumerate(document["images"]):
        if "filename" not in entry or "split" not in entry:
            raise ValueError(f"{json_path}: entry {position} lacks 'filename' or 'split': {sorted(entry)}")
        split = canonical_split(entry["split"], where=f"split in {json_path.name} (entry {position})")
        if split not in wanted:
            continue
        path = image_root / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            missing.append(path)
            continue
        image_id = entry.get("imgid", Path(entry["filename"]).stem)
        columns[split]["image"].append(str(path))
        columns[split]["captions"].append(_captions(entry, str(json_path)))
        columns[split]["image_id"].append(str(image_id))
    if missing:
        total = len(missing) + sum(len(columns[name]["image"]) for name in SPLITS)
        raise FileNotFoundError(
            f"{len(missing)} of {total} images listed in {json_path.name} are missing from {image_root}; "
            f"first missing: {missing[0]}"
        )
    dataset = {
        name: Dataset.from_dict(columns[name], features=CAPTION_FEATURES)
        for name in SPLITS
        if columns[name]["image"]
    }
    return select_splits(dataset, wanted, max_samples_per_split, source=str(json_path))
