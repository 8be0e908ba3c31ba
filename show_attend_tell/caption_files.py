"""
Captioning files, folders, lists and datasets into a JSON-lines file, resumably, on one or many processes: what
`scripts/caption.py` does, callable from Python.

    from show_attend_tell.caption_files import caption_to_jsonl, collect_inputs

    inputs = collect_inputs(["photos/", "more/**/*.png"])
    run = caption_to_jsonl(model, processor, inputs, Path("captions.jsonl"), num_beams=3)

`collect_inputs` turns folders (scanned recursively), globs, URLs and list files into one ordered list of
pictures, each once; `dataset_inputs` does the same for a split of a `load_caption_dataset` source.
`caption_to_jsonl` captions them with `captioning.caption_batches` and writes one JSON row per picture
(`{"path" or "image_id": ..., "caption": ...}`, `error` instead of `caption` for a picture that could not be read,
`captions` with `num_return_sequences`, `figure` with `figures`). Under Accelerate each process streams its rows
to its own file in `FILE.jsonl.parts/`, and the main process merges them in input order at the end; running
it again skips the pictures that already have a caption (in the file or in the parts of a killed run) and
retries those that failed.

File names are written so that every line stays one line and every name can be reused: see `display_name`
and `json_line`.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .atomic_files import open_atomically
from .captioning import CaptionedImage, caption_batches
from .image_processing_show_attend_tell import image_files

__all__ = [
    "CaptionRun",
    "Inputs",
    "caption_to_jsonl",
    "captioned_keys",
    "collect_inputs",
    "dataset_inputs",
    "display_name",
    "figure_names",
    "json_line",
    "merge_rows",
    "parts_dir",
    "print_rows",
    "start_accelerator",
    "to_display_image",
]

_GLOB_CHARS = re.compile(r"[*?\[]")
_SHORT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def display_name(text: str) -> str:
    """
    `text` (a file name, URL, id or caption) as part of one unambiguous line: a backslash, tab, newline and
    carriage return are backslash-escaped, other control and line-separating characters become \\xNN or
    \\uNNNN, and each byte of a file name that is not UTF-8 (which Python holds as a surrogate escape, U+DC80 to
    U+DCFF) becomes \\xNN. Bash's $'...' turns the result back into the name.
    """
    pieces = []
    for char in text:
        code = ord(char)
        if char in _SHORT_ESCAPES:
            pieces.append(_SHORT_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
            pieces.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            pieces.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}")
        else:
            pieces.append(char)
    return "".join(pieces)


_JSON_LINE_BREAKS = {ord(char): f"\\u{ord(char):04x}" for char in "\x85\u2028\u2029"}


def json_line(row: dict[str, Any], ascii_only: bool = False) -> str:
    """
    One JSON row, valid UTF-8 whatever the file names: a byte of a name that is not UTF-8 (a lone surrogate,
    which no UTF-8 file can hold) is written as the JSON escape \\udcNN, which json.loads reads back as the same
    name; U+0085, U+2028 and U+2029 are escaped too. `ascii_only`: every other non-ASCII character as well.
    """
    if ascii_only:
        return json.dumps(row)
    text = json.dumps(row, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")
    # Unicode line breaks that json.dumps leaves raw: escaped, so a reader splitting lines on them keeps rows whole
    return text.translate(_JSON_LINE_BREAKS)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """
    What to caption, in order: `keys[i]` names picture `i` in the rows (a path or URL as given, or a dataset's
    image_id) and `items` holds the pictures to read (the same paths, or the dataset, its images undecoded).
    """

    keys: list[str]
    items: Any
    key_field: str  # "path" or "image_id": the name of the key in the JSONL rows


def _warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _scan_folder(folder: Path) -> list[str]:
    # Sorted as strings, not as paths: the order caption.py has always written rows in.
    return sorted(str(path) for path in image_files(folder))


def _expand(argument: str, warn: Callable[[str], None]) -> list[str]:
    """One command-line or list-file entry -> file paths or URLs (folders scanned, globs expanded)."""
    if argument.startswith(("http://", "https://")):
        return [argument]
    path = Path(argument).expanduser()
    if path.is_dir():
        found = _scan_folder(path)
        if not found:
            warn(f"{display_name(argument)}: no images found")
        return found
    if path.exists() or not _GLOB_CHARS.search(argument):
        return [os.path.normpath(str(path))]  # a missing file is reported as a failed image, not skipped
    matches = []
    for match in sorted(glob.glob(str(path), recursive=True)):
        matches.extend(_scan_folder(Path(match)) if Path(match).is_dir() else [os.path.normpath(match)])
    if not matches:
        warn(f"{display_name(argument)} matches no file")
    return matches


def collect_inputs(
    entries: Sequence[str],
    *,
    list_file: str | os.PathLike | None = None,
    limit: int | None = None,
    warn: Callable[[str], None] = _warn_on_stderr,
) -> Inputs:
    """
    All pictures to caption, in order, each once: `entries` are files, folders (scanned recursively for image
    files), globs or URLs; `list_file` adds one entry per line (`#` starts a comment). A missing file is kept (it
    is reported as a failed picture, not skipped); a folder without pictures or a glob that matches nothing is
    reported through `warn`. `limit`: only the first N.
    """
    entries = list(entries)
    if list_file:
        # surrogateescape: a listed file name that is not UTF-8 is kept, byte for byte, like one on the command line
        with open(list_file, encoding="utf-8", errors="surrogateescape") as file:
            entries.extend(
                line.strip() for line in file if line.strip() and not line.lstrip().startswith("#")
            )
    keys: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        for key in _expand(entry, warn):
            if key not in seen:
                seen.add(key)
                keys.append(key)
    if limit is not None:
        keys = keys[:limit]
    return Inputs(keys, list(keys), "path")


def dataset_inputs(
    source: str, split: str = "test", *, data_dir: str | None = None, limit: int | None = None
) -> Inputs:
    """The pictures of one split of a `load_caption_dataset` source, keyed by image_id (needs `datasets`)."""
    from .data import load_caption_dataset

    data = load_caption_dataset(source, data_dir=data_dir, splits=[split], max_samples_per_split=limit)
    dataset = data[next(iter(data))] if split not in data else data[split]
    keys = [str(key) for key in dataset["image_id"]]
    if len(set(keys)) != len(keys):
        keys = [f"{key}#{index}" for index, key in enumerate(keys)]  # ids must tell rows apart
    return Inputs(keys, dataset, "image_id")


# --------------------------------------------------------------------------------------------------
# Rows on disk: the output file, the per-process parts, resuming
# --------------------------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, row) for every complete JSON row of a JSONL file; a line cut by a kill is skipped."""
    with open(path, "rb") as file:
        offset = 0
        for line in file:
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                break  # the last line of a process killed while writing
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield start, row


