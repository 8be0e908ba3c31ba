"""Tests of show_attend_tell.data: synthetic shapes, Flickr30K mapping, Karpathy JSON, local files."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import flickr30k_hub_features
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from show_attend_tell.data import (
    COLOR_RGB,
    COLORS,
    FLICKR30K_KARPATHY_SPLIT_SIZES,
    SHAPES,
    SIZES,
    SPLITS,
    DatasetDownloadError,
    flickr30k_to_caption_dataset,
    load_caption_dataset,
    load_flickr30k,
    make_synthetic_dataset,
    write_parquet,
)
from show_attend_tell.data.common import list_feature
from show_attend_tell.data.synthetic import SYNTHETIC_VERSION, relation, synthetic_cache_path

# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


def png_bytes(color: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_image_bytes(split: Dataset) -> list[bytes]:
    return [item["bytes"] for item in split.cast_column("image", Image(decode=False))["image"]]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> datasets.DatasetDict:
    cache = tmp_path_factory.mktemp("synthetic-cache")
    return make_synthetic_dataset(num_train=60, num_validation=10, num_test=10, seed=3, cache_dir=cache)


#: nlphuji/flickr30k's parquet conversion, column for column.
FLICKR_HUB_FEATURES = flickr30k_hub_features()


def flickr_hub_rows(karpathy_splits: list[str]) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in FLICKR_HUB_FEATURES}
    for index, split in enumerate(karpathy_splits):
        rows["image"].append({"bytes": png_bytes((index * 20 % 256, 10, 200)), "path": None})
        rows["caption"].append([f"photo {index} caption {k}" for k in range(5)])
        rows["sentids"].append([str(index * 5 + k) for k in range(5)])
        rows["split"].append(split)
        rows["img_id"].append(str(index))
        rows["filename"].append(f"{1000 + index}.jpg")
    return rows


@pytest.fixture
def flickr_hub_dir(tmp_path: Path) -> Path:
    """A folder laid out like the hub repository's parquet branch: one hub split, two shards."""
    splits = ["train", "val", "test", "train", "train", "test", "val", "train"]
    table = Dataset.from_dict(flickr_hub_rows(splits), features=FLICKR_HUB_FEATURES)
    shard_dir = tmp_path / "flickr30k-repo" / "TEST" / "test"
    shard_dir.mkdir(parents=True)
    table.select(range(4)).to_parquet(str(shard_dir / "0000.parquet"))
    table.select(range(4, 8)).to_parquet(str(shard_dir / "0001.parquet"))
    return tmp_path / "flickr30k-repo"


def write_karpathy(root: Path, splits: list[str], *, filepath: str | None = None) -> Path:
    """A Karpathy split JSON in root, images in root/images (optionally in a filepath sub-folder)."""
    image_dir = root / "images" / (filepath or "")
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, split in enumerate(splits):
        filename = f"{2000 + index}.jpg"
        PILImage.new("RGB", (10, 8), (index * 30, 100, 50)).save(image_dir / filename, format="JPEG")
        entry = {
            "filename": filename,
            "imgid": index,
            "split": split,
            "sentids": [index * 5 + k for k in range(5)],
            "sentences": [
                {
                    "raw": f"A picture number {index}, caption {k}. ",
                    "tokens": ["a", "picture"],
                    "imgid": index,
                }
                for k in range(5)
            ],
        }
        if filepath:
            entry["filepath"] = filepath
        entries.append(entry)
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return path


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_columns_and_splits(small_synthetic: datasets.DatasetDict) -> None:
    assert list(small_synthetic) == list(SPLITS)
    assert [len(small_synthetic[s]) for s in SPLITS] == [60, 10, 10]
    train = small_synthetic["train"]
    assert isinstance(train.features["image"], Image)
    assert {"image", "captions", "image_id", "objects"} <= set(train.column_names)
    captions = train["captions"]
    assert all(isinstance(c, list) and all(isinstance(t, str) for t in c) for c in captions)
    ids = [str(i) for s in SPLITS for i in small_synthetic[s]["image_id"]]
    assert len(set(ids)) == len(ids)
    image = train[0]["image"]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = make_synthetic_dataset(12, 3, 3, seed=7, cache_dir=tmp_path / "a")
    b = make_synthetic_dataset(12, 3, 3, seed=7, cache_dir=tmp_path / "b")
    c = make_synthetic_dataset(12, 3, 3, seed=8, cache_dir=tmp_path / "c")
    for split in SPLITS:
        assert raw_image_bytes(a[split]) == raw_image_bytes(b[split])
        assert a[split]["captions"] == b[split]["captions"]
        assert a[split]["objects"] == b[split]["objects"]
    assert raw_image_bytes(a["train"]) != raw_image_bytes(c["train"])
    assert a["train"]["captions"] != c["train"]["captions"]
    # Splits are different pictures, not copies of each other.
    assert set(raw_image_bytes(a["validation"])).isdisjoint(raw_image_bytes(a["test"]))


