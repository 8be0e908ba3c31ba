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

What this command does is callable from Python: `show_attend_tell.caption_files` (inputs, the resumable JSONL
file, figures) over `show_attend_tell.captioning` (the loop that captions a collection).

A file that is not a usable image (empty, corrupt, truncated, not an image, above Pillow's decompression-bomb
limit) is reported on one line naming the file and the reason; the others are captioned, and the exit status
is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from show_attend_tell.caption_files import (
    CaptionRun,
    Inputs,
    caption_to_jsonl,
    dataset_inputs,
    print_rows,
    start_accelerator,
)
from show_attend_tell.errors import one_line
from show_attend_tell.hub import (
    UnsafeWeightsError,
    add_decoding_option_arguments,
    add_trust_remote_code_argument,
    load_model_and_processor,
    set_decoding_options,
)

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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Caption images with a Show, Attend and Tell model (runs unchanged under `accelerate launch`).",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", help="image files, folders (scanned recursively), globs or URLs")
    parser.add_argument("--model", required=True, help="model folder or Hub repository id")
    add_trust_remote_code_argument(parser)
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
    add_decoding_option_arguments(parser)
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


def collect_inputs(args: argparse.Namespace) -> Inputs:
    """All images the command line names, in order, each once (folders and globs that find none are reported)."""
    if args.dataset:
        return dataset_inputs(args.dataset, args.split, data_dir=args.data_dir, limit=args.limit)
    from show_attend_tell.caption_files import collect_inputs as collect_files

    def warn(message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    return collect_files(args.images, list_file=args.list, limit=args.limit, warn=warn)


def generation_options(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """generate()'s arguments from the command line; a ValueError for more returned captions than beams."""
    options: dict[str, Any] = {}
    if args.num_beams is not None:
        options["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.num_return_sequences is not None:
        beams = args.num_beams or model.generation_config.num_beams or 1
        if args.num_return_sequences > beams:
            raise ValueError(
                f"--num-return-sequences {args.num_return_sequences} is more than the {beams} beams searched"
            )
        options["num_return_sequences"] = args.num_return_sequences
    return options


@contextlib.contextmanager
def output_file(args: argparse.Namespace, accelerator: Any) -> Iterator[Path]:
    """--output, or a scratch file removed at the end: printing in input order never holds the rows in memory."""
    if args.output is not None:
        yield args.output
        return
    from accelerate.utils import broadcast_object_list

    shared = [tempfile.mkdtemp(prefix="sat-caption-") if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared)  # every process writes its part into the main process's folder
    try:
        yield Path(shared[0]) / "captions.jsonl"
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(shared[0], ignore_errors=True)


def report(args: argparse.Namespace, inputs: Inputs, output: Path, run: CaptionRun) -> int:
    """Main process: the rows on stdout (without --output, or with --json), a summary line; the exit status."""
    if args.output is None or args.json:
        try:
            print_rows(output, inputs.keys, args.json, sys.stdout)
        except BrokenPipeError:  # `caption.py ... | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    where = f" -> {output}" if args.output is not None else ""
    processes = f" by {run.processes} processes" if run.processes > 1 else ""
    print(
        f"{PROG}: {run.captioned} of {len(inputs.keys)} images captioned{processes} ({run.skipped} from an earlier "
        f"run), {run.failed + len(run.missing)} failed{where}",
        file=sys.stderr,
    )
    return 1 if run.failed or run.missing else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(AttributeError):  # a stream without reconfigure (a test's capture) keeps its own
        # A character the terminal cannot show (LANG=C, Latin-1) is written as a backslash escape, not a crash.
        sys.stdout.reconfigure(errors="backslashreplace")
    from transformers.utils import logging as transformers_logging

    # Loading messages (weight-loading bars, deprecation notes) would bury the captions and the errors.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    accelerator = start_accelerator()
    is_main = accelerator.is_main_process

    def fail(message: str, status: int) -> int:
        if is_main:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return status

    try:
        model, processor = load_model_and_processor(
            args.model,
            device=accelerator.device,
            dtype=getattr(torch, args.dtype),
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        return fail(f"cannot load the model: {one_line(error)}", 2)
    set_decoding_options(model, fuse_attention_scores=args.fuse_attention, capture_steps=args.capture_steps)
    try:
        inputs = collect_inputs(args)
    except (OSError, ValueError, ImportError) as error:  # ImportError: --dataset without `datasets`
        return fail(one_line(error), 2)
    if not inputs.keys:
        return fail("no images to caption", 1)
    try:
        options = generation_options(args, model)
    except ValueError as error:
        return fail(one_line(error), 2)

    status = 0
    with output_file(args, accelerator) as output:
        run = caption_to_jsonl(
            model,
            processor,
            inputs,
            output,
            state=accelerator,
            figures=args.visualize,
            progress=not args.no_progress,
            label=f"{PROG}: ",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            autocast=accelerator.autocast,
            **options,
        )
        if is_main:
            status = report(args, inputs, output, run)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