def _row_key(row: dict[str, Any]) -> str | None:
    key = row.get("path", row.get("image_id"))
    return None if key is None else str(key)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def existing_row_files(output: Path) -> list[Path]:
    """The finished output first, then the parts of unfinished runs (later files win ties)."""
    files = [output] if output.is_file() else []
    parts = parts_dir(output)
    if parts.is_dir():
        files.extend(sorted(parts.glob("*.jsonl"), key=lambda p: (p.stat().st_mtime, p.name)))
    return files


def captioned_keys(output: Path) -> set[str]:
    """Keys that already have a caption; failed images are not in it, so they are tried again."""
    done = set()
    for path in existing_row_files(output):
        for _, row in _rows(path):
            key = _row_key(row)
            if key is not None and "caption" in row:
                done.add(key)
    return done


def merge_rows(output: Path, keys: Sequence[str]) -> tuple[int, int, list[str]]:
    """
    Writes `output` from itself and the parts: one row per key, in the order of `keys` (a caption beats an
    error; among equals the newest wins), then rows of earlier runs for images no longer in the input.
    The file is replaced atomically and the parts removed only afterwards, so a kill at any point loses
    nothing. Only offsets are held in memory, not the rows. Returns (captioned, failed, missing keys).
    """
    files = existing_row_files(output)
    best: dict[str, tuple[bool, int, int]] = {}  # key -> (has caption, file index, byte offset)
    for file_index, path in enumerate(files):
        for offset, row in _rows(path):
            key = _row_key(row)
            if key is None:
                continue
            candidate = ("caption" in row, file_index, offset)
            current = best.get(key)
            if current is None or candidate[0] >= current[0]:
                best[key] = candidate
    handles = [open(path, "rb") for path in files]  # noqa: SIM115 - closed below, all together
    captioned = failed = 0
    missing: list[str] = []
    try:
        with open_atomically(output, "wb") as out:

            def copy(entry: tuple[bool, int, int]) -> None:
                handle = handles[entry[1]]
                handle.seek(entry[2])
                out.write(handle.readline())

            for key in keys:
                entry = best.pop(key, None)
                if entry is None:
                    missing.append(key)
                    continue
                copy(entry)
                captioned += entry[0]
                failed += not entry[0]
            for entry in sorted(best.values(), key=lambda e: (e[1], e[2])):
                copy(entry)  # earlier results for images not asked for this time: kept, after the others
    finally:
        for handle in handles:
            handle.close()
    shutil.rmtree(parts_dir(output), ignore_errors=True)
    return captioned, failed, missing


