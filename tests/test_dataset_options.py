"""`--dataset-option KEY=VALUE`: one parser, one meaning (JSON, else plain text) in every script that has it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import pytest
from conftest import load_script
from hypothesis import given
from hypothesis import strategies as st

from show_attend_tell.data import DATASET_OPTION_HELP, parse_dataset_options

KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@given(key=KEYS, value=JSON_VALUES)
def test_a_json_value_means_that_value(key, value):
    assert parse_dataset_options([f"{key}={json.dumps(value)}"]) == {key: value}


@given(key=KEYS, text=st.text().filter(lambda t: not is_json(t)))
def test_anything_else_is_plain_text(key, text):
    if text.strip().lower() in ("true", "false", "none", "null"):
        return  # near-JSON spellings are refused (next test)
    assert parse_dataset_options([f"{key}={text}"]) == {key: text}


def test_the_usual_values():
    items = ["num_train=400", "image_size=64", "ratio=0.5", "use_cache=false", "revision=null", "ids=[1, 2]"]
    items += ["revision2=refs/convert/parquet", "name=a=b", 'quoted="64"', "empty="]
    assert parse_dataset_options(items) == {
        "num_train": 400,
        "image_size": 64,
        "ratio": 0.5,
        "use_cache": False,
        "revision": None,
        "ids": [1, 2],
        "revision2": "refs/convert/parquet",
        "name": "a=b",  # the value is everything after the first "="
        "quoted": "64",
        "empty": "",
    }
    assert parse_dataset_options(["num_train=4", " num_train =5"]) == {"num_train": 5}  # the later one


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("use_cache=True", "write use_cache=true"),
        ("use_cache=FALSE", "write use_cache=false"),
        ("revision=None", "write revision=null"),
        ("revision=NULL", "write revision=null"),
        ("num_train", "expects KEY=VALUE"),
        ("=4", "expects KEY=VALUE"),
        ("num train=4", "expects KEY=VALUE"),
        ("1st=4", "expects KEY=VALUE"),
    ],
)
def test_mistakes_are_refused_in_one_line(item, message):
    with pytest.raises(ValueError, match=message) as raised:
        parse_dataset_options([item])
    assert "\n" not in str(raised.value)


ITEMS = ["image_size=32", "use_cache=false", "revision=null", "ids=[1]", "name=main", "flag=True"]


def test_every_script_with_the_flag_reads_it_the_same_and_documents_it(tmp_path, capsys):
    from show_attend_tell.training import UsageError, build_parser, check_args

    evaluate = load_script("evaluate_captions")
    expected = parse_dataset_options(ITEMS[:-1])
    flags = [part for item in ITEMS[:-1] for part in ("--dataset-option", item)]

    args = evaluate.parse_args(["--predictions", "p.jsonl", "--dataset", "synthetic", *flags])
    assert args.dataset_options == expected
    training = build_parser().parse_args(
        ["--dataset", "synthetic", "--output-dir", str(tmp_path / "run"), *flags]
    )
    check_args(training)
    assert training.dataset_options == expected

    # the same mistake, the same one-line message
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--predictions", "p.jsonl", "--dataset-option", ITEMS[-1]])
    assert "write flag=true" in capsys.readouterr().err
    training = build_parser().parse_args(["--dataset", "synthetic", "--dataset-option", ITEMS[-1]])
    with pytest.raises(UsageError, match="write flag=true"):
        check_args(training)

    # --help says what VALUE means
    for parser_help in (help_of(evaluate.parse_args, capsys), build_parser().format_help()):
        assert " ".join(DATASET_OPTION_HELP.split()) in " ".join(parser_help.split())


def help_of(parse_args: Callable[[list[str]], argparse.Namespace], capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out
