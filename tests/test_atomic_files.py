"""The one atomic file writer (show_attend_tell.atomic_files): a target holds the old content or the new one."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from show_attend_tell import atomic_files
from show_attend_tell.atomic_files import open_atomically, replaced_atomically, write_text_atomic


class Interrupted(BaseException):
    """Stands for what stops a writer halfway: a full disk, Ctrl-C, a bug in the caller's block."""


@settings(max_examples=60, deadline=None)
@given(
    old=st.one_of(st.none(), st.text(max_size=200)),
    new=st.text(max_size=2000),
    cut=st.integers(min_value=0, max_value=2000),
    fail=st.booleans(),
)
def test_the_target_holds_the_old_or_the_new_content_and_no_temporary_is_left(
    old: str | None, new: str, cut: int, fail: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "results.json"
        if old is not None:
            target.write_text(old, encoding="utf-8")
        try:
            with open_atomically(target) as handle:
                handle.write(new[:cut])
                if fail:
                    raise Interrupted
                handle.write(new[cut:])
        except Interrupted:
            pass
        expected = old if fail else new
        if expected is None:
            assert not target.exists()
        else:
            # bytes, not read_text: reading in text mode would turn a written "\r" into "\n"
            assert target.read_bytes() == expected.encode("utf-8")
        assert os.listdir(folder) == ([] if expected is None else ["results.json"])


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path: Path) -> None:
    # SIGKILL runs no clean-up at all: the rename is what keeps the target whole.
    target = tmp_path / "card.md"
    target.write_text("old card\n", encoding="utf-8")
    code = (
        "import importlib.util, os, signal, sys\n"
        # The module alone, by its file: importing the package would load torch first (seconds).
        "spec = importlib.util.spec_from_file_location('atomic_files', sys.argv[2])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "with module.open_atomically(sys.argv[1]) as handle:\n"
        "    handle.write('new card, half written')\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    module_file = Path(atomic_files.__file__)
    result = subprocess.run([sys.executable, "-c", code, str(target), str(module_file)], check=False)
    assert result.returncode == -9
    assert target.read_text(encoding="utf-8") == "old card\n"
    # The stray temporary file is hidden (a dot name), so folder scans and globs pass it over.
    assert [p.name.startswith(".card.md.") for p in tmp_path.iterdir() if p != target] == [True]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_permissions_follow_the_umask_like_any_file_the_user_writes(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "metrics.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == stat.S_IMODE(
        (tmp_path / "plain.json").stat().st_mode
    )


def test_writers_that_take_a_file_name_and_binary_handles(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "grid.bin"  # missing folders are created
    with replaced_atomically(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(".") and not target.exists()
        temporary.write_bytes(b"\x00\xff" * 3)
    assert target.read_bytes() == b"\x00\xff" * 3
    with open_atomically(target, "wb") as handle:
        handle.write(b"\x01")
    assert target.read_bytes() == b"\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["grid.bin"]


def test_text_is_utf8_and_appending_is_refused(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.txt", "ein Bär, 猫\n")
    assert (tmp_path / "a.txt").read_bytes() == "ein Bär, 猫\n".encode()
    with pytest.raises(ValueError, match="writes a whole file"), open_atomically(tmp_path / "a.txt", "a"):
        pass