def print_rows(output: Path, keys: Sequence[str], as_json: bool, stream: IO[str]) -> None:
    """Streams the merged rows of this run's inputs to `stream`: `key<TAB>caption` lines, or a JSON array."""
    wanted = set(keys)
    first = True
    # A terminal that is not UTF-8 (LANG=C, Latin-1) gets JSON's own \uNNNN escapes, not Python's \xNN.
    utf8 = codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name == "utf-8"
    if as_json:
        stream.write("[")
    for _, row in _rows(output):
        if _row_key(row) not in wanted:
            continue
        if as_json:
            stream.write(("\n  " if first else ",\n  ") + json_line(row, ascii_only=not utf8))
            first = False
        elif "caption" in row:
            stream.write(f"{display_name(_row_key(row))}\t{display_name(row['caption'])}\n")
    if as_json:
        stream.write("\n]\n" if not first else "]\n")
    stream.flush()


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def figure_names(keys: Sequence[str]) -> dict[str, str]:
    """A file name per key for --visualize: the image's own name, made unique with a hash when it repeats."""
    stems = [re.sub(r"[^\w.\-]+", "_", Path(key.split("?")[0]).stem or "image") for key in keys]
    counts = Counter(stems)
    return {
        key: f"{stem}.png"
        if counts[stem] == 1
        else f"{stem}-{hashlib.sha1(os.fsencode(key)).hexdigest()[:8]}.png"
        for key, stem in zip(keys, stems, strict=True)
    }


def to_display_image(pixel_values: torch.Tensor, image_processor: Any) -> np.ndarray:
    """The processor's output turned back into the (size, size, 3) uint8 picture the model saw."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    pixels = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Captioning into a JSON-lines file
# --------------------------------------------------------------------------------------------------


@dataclass
class CaptionRun:
    """What `caption_to_jsonl` did (the counts are the main process's, after the merge; 0 in the others)."""

    captioned: int  # pictures of the inputs with a caption in the file (this run's and earlier ones)
    failed: int  # pictures that could not be read or captioned
    missing: list[str]  # keys with no row at all (a process stopped before writing them)
    skipped: int  # pictures captioned by an earlier run, not captioned again
    processes: int


def _row(
    result: CaptionedImage,
    key_field: str,
    n_best: bool,
    figures: Path | None,
    figure_name: Callable[[str], str],
    image_processor: Any,
) -> dict[str, Any]:
    if result.error is not None:
        return {key_field: result.key, "error": result.error}
    record: dict[str, Any] = {key_field: result.key, "caption": result.caption}
    if n_best:
        record["captions"] = result.captions
    if figures is not None:
        from . import visualization  # matplotlib: only for figures

        figure = figures / figure_name(result.key)
        picture = to_display_image(result.pixel_values, image_processor)
        visualization.save_attention_figure(figure, picture, result.words, result.attention)
        record["figure"] = str(figure)
    return record


def _caption_part(
    model: Any,
    processor: Any,
    inputs: Inputs,
    positions: Sequence[int],
    part_path: Path,
    bar: Any,
    *,
    processes: int,
    figures: Path | None,
    label: str,
    options: dict[str, Any],
) -> None:
    """Captions `positions` of `inputs` into this process's part file, one write per batch."""
    names = figure_names(inputs.keys) if figures is not None else {}
    n_best = "num_return_sequences" in options
    batches = caption_batches(
        model,
        processor,
        inputs.items,
        keys=inputs.keys,
        positions=positions,
        output_attentions=figures is not None,
        keep_pixel_values=figures is not None,
        progress=False,
        **options,
    )
    with open(part_path, "a", encoding="utf-8") as part:
        for results in batches:
            for result in results:
                if result.error is not None:
                    # Through tqdm, so the message gets a line of its own instead of joining the bar's.
                    bar.write(f"{label}error: {display_name(result.key)}: {result.error}", file=sys.stderr)
            rows = [
                _row(result, inputs.key_field, n_best, figures, names.__getitem__, processor.image_processor)
                for result in results
            ]
            # One write and flush per batch: a kill loses at most the batch being written, whose cut-off last
            # line the next run ignores.
            part.write("".join(json_line(row) + "\n" for row in rows))
            part.flush()
            bar.update(min(len(rows) * processes, bar.total - bar.n))


def _cpu_only_multiprocess() -> bool:
    """
    True when a launcher started several processes (`accelerate launch --multi_gpu`, `torchrun`) on a
    machine without a GPU. Accelerate then needs `cpu=True` to join them (gloo); without it every process
    would think it is alone and caption everything. (`accelerate launch --cpu --num_processes N` without
    an MPI host file starts a single process, so it cannot be used for this.)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    flagged = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flagged or (world_size > 1 and not torch.cuda.is_available())


def start_accelerator() -> Any:
    """
    An Accelerator for however the command was launched (`python` or `accelerate launch`), to give
    `caption_to_jsonl` as its `state`; CPU processes share the cores instead of fighting over them.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=_cpu_only_multiprocess())
    if (
        accelerator.device.type == "cpu"
        and accelerator.num_processes > 1
        and "OMP_NUM_THREADS" not in os.environ
    ):
        # Several processes each using every core slow one another down many times over.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return accelerator


