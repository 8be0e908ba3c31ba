"""
Files replaced whole: a reader (or a run killed halfway) sees the old content or the new, never half a file.

The one way the package and its scripts write a result file that something else reads: metrics, reports,
model cards, caption files, caches. The new content goes to a temporary file beside the target (same folder,
so the same file system), is flushed to disk, then renamed over the target in one step (`os.replace`, atomic on
POSIX and Windows). On any error, a kill signal's KeyboardInterrupt included, the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """
    A new, empty temporary file beside `path` for a writer that takes a file name (safetensors, torch.save):
    when the block ends without an error it is flushed to disk and renamed over `path`; otherwise removed.
    The folder is created when missing. The temporary name starts with a dot, so folder scans skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Created with open() rather than tempfile.mkstemp: mkstemp's files are private (0600), and a results
    # file must get the same permissions as any other file the user writes (the umask decides).
    with open(temporary, "xb"):
        pass
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_atomically(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """
    `open(path, mode)` for writing a whole file ("w" or "wb"), which replaces `path` only when the block ends
    without an error (see `replaced_atomically`).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomically writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with (
        replaced_atomically(path) as temporary,
        open(temporary, mode, encoding=None if "b" in mode else encoding) as handle,
    ):
        yield handle


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` in one step: readers see the old content or the new."""
    with open_atomically(path) as handle:
        handle.write(text)


__all__ = ["open_atomically", "replaced_atomically", "write_text_atomic"]