def test_synthetic_prefix_does_not_depend_on_split_size() -> None:
    few = make_synthetic_dataset(4, 2, 2, seed=1, use_cache=False)
    more = make_synthetic_dataset(9, 5, 2, seed=1, use_cache=False)
    assert raw_image_bytes(few["train"]) == raw_image_bytes(more["train"])[:4]
    assert few["validation"]["captions"] == more["validation"]["captions"][:2]


def test_synthetic_cache_is_reused(tmp_path: Path) -> None:
    first = make_synthetic_dataset(5, 2, 2, seed=0, cache_dir=tmp_path)
    path = synthetic_cache_path(
        tmp_path, sizes={"train": 5, "validation": 2, "test": 2}, image_size=64, seed=0
    )
    assert path.is_dir() and f"v{SYNTHETIC_VERSION}-" in path.name
    # Generation is not repeated: a marker file in the cache folder survives the second call.
    (path / "marker").write_text("kept")
    second = make_synthetic_dataset(5, 2, 2, seed=0, cache_dir=tmp_path)
    assert (path / "marker").exists()
    assert raw_image_bytes(first["train"]) == raw_image_bytes(second["train"])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_synthetic_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOW_ATTEND_TELL_CACHE", str(tmp_path))
    make_synthetic_dataset(2, 1, 1, seed=0)
    assert list((tmp_path / "synthetic").iterdir())


def test_synthetic_captions_name_every_object(small_synthetic: datasets.DatasetDict) -> None:
    counts = set()
    for row in small_synthetic["train"]:
        captions, objects = row["captions"], row["objects"]
        counts.add(len(objects))
        assert 1 <= len(objects) <= 3
        assert len(captions) == 5 and len(set(captions)) == 5
        # Distinct shapes per picture: a shape word identifies one box.
        assert len({o["shape"] for o in objects}) == len(objects)
        for caption in captions:
            tokens = words(caption)
            for obj in objects:
                assert obj["shape"] in SHAPES and obj["color"] in COLORS and obj["size"] in SIZES
                phrase = f"{obj['size']} {obj['color']} {obj['shape']}"
                assert phrase in " ".join(tokens), (caption, obj)
            # No shape or colour word that belongs to no object.
            assert {t for t in tokens if t in SHAPES} == {o["shape"] for o in objects}
            assert {t for t in tokens if t in COLORS} == {o["color"] for o in objects}
    assert counts == {1, 2, 3}