def caption_to_jsonl(
    model: Any,
    processor: Any,
    inputs: Inputs,
    output: Path,
    *,
    state: Any = None,
    figures: Path | None = None,
    progress: bool = True,
    label: str = "",
    **options: Any,
) -> CaptionRun:
    """
    Captions `inputs` into the JSON-lines file `output`, resuming from what it (and the parts of a killed run)
    already holds; every process of `state` captions its share.

    Args:
        model, processor: the captioning model (on the process's device) and its processor.
        inputs: from `collect_inputs` or `dataset_inputs`.
        state: an `accelerate.Accelerator` or `PartialState` whose processes share the work (default: this
            process alone).
        figures: a folder for the attention figure of each picture (`figure_names` names them).
        progress: a progress bar on stderr (main process only).
        label: put before the messages written to stderr (e.g. the command's name and a colon).
        options: `caption_batches`'s (`batch_size`, `num_workers`, `autocast`) and `generate()`'s
            (`num_beams`, `max_new_tokens`, `num_return_sequences`: the rows then list the N best `captions`).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = state if state is not None else PartialState()
    output.parent.mkdir(parents=True, exist_ok=True)
    done = captioned_keys(output)
    # Every process must see the same finished set before any writes, or they would split different lists.
    state.wait_for_everyone()
    pending = [position for position, key in enumerate(inputs.keys) if key not in done]
    skipped = len(inputs.keys) - len(pending)
    if state.is_main_process and skipped:
        print(f"{label}{skipped} images already captioned in {output}", file=sys.stderr)
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
    part_path = parts_dir(output) / f"process-{state.process_index:03d}-{os.getpid()}.jsonl"
    part_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(pending),
        disable=not progress or not state.is_main_process,
        unit="img",
        desc="captioning",
        file=sys.stderr,
    )
    with state.split_between_processes(pending) as mine, bar:
        _caption_part(
            model,
            processor,
            inputs,
            mine,
            part_path,
            bar,
            processes=state.num_processes,
            figures=figures,
            label=label,
            options=options,
        )
    state.wait_for_everyone()
    run = CaptionRun(0, 0, [], skipped, state.num_processes)
    if state.is_main_process:
        run.captioned, run.failed, run.missing = merge_rows(output, inputs.keys)
        for key in run.missing:
            print(
                f"{label}error: {display_name(key)}: no caption was written (a process stopped?)",
                file=sys.stderr,
            )
    return run
