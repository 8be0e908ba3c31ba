"""The caption index (show_attend_tell.caption_index): adding, removing, ranking, bad queries, damage, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from show_attend_tell import caption_index
from show_attend_tell.caption_index import (
    CaptionIndex,
    CaptionIndexError,
    IndexedPicture,
    IndexModelMismatchError,
    query_terms,
)

MODEL = {"fingerprint": "0123456789abcdef", "generation": {"num_beams": 3, "num_return_sequences": 3}}

PICTURES = [
    IndexedPicture(
        "red-circle.png",
        ("a small red circle to the left of a large blue star", "a red circle and a blue star"),
        "/photos/red-circle.png",
    ),
    IndexedPicture("blue-circle.png", ("a small blue circle", "a blue circle"), "/photos/blue-circle.png"),
    IndexedPicture("red-star.png", ("a large red star above a green square", "a red star"), None),
    IndexedPicture("dir/with space:and'quote\".png", ("a yellow triangle",), None),
]
# A file name that is not UTF-8 (legal on Linux) reaches Python with its bytes escaped as lone surrogates.
NOT_UTF8 = IndexedPicture("caf\udce9.png", ("a white cross",), "/photos/caf\udce9.png")


def test_ids_that_are_not_utf8_round_trip(index):
    assert index.add([NOT_UTF8]) == 1 and NOT_UTF8.image_id in index
    (hit,) = index.search("white cross")
    assert (hit.image_id, hit.source) == (NOT_UTF8.image_id, NOT_UTF8.source)
    assert NOT_UTF8 in set(index.pictures())
    assert index.remove([NOT_UTF8.image_id]) == 1 and NOT_UTF8.image_id not in index


@pytest.fixture
def index(tmp_path) -> CaptionIndex:
    created = CaptionIndex.create(tmp_path / "index", MODEL)
    assert created.add(PICTURES) == len(PICTURES)
    return created


def ids(hits) -> list[str]:
    return [hit.image_id for hit in hits]


def test_phrases_rank_before_scattered_words(index):
    # Both circles are "small ... circle"; only one has "small red circle" as a phrase.
    hits = index.search("A small, RED circle!", limit=10)
    assert ids(hits)[0] == "red-circle.png"
    assert hits[0].phrase == 3
    assert hits[0].captions == PICTURES[0].captions and hits[0].source == "/photos/red-circle.png"
    # Every picture with any of the words is found, each once; the phrase length never increases.
    assert set(ids(hits)) == {"red-circle.png", "blue-circle.png", "red-star.png"}
    assert len(set(ids(hits))) == len(hits)
    assert [hit.phrase for hit in hits] == sorted((hit.phrase for hit in hits), reverse=True)
    # "red star" is a phrase of one picture; "red" and "star" are also in the first picture, apart.
    assert ids(index.search("red star", limit=10))[:2] == ["red-star.png", "red-circle.png"]
    assert ids(index.search("red star", limit=1)) == ["red-star.png"]
    assert ids(index.search("yellow", limit=5)) == ["dir/with space:and'quote\".png"]


def test_add_replaces_remove_deletes_and_both_survive_reopening(index, tmp_path):
    assert len(index) == 4 and "red-star.png" in index and "nope.png" not in index
    index.add([IndexedPicture("red-star.png", ("a purple hexagon",), None)])
    assert len(index) == 4
    assert ids(index.search("purple hexagon")) == ["red-star.png"]
    assert "red-star.png" not in ids(index.search("green square"))

    assert index.remove(["red-star.png", "dir/with space:and'quote\".png", "never-added.png"]) == 2
    assert len(index) == 2
    assert index.search("yellow triangle") == [] and index.search("purple") == []

    again = CaptionIndex.open(tmp_path / "index", MODEL)
    assert len(again) == 2
    assert {picture.image_id for picture in again.pictures()} == {"red-circle.png", "blue-circle.png"}
    assert ids(again.search("blue circle"))[0] == "blue-circle.png"
    # Another open instance sees commits made through the first one.
    index.add([IndexedPicture("new.png", ("a green cross",), None)])
    assert ids(again.search("green cross")) == ["new.png"]


class CountingReloads:
    """The engine, counting how often its reader is reloaded."""

    def __init__(self, engine) -> None:
        self.engine, self.reloads = engine, 0

    def reload(self) -> None:
        self.reloads += 1
        self.engine.reload()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_queries_reuse_the_searcher_until_a_commit(index, tmp_path):
    engine = index._engine = CountingReloads(index._engine)
    for query in ("red circle", "blue star", "a small red circle", "yellow"):
        assert index.search(query)
    assert engine.reloads <= 1  # one searcher for every query since the last commit
    other = CaptionIndex.open(tmp_path / "index", MODEL)  # another writer, as another process would be
    other.add([IndexedPicture("cross.png", ("a white cross",), None)])
    assert ids(index.search("white cross")) == ["cross.png"]
    reloads = engine.reloads
    other.remove(["cross.png"])
    assert index.search("white cross") == [] and engine.reloads == reloads + 1


def test_a_different_model_or_setting_is_refused_in_one_line(index, tmp_path):
    for other, expected in (
        (
            {**MODEL, "fingerprint": "fedcba9876543210"},
            "another model (weights 0123456789ab, not fedcba987654)",
        ),
        (
            {**MODEL, "generation": {"num_beams": 5, "num_return_sequences": 3}},
            "other generation settings: num_beams=3 (not 5);",
        ),
    ):
        with pytest.raises(IndexModelMismatchError) as error:
            CaptionIndex.open(tmp_path / "index", other)
        assert "\n" not in str(error.value) and expected in str(error.value)
        with pytest.raises(IndexModelMismatchError):
            CaptionIndex.create(tmp_path / "index", other, exist_ok=True)
    assert len(CaptionIndex.create(tmp_path / "index", MODEL, exist_ok=True)) == 4
    with pytest.raises(CaptionIndexError, match="already holds a caption index"):
        CaptionIndex.create(tmp_path / "index", MODEL)


def test_missing_and_damaged_indexes_give_one_line_errors(index, tmp_path):
    with pytest.raises(CaptionIndexError, match=r"no caption index at .*build one"):
        CaptionIndex.open(tmp_path / "missing", MODEL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptionIndexError, match="not an empty folder"):
        CaptionIndex.create(tmp_path / "file", MODEL)

    meta = tmp_path / "index" / "index.json"
    original = meta.read_bytes()
    for damage in (
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps({"format": "other", "model": {}}).encode(),
    ):
        meta.write_bytes(damage)
        with pytest.raises(CaptionIndexError) as error:
            CaptionIndex.open(tmp_path / "index", MODEL)
        assert "\n" not in str(error.value)
    meta.write_bytes(original)

    engine_meta = tmp_path / "index" / "tantivy" / "meta.json"
    engine_meta.write_text("garbage")
    with pytest.raises(CaptionIndexError, match="is damaged"):
        CaptionIndex.open(tmp_path / "index", MODEL)
    engine_meta.unlink()
    with pytest.raises(CaptionIndexError, match="is damaged"):
        CaptionIndex.open(tmp_path / "index", MODEL)


RED = {"red-circle.png", "red-star.png"}
RED_OR_CIRCLE = RED | {"blue-circle.png"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", set()),
        ("   \t\n", set()),
        ("?!.,;", set()),
        ("a the of is there", set()),  # stop words only
        ("zebra giraffe", set()),  # words no caption has
        ("((((", set()),
        ("\\", set()),
        ('"red circle', RED_OR_CIRCLE),
        ("red*", RED),
        ("-red", RED),
        ("red-circle", RED_OR_CIRCLE),
        ("terms:red", RED),  # not a field filter
        ("image_id:red-circle.png", RED_OR_CIRCLE),
        ("NEAR(red circle)", RED_OR_CIRCLE),
        ("red AND NOT circle OR (star)", RED_OR_CIRCLE),  # words, not operators
        ("red_circle", RED_OR_CIRCLE),
        ("🔴 circle", {"red-circle.png", "blue-circle.png"}),
    ],
)
def test_query_syntax_is_plain_text(index, query, expected):
    assert set(ids(index.search(query, limit=10))) == expected


def test_very_long_queries_are_cut_and_answered(index):
    long_query = "small red circle " + "zebra " * 10_000
    assert ids(index.search(long_query))[0] == "red-circle.png"
    assert sum(len(terms) for terms in query_terms("word " * 5000).values()) <= 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300), limit=st.integers(min_value=-2, max_value=50))
def test_any_text_gives_a_list_of_known_pictures(index, text, limit):
    hits = index.search(text, limit=limit)
    assert len(hits) <= max(0, limit)
    assert set(ids(hits)) <= {picture.image_id for picture in PICTURES}
    assert len(set(ids(hits))) == len(hits)


def test_a_writer_lock_held_elsewhere_is_a_clear_error(index):
    with index._writer(), pytest.raises(CaptionIndexError, match="being written by another process"):
        index.add([IndexedPicture("x.png", ("a star",), None)])
    assert index.add([IndexedPicture("x.png", ("a star",), None)]) == 1  # released afterwards


KILLED_WRITER = textwrap.dedent(
    """
    import importlib.util
    import os
    import sys
    import types

    # The module and what it imports (atomic_files) by their path, under a bare package: importing the real
    # package would run its __init__ and load torch, seconds before the first add.
    package = types.ModuleType("show_attend_tell")
    package.__path__ = [os.path.dirname(sys.argv[2])]
    sys.modules["show_attend_tell"] = package
    spec = importlib.util.spec_from_file_location("show_attend_tell.caption_index", sys.argv[2])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    CaptionIndex, IndexedPicture = module.CaptionIndex, module.IndexedPicture

    index = CaptionIndex.open(sys.argv[1])

    def pictures():
        for number in range(10**7):
            if number % 50 == 0:
                print(number, flush=True)  # the parent kills us once a few batches are committed
            yield IndexedPicture(f"new-{number:07d}.png", (f"a purple hexagon number {number}",), None)

    index.add(pictures(), batch_size=50)
    """
)


def test_a_killed_add_leaves_the_index_usable(index, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "index"), caption_index.__file__],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        for line in process.stdout:
            if int(line) >= 400 or time.monotonic() > deadline:
                break
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    again = CaptionIndex.open(tmp_path / "index", MODEL)
    added = len(again) - len(PICTURES)
    # Whole batches only (one commit per 50), at least those committed before the 400th picture was read.
    assert added % 50 == 0 and added >= 300, added
    assert ids(again.search("yellow triangle")) == ["dir/with space:and'quote\".png"]
    assert len(again.search("purple hexagon", limit=1000)) == added
    # The killed writer's lock is gone: the index takes new pictures and removals.
    assert again.add([IndexedPicture("after.png", ("a white cross",), None)]) == 1
    assert again.remove(["new-0000000.png"]) == 1
    assert ids(again.search("white cross")) == ["after.png"]
    assert len(again.search("purple hexagon", limit=1000)) == added - 1


def test_caption_rows_become_pictures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "captions.jsonl"
    rows.write_text(
        json.dumps(
            {"path": "photos/a.png", "caption": "a red star", "captions": ["a red star", "a red cross"]}
        )
        + "\n"
        + json.dumps({"path": "https://example.org/b.jpg", "caption": "a blue circle"})
        + "\n"
        + json.dumps({"path": "photos/broken.png", "error": "not an image"})
        + "\n"
        + json.dumps({"image_id": "17", "caption": "a green square"})
        + "\nnot json\n"
        + json.dumps({"path": "photos/cut.png", "caption": "a yellow"}),  # a line cut by a kill: no newline
        encoding="utf-8",
    )
    from show_attend_tell.caption_index import pictures_from_caption_rows

    assert list(pictures_from_caption_rows(rows)) == [
        IndexedPicture("photos/a.png", ("a red star", "a red cross"), str(tmp_path / "photos" / "a.png")),
        IndexedPicture("https://example.org/b.jpg", ("a blue circle",), "https://example.org/b.jpg"),
        IndexedPicture("17", ("a green square",), None),
    ]