def test_synthetic_relations_are_true(small_synthetic: datasets.DatasetDict) -> None:
    from show_attend_tell.data.synthetic import ShapeObject

    checked = 0
    for row in small_synthetic["train"]:
        if len(row["objects"]) != 2:
            continue
        a, b = sorted(
            (ShapeObject(o["shape"], o["color"], o["size"], tuple(o["box"])) for o in row["objects"]),
            key=lambda o: o.center,
        )
        first = row["captions"][0]
        assert first.startswith(f"a {a.phrase} ") and first.endswith(f" a {b.phrase}")
        expected = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[
            relation(a, b)
        ]
        assert f" {expected} " in first
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("image_size", [64, 256])
def test_synthetic_boxes_match_pixels(tmp_path: Path, image_size: int) -> None:
    count = 40 if image_size == 64 else 12
    data = make_synthetic_dataset(count, 0, 0, image_size=image_size, seed=5, cache_dir=tmp_path)["train"]
    min_side = math.ceil(image_size / 8)
    for row in data:
        pixels = np.asarray(row["image"].convert("RGB"))
        assert pixels.shape == (image_size, image_size, 3)
        boxes = [o["box"] for o in row["objects"]]
        for obj in row["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            assert x1 - x0 >= min_side and y1 - y0 >= min_side
            rgb = np.array(COLOR_RGB[obj["color"]])
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert (pixels[cy, cx] == rgb).all(), (obj, pixels[cy, cx])
            # The object's pixels fill its box edge to edge (within a pixel of rasterisation).
            ys, xs = np.nonzero((pixels[y0:y1, x0:x1] == rgb).all(axis=-1))
            assert abs(xs.min()) <= 1 and abs(ys.min()) <= 1
            assert abs(xs.max() + 1 - (x1 - x0)) <= 1 and abs(ys.max() + 1 - (y1 - y0)) <= 1
        # Nothing coloured outside the boxes: the background never takes an object colour.
        outside = np.ones((image_size, image_size), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            outside[y0:y1, x0:x1] = False
        for rgb in COLOR_RGB.values():
            assert not (pixels[outside] == np.array(rgb)).all(axis=-1).any()
        # Boxes do not overlap.
        for i, (a0, b0, a1, b1) in enumerate(boxes):
            for c0, d0, c1, d1 in boxes[i + 1 :]:
                assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0
    sides = {o["size"]: o["box"][2] - o["box"][0] for row in data for o in row["objects"]}
    assert sides["small"] < sides["large"]


def test_synthetic_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_dataset(1, 1, 1, image_size=16, use_cache=False)
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic_dataset(-1, 1, 1, use_cache=False)


def test_synthetic_through_entry_point(tmp_path: Path) -> None:
    data = load_caption_dataset(
        "synthetic",
        cache_dir=tmp_path,
        seed=2,
        num_train=30,
        max_samples_per_split=4,
        splits=["val", "train"],
    )
    assert list(data) == ["train", "validation"]
    assert len(data["train"]) == 4 and len(data["validation"]) == 4
    full = make_synthetic_dataset(6, 6, 6, seed=2, use_cache=False)
    assert data["train"]["captions"] == full["train"]["captions"][:4]


# ---------------------------------------------------------------------------------------------
# Flickr30K (hub schema)


def test_flickr30k_hub_loader_maps_a_local_repository(flickr_hub_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="FLICKR30K_KARPATHY_SPLIT_SIZES"):
        data = load_flickr30k(repo_id=flickr_hub_dir, cache_dir=tmp_path / "hf-cache")
    assert list(data) == list(SPLITS)
    assert {s: len(data[s]) for s in SPLITS} == {"train": 4, "validation": 2, "test": 2}
    for split in SPLITS:
        assert data[split].column_names == ["image", "captions", "image_id"]
        assert isinstance(data[split].features["image"], Image)
    # Rows keep their images, captions and ids together, val -> validation.
    expected = {"train": ["0", "3", "4", "7"], "validation": ["1", "6"], "test": ["2", "5"]}
    for split, ids in expected.items():
        assert data[split]["image_id"] == ids
    row = data["validation"][1]
    assert row["captions"] == [f"photo 6 caption {k}" for k in range(5)]
    assert row["image"].getpixel((0, 0)) == (120, 10, 200)


def test_flickr30k_source_with_data_dir(flickr_hub_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        data = load_caption_dataset(
            "flickr30k", data_dir=flickr_hub_dir, cache_dir=tmp_path / "hf", max_samples_per_split=1
        )
    assert [len(data[s]) for s in SPLITS] == [1, 1, 1]


def test_flickr30k_full_sizes_do_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    splits = ["train"] * 29000 + ["val"] * 1014 + ["test"] * 1000
    table = Dataset.from_dict(
        {
            "image": [None] * len(splits),
            "caption": [["c"]] * len(splits),
            "split": splits,
            "img_id": [str(i) for i in range(len(splits))],
        },
        features=Features(
            {
                "image": Image(),
                "caption": list_feature(Value("string")),
                "split": Value("string"),
                "img_id": Value("string"),
            }
        ),
    )
    data = flickr30k_to_caption_dataset(datasets.DatasetDict({"test": table}))
    assert {s: len(data[s]) for s in SPLITS} == FLICKR30K_KARPATHY_SPLIT_SIZES
    assert not [w for w in recwarn if "FLICKR30K" in str(w.message)]


def test_flickr30k_rejects_unknown_split_values() -> None:
    rows = flickr_hub_rows(["train", "holdout"])
    table = Dataset.from_dict(rows, features=FLICKR_HUB_FEATURES)
    with pytest.raises(ValueError, match=r"holdout.*expected \['train', 'validation', 'test'\]"):
        flickr30k_to_caption_dataset(table)
    with pytest.raises(ValueError, match="missing column"):
        flickr30k_to_caption_dataset(table.remove_columns(["split"]))


def test_flickr30k_hub_offline_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The real hub path, stopped at the network: offline mode makes datasets fail at once.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="data_dir"):
        load_flickr30k(cache_dir=tmp_path)


def test_flickr30k_download_errors_say_how_to_work_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from datasets.exceptions import DatasetNotFoundError

    import show_attend_tell.data.flickr30k as flickr30k

    failure: Exception = DatasetNotFoundError("Revision 'refs/convert/parquet' doesn't exist")

    def failing_load_dataset(*args, **kwargs):
        raise failure

    monkeypatch.setattr(flickr30k, "load_dataset", failing_load_dataset)
    with pytest.raises(DatasetDownloadError) as caught:  # a ConnectionError, as before
        load_flickr30k(cache_dir=tmp_path)
    assert isinstance(caught.value, ConnectionError) and caught.value.__cause__ is failure
    download = (
        "hf download nlphuji/flickr30k --repo-type dataset --revision refs/convert/parquet --local-dir DIR"
    )
    assert download in str(caught.value) and "data_dir=DIR" in str(caught.value)  # Python's words
    assert download in caught.value.command_line_message()
    assert "--data-dir DIR" in caught.value.command_line_message()  # the scripts' words
    assert "data_dir=" not in caught.value.command_line_message()
    # A local folder's own problem is not a network problem: it keeps its message.
    failure = FileNotFoundError("no data files in the folder")
    with pytest.raises(FileNotFoundError, match="no data files") as caught:
        load_caption_dataset("flickr30k", data_dir=tmp_path)
    assert not isinstance(caught.value, DatasetDownloadError)


def test_flickr30k_schema_detected_in_local_parquet(tmp_path: Path) -> None:
    table = Dataset.from_dict(flickr_hub_rows(["train", "val", "test", "test"]), features=FLICKR_HUB_FEATURES)
    path = tmp_path / "flickr30k_images.parquet"
    table.to_parquet(str(path))
    with pytest.warns(UserWarning):
        data = load_caption_dataset(path, cache_dir=tmp_path / "hf")
    assert [len(data[s]) for s in SPLITS] == [1, 1, 2]
    assert data["test"]["image_id"] == ["2", "3"]


# ---------------------------------------------------------------------------------------------
# Karpathy JSON


def test_karpathy_json_with_images(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, ["train", "restval", "val", "test", "test", "train"])
    data = load_caption_dataset(path)  # image_dir defaults to images/ next to the JSON
    assert list(data) == list(SPLITS)
    assert data["train"]["image_id"] == ["0", "1", "5"]  # restval trained on
    assert data["validation"]["image_id"] == ["2"]
    assert data["test"]["image_id"] == ["3", "4"]
    row = data["test"][0]
    assert row["captions"] == [f"A picture number 3, caption {k}." for k in range(5)]
    assert row["image"].size == (10, 8)
    # The folder form finds the JSON and its images too.
    assert load_caption_dataset(tmp_path)["test"]["image_id"] == ["3", "4"]


def test_karpathy_json_filepath_and_explicit_image_dir(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path / "meta", ["train", "val", "test"], filepath="val2014")
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "meta" / "images"), str(moved))
    data = load_caption_dataset(path, image_dir=moved, splits=["test"])
    assert list(data) == ["test"] and data["test"][0]["image"].size == (10, 8)


