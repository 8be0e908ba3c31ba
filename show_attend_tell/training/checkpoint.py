"""Crash-safe checkpoint folders: written under a temporary name, then renamed into place.

A checkpoint is `<output>/checkpoints/checkpoint-<8-digit step>/` holding what `Accelerator.save_state`
writes (model weights as safetensors, optimizer state, random states) plus `training_state.json` (where
training stands: epoch, batch within the epoch, best score...) and `processor/` (the word map, so a
resumed run uses exactly the same vocabulary). It is written completely under
`.tmp-checkpoint-<step>-<random>/`, flushed to disk, and renamed: a process killed while saving leaves a
stray temporary folder (ignored, and removed by the next run) next to intact earlier checkpoints. A folder
that `list_checkpoints` returns is therefore always complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import one_line
from ..saving import recover_directory, replace_directory

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
WEIGHTS_FILE = "model.safetensors"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete checkpoint folder."""
    path = Path(path)
    return path.is_dir() and (path / STATE_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `directory`, oldest (lowest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _CHECKPOINT_PATTERN.match(child.name)
        if match and is_checkpoint(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(value: str, checkpoints_dir: str | os.PathLike) -> Path | None:
    """
    The folder `--resume-from-checkpoint value` names: `latest` is the newest complete checkpoint in
    `checkpoints_dir` (None when there is none yet: a fresh start); anything else is a path.

    Raises:
        CheckpointError: the path does not exist or is not a checkpoint folder.
    """
    if value == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(value).expanduser()
    if not path.exists():
        raise CheckpointError(f"--resume-from-checkpoint: {path} does not exist")
    if not is_checkpoint(path):
        inside = list_checkpoints(path)
        hint = (
            f"; it holds checkpoints, the newest is {inside[-1]}"
            if inside
            else f"; a checkpoint folder holds {STATE_FILE} and {WEIGHTS_FILE}"
        )
        raise CheckpointError(f"--resume-from-checkpoint: {path} is not a checkpoint folder{hint}")
    return path


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The `training_state.json` of checkpoint `path`."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {file}: {error}") from error
    if not isinstance(state, dict) or "global_step" not in state.get("state", {}):
        raise CheckpointError(f"{file} is not a training state written by scripts/train.py")
    return state


def _fsync_tree(root: Path) -> None:
    """Flushes every file under `root`, then the folders, so the rename below publishes durable data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(root)


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def describe_os_error(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (or a read-only file system)"
    if error.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return str(error)


# safetensors reports the operating system's error inside its message: "... I/O error: No space left on
# device (os error 28)".
_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer reports a failed write without an errno: "[enforce fail at inline_container.cc:672]
# . unexpected pos 576 vs 534" (measured on a full tmpfs), or "PytorchStreamWriter failed writing file ...".
_TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "file write failed")


def describe_write_error(error: BaseException) -> str | None:
    """
    One line saying why writing files failed, or None when `error` is not a failed write (a bug, to be
    shown with its traceback). A full disk or a missing permission reaches the training loop in three
    forms: OSError from Python's own writes, SafetensorError from safetensors (weights, in `save_pretrained`
    and `accelerator.save_state`), and a RuntimeError from torch.save (the optimizer state).
    """
    if isinstance(error, OSError):
        return f"{describe_os_error(error)} ({error})"
    text = one_line(error)
    if isinstance(error, SafetensorError):
        match = _SAFETENSORS_OS_ERROR.search(text)
        if match is not None:
            return f"{describe_os_error(OSError(int(match.group(1)), text))} ({text})"
        return text if "I/O error" in text else None
    if isinstance(error, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILURES):
        return f"a file could not be written completely, is the disk full? (torch.save: {text})"
    return None


def write_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    save: Callable[[Path], None],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """
    Writes checkpoint `step` atomically: `save(folder)` fills a temporary folder (with
    `accelerator.save_state` and the processor), `state` goes to `training_state.json`, everything is
    flushed, and the folder is renamed to `checkpoint-<step>`. Then only the newest `keep_last`
    checkpoints are kept.

    Raises:
        CheckpointError: the folder could not be written (disk full, no permission..., in whichever form
            `describe_write_error` recognises); the temporary folder is removed and the earlier checkpoints
            are untouched.
    """
    checkpoints_dir = Path(checkpoints_dir)
    target = checkpoints_dir / checkpoint_name(step)
    staging = checkpoints_dir / f"{_TEMPORARY_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        save(staging)
        # Written last: a folder with training_state.json has everything else (see is_checkpoint).
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_tree(staging)
        replace_directory(staging, target)  # an earlier run's checkpoint of the same step is replaced
        _fsync_directory(checkpoints_dir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = describe_write_error(error)
        if reason is None:
            raise
        earlier = [path for path in list_checkpoints(checkpoints_dir) if path != target]
        kept = (
            f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"could not write checkpoint {target}: {reason}; {kept}. Free space or fix the "
            "permissions, then resume with --resume-from-checkpoint latest"
        ) from error
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def remove_stale_temporaries(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """
    Tidies what a process killed while saving left behind: unfinished `.tmp-*` folders are deleted, and a
    checkpoint that `replace_directory` had set aside (`.checkpoint-N.old-*`) goes back in place when the
    kill left none. Returns what was removed.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    set_aside = {
        child.name[1:].split(".old-")[0] for child in checkpoints_dir.iterdir() if ".old-" in child.name
    }
    for name in set_aside:
        recover_directory(checkpoints_dir / name)
    removed = [child for child in checkpoints_dir.iterdir() if child.name.startswith(_TEMPORARY_PREFIX)]
    for child in removed:
        shutil.rmtree(child, ignore_errors=True)
    return removed


__all__ = [
    "CHECKPOINT_PREFIX",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "checkpoint_name",
    "describe_os_error",
    "describe_write_error",
    "is_checkpoint",
    "list_checkpoints",
    "read_training_state",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "write_checkpoint",
]
