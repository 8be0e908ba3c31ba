"""Writing a complete, self-contained model folder (what `from_pretrained` and `pipeline` load)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from transformers import PreTrainedModel, ProcessorMixin


def save_model_folder(
    output_dir: str | os.PathLike,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """
    Writes `model` and `processor` to `output_dir` so that the folder loads anywhere with
    `trust_remote_code=True`: safetensors weights, config.json (with `auto_map`), generation_config.json,
    the tokenizer, the image processor, the processor, and the `*_show_attend_tell.py` code files.
    config.json also declares the folder's own image-to-text pipeline (see the model's `save_pretrained`).

    The image processor and tokenizer are also written as their own files (preprocessor_config.json,
    tokenizer_config.json), which transformers 4.x reads; 5.x reads processor_config.json.

    The folder is written under a temporary name next to `output_dir` and put in place by `replace_directory`,
    so a process killed while saving leaves either the previous folder or the new one, never half of one
    (where the system cannot exchange two folders atomically, `recover_directory` finishes the job).
    `extra_files` maps file names to contents (text or bytes) written into the folder as well.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    # mkdtemp makes the folder private (0700); a model folder is for others to read, as mkdir would make it.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        processor.image_processor.save_pretrained(staging)
        processor.tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# renameat2's flag (Linux 3.15+: ext4, xfs, btrfs, tmpfs, overlayfs...) and renamex_np's (macOS), both 2.
_RENAME_EXCHANGE = 2
# What the call or the file system answers when it cannot exchange: fall back to two renames.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def exchange_paths(first: Path, second: Path) -> bool:
    """
    Swaps two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`, macOS
    `renamex_np(RENAME_SWAP)`): a process killed at any moment leaves each name holding one of the two
    folders. Returns False where the system or the file system cannot (Windows, NFS, an old kernel or libc).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "renameat2", None)
        if call is None:  # glibc before 2.28, musl
            return False
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        here = -100  # AT_FDCWD: paths relative to the working directory
        result = call(here, os.fsencode(first), here, os.fsencode(second), _RENAME_EXCHANGE)
    elif sys.platform == "darwin":
        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "renamex_np", None)
        if call is None:
            return False
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        result = call(os.fsencode(first), os.fsencode(second), _RENAME_EXCHANGE)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def _is_leftover_of(child: Path, target: Path) -> bool:
    """A folder a replacement of `target` set aside (`.NAME.old-*`) or was filling (`.NAME.tmp-*`)."""
    return child.name.startswith((f".{target.name}.old-", f".{target.name}.tmp-"))


def replace_directory(new: Path, target: Path) -> None:
    """
    Puts folder `new` in the place of `target` so that `target` always names a complete folder, the old or
    the new one, whenever the process is killed: the two are exchanged atomically where the system can
    (`exchange_paths`), and the old one is deleted afterwards.

    Elsewhere `target` is renamed aside to `.NAME.old-*` first: a kill between that rename and the next
    leaves no `target` until `recover_directory` (run by the next start of the training script) puts the
    old folder back. A failure of the second rename puts it back at once.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if exchange_paths(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, retired)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def recover_directory(target: str | os.PathLike) -> bool:
    """
    Tidies what a replacement of `target` killed half-way left behind: when `target` is missing and an old
    version was set aside (the kill came between `replace_directory`'s two renames), the newest one is put
    back; then the leftover `.NAME.old-*` and `.NAME.tmp-*` folders next to it are deleted. Call it only while
    nothing else is writing `target`. Returns whether `target` was put back.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return False
    leftovers = [child for child in target.parent.iterdir() if _is_leftover_of(child, target)]
    restored = False
    if not target.exists():
        retired = [child for child in leftovers if child.name.startswith(f".{target.name}.old-")]
        if retired:
            newest = max(retired, key=lambda child: child.stat().st_ctime)  # a rename updates ctime
            os.replace(newest, target)
            leftovers.remove(newest)
            restored = True
    for child in leftovers:
        shutil.rmtree(child, ignore_errors=True)
    return restored