def test_karpathy_missing_images_are_reported(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, ["train", "val", "test", "train"])
    (tmp_path / "images" / "2001.jpg").unlink()
    (tmp_path / "images" / "2003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 4 images .* first missing: .*2001\.jpg"):
        load_caption_dataset(path)
    with pytest.raises(FileNotFoundError, match="Image folder"):
        load_caption_dataset(path, image_dir=tmp_path / "nowhere")


def test_karpathy_unknown_split_and_bad_format(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, ["train", "holdout"])
    with pytest.raises(ValueError, match="holdout"):
        load_caption_dataset(path)
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="'images' list"):
        load_caption_dataset(bad, image_dir=tmp_path / "images")


def test_karpathy_image_without_captions_is_kept_with_none(tmp_path: Path) -> None:
    # One image's captions are all empty: the dataset still loads (training skips and counts that row).
    path = write_karpathy(tmp_path, ["train", "train", "val", "test"])
    document = json.loads(path.read_text())
    document["images"][1]["sentences"] = [{"raw": "", "tokens": []}, {"raw": "   "}, {"tokens": []}]
    document["images"][3]["sentences"] = []
    path.write_text(json.dumps(document))
    data = load_caption_dataset(path)
    assert data["train"]["image_id"] == ["0", "1"]
    assert data["train"]["captions"][1] == [] and len(data["train"]["captions"][0]) == 5
    assert data["test"]["captions"] == [[]]
    # A sentence with neither 'raw' nor 'tokens' is not Karpathy's format: that stays an error.
    document["images"][0]["sentences"] = [{"text": "a caption under another key"}]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"'2000\.jpg' has a sentence without 'raw' or 'tokens'"):
        load_caption_dataset(path)


