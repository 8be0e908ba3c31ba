"""The one way an exception becomes the line a user reads (show_attend_tell.errors.one_line)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from show_attend_tell.errors import one_line

ERRORS = st.sampled_from([ValueError, OSError, RuntimeError, KeyError, TypeError, IndexError, AttributeError])


@given(kind=ERRORS, message=st.text(max_size=80))
def test_any_message_is_one_non_empty_line(kind: type[BaseException], message: str) -> None:
    error = kind(message)
    line = one_line(error)
    assert line and line == line.strip() and len(line.splitlines()) == 1 and "  " not in line
    assert line.endswith(
        " ".join(str(error).split())
    )  # the message's words, in order, nothing lost but spacing


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("bad\n  value\r\nhere"), "bad value here"),
        (OSError(2, "No such file or directory"), "[Errno 2] No such file or directory"),
        (KeyError("vocab_size"), "KeyError: 'vocab_size'"),  # the key alone would not say what is wrong
        (TypeError("unsupported operand"), "TypeError: unsupported operand"),
        (RuntimeError(), "RuntimeError"),
        (json.JSONDecodeError("Expecting value", "{", 1), "Expecting value: line 1 column 2 (char 1)"),
    ],
)
def test_terse_and_empty_messages_get_their_type(error: BaseException, expected: str) -> None:
    assert one_line(error) == expected
