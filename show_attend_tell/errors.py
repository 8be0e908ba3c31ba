"""An exception as the one line a user reads (command lines, logs, HTTP answers): never a traceback."""

from __future__ import annotations

#: Exceptions whose message alone does not say what went wrong (a KeyError's message is just the key): shown
#: with their type's name in front.
_TERSE = (KeyError, TypeError, AttributeError, IndexError)


def one_line(error: BaseException) -> str:
    """
    `error`'s message with its line breaks and runs of white space folded into single spaces; the type's name
    comes first when the message is empty or, for KeyError, TypeError, AttributeError and IndexError, too terse
    to read alone.
    """
    text = " ".join(str(error).split())
    if isinstance(error, _TERSE) or not text:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


__all__ = ["one_line"]