# ---------------------------------------------------------------------------------------------
# Local parquet and image folders


def test_parquet_round_trip_embeds_bytes(small_synthetic: datasets.DatasetDict, tmp_path: Path) -> None:
    files = write_parquet(small_synthetic, tmp_path / "pq", max_rows_per_file=25)
    assert sorted(p.name for p in files)[:3] == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
    ]
    data = load_caption_dataset(tmp_path / "pq", cache_dir=tmp_path / "hf")
    for split in SPLITS:
        assert raw_image_bytes(data[split]) == raw_image_bytes(small_synthetic[split])
        assert data[split]["captions"] == small_synthetic[split]["captions"]
        assert data[split]["objects"] == small_synthetic[split]["objects"]
    assert isinstance(data["train"].features["image"], Image)
    # Dataset.to_parquet of the synthetic data is self-contained as well.
    small_synthetic["test"].to_parquet(str(tmp_path / "single" / "test.parquet"))
    reloaded = load_caption_dataset(
        "parquet", data_dir=tmp_path / "single", splits="test", cache_dir=tmp_path / "hf"
    )
    assert raw_image_bytes(reloaded["test"]) == raw_image_bytes(small_synthetic["test"])


def test_write_parquet_embeds_files_loaded_from_paths(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path / "src", ["train", "val", "test"])
    data = load_caption_dataset(path)
    write_parquet(data, tmp_path / "pq")
    shutil.rmtree(tmp_path / "src")  # the copy must not need the original images
    reloaded = load_caption_dataset(tmp_path / "pq", cache_dir=tmp_path / "hf")
    assert reloaded["validation"][0]["image"].size == (10, 8)
    assert reloaded["train"]["captions"] == data["train"]["captions"]


