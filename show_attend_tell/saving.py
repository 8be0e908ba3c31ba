"""Writing a complete, self-contained model folder (what `from_pretrained` and `pipeline` load)."""

from __future__ import annotations

import os
import shutil
import tempfile
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

    The folder is written under a temporary name next to `output_dir` and renamed into place, so a
    process killed while saving leaves either the previous folder or the new one, never half of one.
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


def replace_directory(new: Path, target: Path, retired: Path | None = None) -> None:
    """
    Moves folder `new` to `target`; an existing `target` is first moved aside (to `retired`, or a hidden
    temporary name next to it) and deleted only once `new` is in place.
    """
    if not target.exists():
        os.replace(new, target)
        return
    if retired is None:
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(retired)
    os.replace(target, retired)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
