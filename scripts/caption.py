#!/usr/bin/env python
"""Caption images with a trained Show, Attend and Tell model, from one picture to millions.

    python scripts/caption.py --model MODEL photo.jpg                 # prints the caption
    python scripts/caption.py --model MODEL photos/ "more/**/*.png"  # folders (recursive) and globs
    python scripts/caption.py --model MODEL --list files.txt --json  # one path or URL per line
    python scripts/caption.py --model MODEL --dataset flickr30k --split test --output test.jsonl
    python scripts/caption.py --model MODEL photos/ --visualize figures/   # attention figure per image

    # the same command on every GPU (or N CPU processes) of the machine, resumable:
    accelerate launch scripts/caption.py --model MODEL photos/ --output captions.jsonl

Output: without `--output`, one line per image (`path<TAB>caption`), or a JSON array with `--json`. With
`--output FILE.jsonl`, one JSON row per image (`{"path": ..., "caption": ...}`, `image_id` for datasets,
`error` instead of `caption` for a file that could not be read), in input order.

File names are written so that every line stays one line and every name can be reused (see ESCAPING below).
`--num-return-sequences N` adds `captions`, the N best captions of the beam search, best first (what
`scripts/search_images.py build` indexes).

At scale: the images are split between the processes by Accelerate and decoded by DataLoader workers
(`--num-workers`); each process streams its rows to its own file in `FILE.jsonl.parts/` as it goes, and the
main process merges them in input order at the end. Running the same command again skips the images that
already have a caption (in FILE.jsonl or in the parts of a killed run) and retries those that failed.
Memory holds two batches of images (the next one is encoded while this one is decoded: on a GPU the
two overlap, see `show_attend_tell.overlapped_generation`), plus the list of file names.

A file that is not a usable image (empty, corrupt, truncated, not an image, above Pillow's decompression-bomb
limit) is reported on one line naming the file and the reason; the others are captioned, and the exit status
is 1 if any failed.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from show_attend_tell.atomic_files import open_atomically
from show_attend_tell.hub import UnsafeWeightsError, load_model_and_processor, set_decoding_options
from show_attend_tell.image_processing_show_attend_tell import ImageLoadError, image_files, load_image
from show_attend_tell.overlapped_generation import generate_overlapped
from show_attend_tell.pipeline_show_attend_tell import words_and_attention

PROG = "caption.py"
HELP_EPILOG = r"""
escaping:
  In `path<TAB>caption` lines and in messages, a backslash is written \\, a tab \t, a newline \n, a carriage
  return \r, other control and line-separator characters \xNN or \uNNNN, and each byte of a file name that
  is not valid UTF-8 (legal on Linux) \xNN: `caf\xe9.png`. In bash, $'...' gives the name back:
  ls $'caf\xe9.png'. JSON output (--json, --output) holds the name itself: JSON escapes tabs and newlines, and
  a byte that is not UTF-8 appears as \udcNN (Python's json.loads and os.fsencode give the bytes back).

exit status:
  0  every image was captioned (or already was, in --output)
  1  an image could not be read or captioned, or the inputs hold no image at all (a folder named on the
     command line that holds no picture is reported: `DIR: no images found`)
  2  a usage error, or the model could not be loaded
"""
#: Extensions picked up when a folder is scanned (a file named explicitly is always tried).
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
    What to caption, in order: `keys[i]` names image `i` in the output (a path or URL as given, or a
    dataset's image_id) and `sources[i]` says where to read it (the same path, or the dataset row index).
    """

    keys: list[str]
    sources: list[str | int]
    key_field: str  # "path" or "image_id": the name of the key in the JSONL rows
    dataset: Any = None  # a datasets.Dataset whose `image` column is not decoded, for dataset inputs


def _scan_folder(folder: Path) -> list[str]:
    # Sorted as strings, not as paths: the order caption.py has always written rows in.
    return sorted(str(path) for path in image_files(folder))


def _expand(argument: str) -> list[str]:
    """One command-line or list-file entry -> file paths or URLs (folders scanned, globs expanded)."""
    if argument.startswith(("http://", "https://")):
        return [argument]
    path = Path(argument).expanduser()
    if path.is_dir():
        found = _scan_folder(path)
        if not found:
            print(f"{PROG}: warning: {display_name(argument)}: no images found", file=sys.stderr)
        return found
    if path.exists() or not _GLOB_CHARS.search(argument):
        return [os.path.normpath(str(path))]  # a missing file is reported as a failed image, not skipped
    matches = []
    for match in sorted(glob.glob(str(path), recursive=True)):
        matches.extend(_scan_folder(Path(match)) if Path(match).is_dir() else [os.path.normpath(match)])
    if not matches:
        print(f"{PROG}: warning: {display_name(argument)} matches no file", file=sys.stderr)
    return matches


def collect_inputs(args: argparse.Namespace) -> Inputs:
    """All images to caption, in order, each once."""
    if args.dataset:
        from show_attend_tell.data import load_caption_dataset  # needs `datasets`: only for dataset inputs

        split = args.split
        data = load_caption_dataset(
            args.dataset, data_dir=args.data_dir, splits=[split], max_samples_per_split=args.limit
        )
        dataset = data[next(iter(data))] if split not in data else data[split]
        from datasets import Image as ImageFeature

        # Undecoded: the workers read the bytes with the same checks as files, and a bad row fails alone.
        dataset = dataset.select_columns(["image", "image_id"]).cast_column(
            "image", ImageFeature(decode=False)
        )
        keys = [str(key) for key in dataset["image_id"]]
        if len(set(keys)) != len(keys):
            keys = [f"{key}#{index}" for index, key in enumerate(keys)]  # ids must tell rows apart
        return Inputs(keys, list(range(len(keys))), "image_id", dataset)

    entries: list[str] = list(args.images)
    if args.list:
        # surrogateescape: a listed file name that is not UTF-8 is kept, byte for byte, like one on the command line
        with open(args.list, encoding="utf-8", errors="surrogateescape") as file:
            entries.extend(
                line.strip() for line in file if line.strip() and not line.lstrip().startswith("#")
            )
    keys: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        for key in _expand(entry):
            if key not in seen:
                seen.add(key)
                keys.append(key)
    if args.limit is not None:
        keys = keys[: args.limit]
    return Inputs(keys, list(keys), "path")


class ImageSource(Dataset):
    """Reads and preprocesses the images at `positions` (indexes into `inputs`), in DataLoader workers."""

    def __init__(self, inputs: Inputs, positions: Sequence[int], image_processor: Any) -> None:
        self.inputs = inputs
        self.positions = list(positions)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.positions[index]
        key = self.inputs.keys[position]
        source = self.inputs.sources[position]
        try:
            if self.inputs.dataset is not None:
                image = load_image(self.inputs.dataset[int(source)]["image"], name=key)  # a datasets cell
            else:
                image = load_image(source)
            pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        except ImageLoadError as error:
            return {"position": position, "key": key, "error": str(error)}
        except Exception as error:  # anything else a strange file triggers: report it, keep going
            reason = " ".join(str(error).split()) or type(error).__name__
            return {"position": position, "key": key, "error": f"{key}: {type(error).__name__}: {reason}"}
        return {"position": position, "key": key, "pixel_values": pixel_values}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the images that loaded; the failed ones travel as (position, key, message)."""
    good = [s for s in samples if "pixel_values" in s]
    return {
        "positions": [s["position"] for s in good],
        "keys": [s["key"] for s in good],
        "pixel_values": torch.stack([s["pixel_values"] for s in good]) if good else None,
        "errors": [(s["position"], s["key"], s["error"]) for s in samples if "error" in s],
    }


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
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Caption images with a Show, Attend and Tell model (runs unchanged under `accelerate launch`).",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", help="image files, folders (scanned recursively), globs or URLs")
    parser.add_argument("--model", required=True, help="model folder or Hub repository id")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own code files (*_show_attend_tell.py) instead of this package's classes: "
        "only for folders you trust (default: never)",
    )
    parser.add_argument("--list", help="a text file with one image path or URL per line (# starts a comment)")
    parser.add_argument("--dataset", help="caption a dataset instead: a load_caption_dataset source")
    parser.add_argument("--split", default="test", help="the dataset split (default: test)")
    parser.add_argument("--data-dir", help="data_dir for the dataset source")
    parser.add_argument(
        "--limit", type=int, help="caption only the first N images (a quick look at a big set)"
    )
    parser.add_argument("--output", type=Path, help="write JSONL rows here (resumable) instead of printing")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of lines")
    parser.add_argument("--num-beams", type=int, default=None, help="beam size (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest caption in tokens")
    parser.add_argument(
        "--num-return-sequences",
        type=int,
        default=None,
        help="the N best captions of each image (beam search, N <= beams), listed best first in a `captions` field",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate() call, per process")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes that decode images")
    parser.add_argument(
        "--visualize", type=Path, help="write the attention figure of each image to this folder"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model weights' dtype"
    )
    parser.add_argument(
        "--fuse-attention",
        action="store_true",
        help="compile the attention scores into one kernel (torch.compile: about 10 s once, then faster)",
    )
    parser.add_argument(
        "--capture-steps",
        action="store_true",
        help="on a GPU, record each decoding step once as a CUDA graph and replay it (same captions; every row "
        "is decoded to the end)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)  # images may come before and after the options
    if not args.images and not args.list and not args.dataset:
        parser.error("give images, folders or globs, --list FILE, or --dataset SOURCE")
    if args.dataset and (args.images or args.list):
        parser.error("--dataset cannot be combined with image paths or --list")
    for name in ("batch_size", "num_beams", "max_new_tokens", "limit", "num_return_sequences"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    if args.num_return_sequences is not None and args.visualize is not None:
        parser.error("--num-return-sequences cannot be combined with --visualize (one figure per caption)")
    if args.output is not None and args.output.is_dir():
        parser.error(f"--output {args.output} is a folder; give a file name such as captions.jsonl")
    return args


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(AttributeError):  # a stream without reconfigure (a test's capture) keeps its own
        # A character the terminal cannot show (LANG=C, Latin-1) is written as a backslash escape, not a crash.
        sys.stdout.reconfigure(errors="backslashreplace")
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    # Loading messages (weight-loading bars, deprecation notes) would bury the captions and the errors.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    accelerator = Accelerator(cpu=_cpu_only_multiprocess())
    if (
        accelerator.device.type == "cpu"
        and accelerator.num_processes > 1
        and "OMP_NUM_THREADS" not in os.environ
    ):
        # Several processes each using every core slow one another down many times over.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    is_main = accelerator.is_main_process

    try:
        model, processor = load_model_and_processor(
            args.model,
            device=accelerator.device,
            dtype=getattr(torch, args.dtype),
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        if is_main:
            print(f"{PROG}: error: cannot load the model: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    set_decoding_options(model, fuse_attention_scores=args.fuse_attention, capture_steps=args.capture_steps)
    try:
        inputs = collect_inputs(args)
    except (OSError, ValueError, ImportError) as error:  # ImportError: --dataset without `datasets`
        if is_main:
            print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if not inputs.keys:
        if is_main:
            print(f"{PROG}: error: no images to caption", file=sys.stderr)
        return 1

    scratch = None
    if args.output is not None:
        output = args.output
        output.parent.mkdir(parents=True, exist_ok=True)
    else:
        # Rows still go through files, so that printing in input order never holds them all in memory.
        from accelerate.utils import broadcast_object_list

        shared = [tempfile.mkdtemp(prefix="sat-caption-") if is_main else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(shared)  # every process writes its part into the main process's folder
        scratch = Path(shared[0])
        output = scratch / "captions.jsonl"

    done = captioned_keys(output) if args.output is not None else set()
    # Every process must see the same finished set before any writes, or they would split different lists.
    accelerator.wait_for_everyone()
    pending = [position for position, key in enumerate(inputs.keys) if key not in done]
    if is_main and done:
        print(
            f"{PROG}: {len(inputs.keys) - len(pending)} images already captioned in {output}", file=sys.stderr
        )

    generate_kwargs: dict[str, Any] = {}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    per_image = args.num_return_sequences or 1
    if args.num_return_sequences is not None:
        beams = args.num_beams or model.generation_config.num_beams or 1
        if per_image > beams:
            if is_main:
                print(
                    f"{PROG}: error: --num-return-sequences {per_image} is more than the {beams} beams searched",
                    file=sys.stderr,
                )
            return 2
        generate_kwargs["num_return_sequences"] = per_image
    if args.visualize is not None:
        generate_kwargs.update(output_attentions=True, return_dict_in_generate=True)
        names = figure_names(inputs.keys)
        args.visualize.mkdir(parents=True, exist_ok=True)
        from show_attend_tell.visualization import save_attention_figure

    part_path = parts_dir(output) / f"process-{accelerator.process_index:03d}-{os.getpid()}.jsonl"
    part_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    with accelerator.split_between_processes(pending) as mine:
        loader = DataLoader(
            ImageSource(inputs, mine, processor.image_processor),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            pin_memory=accelerator.device.type == "cuda",  # so that the copy to the GPU runs asynchronously
        )
        progress = tqdm(
            total=len(pending),
            disable=args.no_progress or not is_main,
            unit="img",
            desc="captioning",
            file=sys.stderr,
        )
        # The next batch is encoded while this one is decoded (on a GPU the two overlap).
        batches = ((batch["pixel_values"], batch) for batch in loader)
        with open(part_path, "a", encoding="utf-8") as part, torch.inference_mode(), accelerator.autocast():
            for batch, generated in generate_overlapped(model, batches, **generate_kwargs):
                lines = []
                for _, key, message in batch["errors"]:
                    reason = message[len(key) + 2 :] if message.startswith(f"{key}: ") else message
                    # Through tqdm, so the message gets a line of its own instead of joining the bar's.
                    progress.write(f"{PROG}: error: {display_name(key)}: {reason}", file=sys.stderr)
                    lines.append({inputs.key_field: key, "error": reason})
                if generated is not None:
                    sequences = generated.sequences if args.visualize is not None else generated
                    captions = processor.batch_decode(sequences, skip_special_tokens=True)
                    for row, key in enumerate(batch["keys"]):
                        # generate() returns each image's N best sequences one after the other, best first.
                        best = captions[row * per_image : (row + 1) * per_image]
                        record = {inputs.key_field: key, "caption": best[0]}
                        if args.num_return_sequences is not None:
                            record["captions"] = best
                        if args.visualize is not None:
                            words, maps = words_and_attention(
                                sequences[row], generated.attention_maps[row], tokenizer
                            )
                            figure = args.visualize / names[key]
                            save_attention_figure(
                                figure,
                                to_display_image(batch["pixel_values"][row], processor.image_processor),
                                words,
                                maps,
                            )
                            record["figure"] = str(figure)
                        lines.append(record)
                # One write and flush per batch: a kill loses at most the batch being written, whose
                # cut-off last line the next run ignores.
                part.write("".join(json_line(line) + "\n" for line in lines))
                part.flush()
                progress.update(min(len(lines) * accelerator.num_processes, progress.total - progress.n))
        progress.close()

    accelerator.wait_for_everyone()
    status = 0
    if is_main:
        captioned, failed, missing = merge_rows(output, inputs.keys)
        for key in missing:
            print(
                f"{PROG}: error: {display_name(key)}: no caption was written (a process stopped?)",
                file=sys.stderr,
            )
        if args.output is None or args.json:
            try:
                print_rows(output, inputs.keys, args.json, sys.stdout)
            except BrokenPipeError:  # `caption.py ... | head`: the reader has all it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        skipped = len(inputs.keys) - len(pending)
        where = f" -> {output}" if args.output is not None else ""
        processes = f" by {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
        print(
            f"{PROG}: {captioned} of {len(inputs.keys)} images captioned{processes} ({skipped} from an earlier "
            f"run), {failed + len(missing)} failed{where}",
            file=sys.stderr,
        )
        status = 1 if failed or missing else 0
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
