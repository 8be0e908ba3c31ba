"""
What `ShowAttendTellForConditionalGeneration.save_pretrained` writes into a model folder besides the weights,
so that the folder loads with the image-to-text auto class and serves `pipeline("image-to-text", ...)`.

Saved with the model's code (the model file imports it), so a model loaded from a folder with
`trust_remote_code=True`, where this package is not installed, saves complete folders too. `saving.py`
(package only) writes a whole folder, model and processor, atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import transformers

from .configuration_show_attend_tell import PIPELINE_DECLARATION

# The image-to-text auto class is AutoModelForVision2Seq in transformers 4.x and
# AutoModelForImageTextToText in 5.x (late 4.x has both).
IMAGE_TO_TEXT_AUTO_CLASSES = [
    name for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq") if hasattr(transformers, name)
]

# The pipeline's code files. Not imported by the model file: transformers 4.x copies only a module's direct
# relative imports into its cache, and the pipeline's own import of the image processing file would be missing.
PIPELINE_CODE_FILES = ("pipeline_show_attend_tell.py", "image_processing_show_attend_tell.py")


def files_beside_weights(config: transformers.PretrainedConfig, names: tuple[str, ...]) -> list[Path] | None:
    """
    `names` in the folder or Hub repository (at the loaded revision, from the local cache when offline) that
    the model was loaded from; None when any is missing there.
    """
    source = getattr(config, "_name_or_path", "") or ""
    if not source:
        return None
    from transformers.utils import cached_file

    paths = []
    for name in names:
        try:
            path = cached_file(
                source,
                name,
                revision=getattr(config, "_commit_hash", None),
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:  # not a folder nor a repository id any more
            return None
        if path is None:
            return None
        paths.append(Path(path))
    return paths


def declare_folder_pipeline(model: transformers.PreTrainedModel) -> list[Path]:
    """
    Before a model with its code files is saved: adds the image-to-text auto class to `config.auto_map` and
    declares the folder's own image-to-text pipeline in `config.custom_pipelines` (transformers 5.x would
    otherwise serve `pipeline("image-to-text", model=folder, trust_remote_code=True)` with a pipeline that
    asks for a text prompt). Returns the pipeline's code files to copy next to the weights; when they cannot
    be found (code loaded from a folder without them), none, and the declaration is dropped: a declaration
    without its code would break the folder's pipeline.
    """
    config = model.config
    reference = f"{type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"
    auto_map = dict(getattr(config, "auto_map", None) or {})
    for name in IMAGE_TO_TEXT_AUTO_CLASSES:
        auto_map.setdefault(name, reference)
    config.auto_map = auto_map
    code_dir = Path(__file__).resolve().parent
    pipeline_files = [code_dir / name for name in PIPELINE_CODE_FILES]
    if not all(path.is_file() for path in pipeline_files):
        # Code loaded from a folder or repository (trust_remote_code) holds only the files that loading the
        # model needed; the pipeline's are where the model came from.
        pipeline_files = files_beside_weights(config, PIPELINE_CODE_FILES) or pipeline_files
    custom_pipelines = dict(getattr(config, "custom_pipelines", None) or {})
    if all(path.is_file() for path in pipeline_files):
        custom_pipelines.update(PIPELINE_DECLARATION)
    else:
        pipeline_files = []
        for task in PIPELINE_DECLARATION:
            custom_pipelines.pop(task, None)
    if custom_pipelines or hasattr(config, "custom_pipelines"):
        config.custom_pipelines = custom_pipelines
    return pipeline_files


def copy_files(paths: list[Path], directory: str | os.PathLike) -> None:
    """Copies `paths` into `directory` under their own names."""
    for path in paths:
        shutil.copyfile(path, Path(directory) / path.name)