def test_parquet_with_split_column(tmp_path: Path) -> None:
    table = Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes((i, 0, 0)), "path": None} for i in range(4)],
            "caption": ["one", "two", "three", "four"],
            "split": ["train", "dev", "test", "train"],
        },
        features=Features({"image": Image(), "caption": Value("string"), "split": Value("string")}),
    )
    table.to_parquet(str(tmp_path / "all.parquet"))
    data = load_caption_dataset(tmp_path / "all.parquet", cache_dir=tmp_path / "hf")
    assert data["train"]["captions"] == [["one"], ["four"]]
    assert data["validation"]["image_id"] == ["validation-000000"]
    assert "split" not in data["train"].column_names


def test_parquet_without_split_information_is_an_error(tmp_path: Path) -> None:
    table = Dataset.from_dict(
        {"image": [{"bytes": png_bytes((0, 0, 0)), "path": None}], "captions": [["x"]]},
        features=Features({"image": Image(), "captions": list_feature(Value("string"))}),
    )
    table.to_parquet(str(tmp_path / "captions.parquet"))
    with pytest.raises(ValueError, match="cannot tell which split"):
        load_caption_dataset(tmp_path / "captions.parquet", cache_dir=tmp_path / "hf")


def test_image_folder_with_split_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as handle:
            for index in range(2):
                name = f"{split}_{index}.png"
                PILImage.new("RGB", (9, 9), (index * 100, 0, 0)).save(root / split / name)
                handle.write(
                    json.dumps({"file_name": name, "captions": [f"{split} {index}", "another"]}) + "\n"
                )
    data = load_caption_dataset(root, cache_dir=tmp_path / "hf")
    assert list(data) == list(SPLITS)
    assert data["validation"]["image_id"] == ["val_0", "val_1"]
    assert data["validation"]["captions"][1] == ["val 1", "another"]
    assert data["test"][0]["image"].size == (9, 9)


def test_image_folder_with_csv_and_split_column(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    (root / "pictures").mkdir(parents=True)
    lines = ["file_name,captions,split"]
    for index, split in enumerate(["train", "val", "test", "restval"]):
        PILImage.new("RGB", (5, 5), (0, index * 50, 0)).save(root / "pictures" / f"p{index}.png")
        captions = json.dumps([f"picture {index}", "a second caption"]).replace('"', '""')
        lines.append(f'pictures/p{index}.png,"{captions}",{split}')
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = load_caption_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "hf")
    assert sorted(data["train"]["image_id"]) == ["p0", "p3"]
    assert data["test"]["captions"] == [["picture 2", "a second caption"]]


def test_image_folder_without_captions_is_an_error(tmp_path: Path) -> None:
    for split in ("train", "validation", "test"):
        (tmp_path / "f" / split).mkdir(parents=True)
        PILImage.new("RGB", (5, 5)).save(tmp_path / "f" / split / "a.png")
    with pytest.raises(ValueError, match="captions"):
        load_caption_dataset(tmp_path / "f", cache_dir=tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# Errors of the entry point


def test_unknown_source_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown dataset source 'flickr8k'.*synthetic.*flickr30k"):
        load_caption_dataset("flickr8k")


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_caption_dataset(str(tmp_path / "nope" / "dataset_flickr30k.json"))
    with pytest.raises(FileNotFoundError):
        load_caption_dataset("parquet", data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_caption_dataset("karpathy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no parquet files"):
        load_caption_dataset(tmp_path / "empty")


def test_unknown_and_missing_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'dev2'.*expected one of \['train', 'validation', 'test'\]"):
        load_caption_dataset("synthetic", splits=["dev2"], cache_dir=tmp_path, max_samples_per_split=1)
    path = write_karpathy(tmp_path / "k", ["train", "val"])
    with pytest.raises(ValueError, match=r"no \['test'\] split"):
        load_caption_dataset(path)
    assert list(load_caption_dataset(path, splits=["train", "validation"])) == ["train", "validation"]


def test_options_a_source_does_not_use(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_dir"):
        load_caption_dataset("synthetic", image_dir=tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        load_caption_dataset(str(tmp_path), data_dir=tmp_path)
