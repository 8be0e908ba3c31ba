#!/usr/bin/env python
"""Text to images: find the pictures that a captioning model thinks a sentence describes.

    python scripts/search_images.py --model MODEL --images photos/ "a dog running on the beach"
    python scripts/search_images.py --model MODEL --images photos/ --top-k 3 --figure hits.png "two people"
    python scripts/search_images.py --model MODEL --dataset synthetic --split test "a small red circle"
    python scripts/search_images.py --model MODEL --dataset synthetic --split test --recall

Each image is scored by the length-normalised log-likelihood of the query as its caption (see
`show_attend_tell.retrieval`). The images are encoded once and their features cached on disk
(`--cache-dir`, default `~/.cache/show_attend_tell/retrieval`), so the next search over the same
pictures with the same model only runs the decoder.

Output: per query, one line per hit (`rank<TAB>score<TAB>image`), or a JSON array with `--json`.
`--figure FILE.png` draws the hits with the attention of each query word over them (one file per
query: FILE.png for the first, FILE-2.png for the second, ...). `--recall` prints Recall@1/5/10 of
text-to-image retrieval over the dataset split instead (each caption queries the split's images).
Unreadable images are skipped with a one-line warning; errors in the arguments exit with status 2.

At scale, a caption index (see `show_attend_tell.caption_index`): every picture is captioned once with its
n-best captions, the captions go into an embedded BM25 full-text index (a folder, nothing to start), and a
query re-ranks only the index's best candidates with the model:

    python scripts/search_images.py build --model MODEL --index photos.index photos/   # resumable
    accelerate launch scripts/search_images.py build --model MODEL --index photos.index photos/
    python scripts/search_images.py add --model MODEL --index photos.index new-photos/
    python scripts/search_images.py remove --index photos.index photos/old.jpg
    python scripts/search_images.py --model MODEL --index photos.index "a dog on the beach"
    python scripts/search_images.py --model MODEL --index photos.index --images photos/ "a dog"  # cached features

`build` and `add` take the inputs of scripts/caption.py (files, folders, globs, URLs, `--list`, `--dataset`)
and run its captioning (split between processes under `accelerate launch`; a killed run continues where it
stopped when the same command is run again); pictures already indexed are not captioned again. The index
records the model and generation settings and refuses another model. A query that cannot match (no words,
only unknown or common words) prints its reason. From Python: `show_attend_tell.image_search` (`build_index`,
`open_retriever`, `search_rows`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "search_images.py"
INDEX_COMMANDS = ("build", "add", "remove")


def add_trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    # hub.add_trust_remote_code_argument's text, written out: answering --help must not import torch
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own code files (*_show_attend_tell.py) instead of this package's classes: "
        "only for folders you trust (default: never)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Rank images by how well a text query captions them."
    )
    parser.add_argument("queries", nargs="*", help="one or more text queries")
    parser.add_argument("--model", required=True, help="model folder or Hub repository id")
    add_trust_remote_code_argument(parser)
    parser.add_argument(
        "--index",
        type=Path,
        help="a caption index (made by `build`): search its best candidates instead of every image",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=100,
        help="with --index: pictures proposed by the index and re-ranked by the model (default: 100)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    source.add_argument("--dataset", help="a load_caption_dataset source (synthetic, flickr30k, a path, ...)")
    parser.add_argument("--split", default="test", help="the dataset split (default: test)")
    parser.add_argument("--data-dir", help="data_dir for the dataset source")
    parser.add_argument("--max-images", type=int, help="use only the first N images of the dataset split")
    parser.add_argument("--top-k", type=int, default=5, help="images to show per query (default: 5)")
    parser.add_argument("--figure", type=Path, help="write the hits with their attention to this PNG")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    parser.add_argument("--recall", action="store_true", help="print Recall@1/5/10 over the dataset split")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="decoder rows (images x queries) per forward"
    )
    parser.add_argument("--encode-batch-size", type=int, default=32, help="images per encoder forward")
    parser.add_argument("--cache-dir", type=Path, help="where the image features are cached")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )
    args = parser.parse_args(argv)
    if args.index is None and args.images is None and args.dataset is None:
        parser.error("give --images FOLDER, --dataset SOURCE or --index PATH")
    if args.index is not None and args.recall:
        parser.error("--recall ranks every image; benchmarks/bench_search.py compares it with --index")
    if args.recall and args.dataset is None:
        parser.error("--recall needs --dataset (the captions are the queries)")
    if not args.recall and not args.queries:
        parser.error("give at least one query (or --recall with --dataset)")
    if args.images is not None and not args.images.is_dir():
        # Checked before torch is even imported: a typo should not cost seconds of loading.
        parser.error(f"--images {args.images}: not a folder")
    for name in ("top_k", "batch_size", "encode_batch_size", "max_images", "candidates"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def fail(message: str | BaseException, command: str = "") -> int:
    """The one-line error of a user's mistake (status 2): `message`, or an exception's in one line."""
    from show_attend_tell.errors import one_line  # the package (torch) is loaded by then: no parse-time cost

    text = one_line(message) if isinstance(message, BaseException) else message
    print(f"{PROG}{' ' + command if command else ''}: error: {text}", file=sys.stderr)
    return 2


def open_gallery(args: argparse.Namespace) -> tuple[Any, Any]:
    """The gallery of --images or --dataset (None without them), and the dataset split for --recall."""
    from show_attend_tell.retrieval import ImageGallery

    if args.images is not None:
        return ImageGallery.from_folder(args.images), None
    if args.dataset is None:
        return None, None
    from show_attend_tell.data import load_caption_dataset

    dataset = load_caption_dataset(
        args.dataset, data_dir=args.data_dir, splits=[args.split], max_samples_per_split=args.max_images
    )
    split = next(iter(dataset.values()))
    return ImageGallery.from_dataset(split), split


def print_recall(args: argparse.Namespace, model: Any, processor: Any, split: Any) -> int:
    from show_attend_tell.retrieval import retrieval_recall

    metrics = retrieval_recall(
        model,
        processor,
        split,
        batch_size=args.batch_size,
        encode_batch_size=args.encode_batch_size,
        progress=not args.json,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for name, value in metrics.items():
            print(f"{name}\t{value:.4f}" if isinstance(value, float) else f"{name}\t{value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in INDEX_COMMANDS:
        return index_main(argv[0], argv[1:])
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    from show_attend_tell.device import pick_device
    from show_attend_tell.errors import one_line
    from show_attend_tell.hub import UnsafeWeightsError, load_model_and_processor
    from show_attend_tell.image_search import open_retriever, search_rows

    # Loading messages would bury the results; our own warnings (skipped images) stay visible.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.basicConfig(format=f"{PROG}: warning: %(message)s", level=logging.WARNING)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        return fail(f"--device {error}")
    try:
        model, processor = load_model_and_processor(
            args.model, device=device, trust_remote_code=args.trust_remote_code
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        return fail(f"cannot load the model: {one_line(error)}")
    try:
        gallery, split = open_gallery(args)
        if args.recall:
            return print_recall(args, model, processor, split)
        retriever = open_retriever(
            model,
            processor,
            gallery=gallery,
            index=args.index,
            candidates=args.candidates,
            batch_size=args.batch_size,
            encode_batch_size=args.encode_batch_size,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
        )
    except (OSError, ValueError) as error:  # no readable image at all; a missing, damaged or foreign index
        return fail(error)

    results = []
    try:
        for result, row in search_rows(retriever, args.queries, top_k=args.top_k, figure=args.figure):
            query = row["query"]
            if result.reason:
                print(f"{PROG}: {query!r}: no results: {result.reason}", file=sys.stderr)
            if result.unknown_words:
                print(
                    f"{PROG}: warning: {query!r}: words the model does not know: {', '.join(result.unknown_words)}",
                    file=sys.stderr,
                )
            if not args.json:
                print(f"# {query}" + (f"  (figure: {row['figure']})" if row["figure"] else ""))
                for hit in result.hits:
                    print(f"{hit.rank}\t{hit.score:.4f}\t{hit.image_id}")
            results.append(row)
    except ValueError as error:  # CaptionIndexError too
        return fail(error)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------
# The caption index: build, add, remove
# --------------------------------------------------------------------------------------------------


def parse_index_args(command: str, argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {command}",
        description={
            "build": "Caption every picture (n-best beam search) and index the captions; run again to resume.",
            "add": "Caption new pictures and add them to an existing caption index.",
            "remove": "Remove pictures from a caption index by id (as search prints them).",
        }[command],
    )
    parser.add_argument("--index", type=Path, required=True, help="the index folder")
    if command == "remove":
        parser.add_argument(
            "ids", nargs="*", help="picture ids (the paths as given to build, or dataset ids)"
        )
        parser.add_argument("--list", help="a text file with one id per line")
        args = parser.parse_args(argv)
        if not args.ids and not args.list:
            parser.error("give picture ids or --list FILE")
        return args
    parser.add_argument("images", nargs="*", help="image files, folders (scanned recursively), globs or URLs")
    parser.add_argument("--model", required=True, help="model folder or Hub repository id")
    add_trust_remote_code_argument(parser)
    parser.add_argument("--list", help="a text file with one image path or URL per line")
    parser.add_argument("--dataset", help="index a dataset split instead: a load_caption_dataset source")
    parser.add_argument("--split", default="test", help="the dataset split (default: test)")
    parser.add_argument("--data-dir", help="data_dir for the dataset source")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--num-beams", type=int, default=5, help="beam size (default: 5)")
    parser.add_argument(
        "--num-return-sequences", type=int, default=5, help="captions indexed per picture (default: 5)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate() call, per process")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes that decode images")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    if not args.images and not args.list and not args.dataset:
        parser.error("give images, folders or globs, --list FILE, or --dataset SOURCE")
    if args.dataset and (args.images or args.list):
        parser.error("--dataset cannot be combined with image paths or --list")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    for name in ("num_beams", "num_return_sequences", "max_new_tokens", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_return_sequences > args.num_beams:
        parser.error("--num-return-sequences cannot exceed --num-beams")
    return args


def remove_main(args: argparse.Namespace) -> int:
    from show_attend_tell.caption_index import CaptionIndex, CaptionIndexError

    ids = list(args.ids)
    try:
        if args.list:
            with open(args.list, encoding="utf-8") as file:
                ids.extend(line.strip() for line in file if line.strip())
        index = CaptionIndex.open(args.index)
        removed = index.remove(ids)
        left = len(index)
    except (OSError, CaptionIndexError) as error:
        return fail(error, "remove")
    print(f"{PROG} remove: {removed} of {len(set(ids))} pictures removed, {left} left", file=sys.stderr)
    return 0 if removed == len(set(ids)) else 1


def index_inputs(args: argparse.Namespace, is_main: bool) -> Any:
    """The pictures that `build`/`add` name: a dataset split, or files, folders, globs, URLs and --list."""
    from show_attend_tell.caption_files import collect_inputs, dataset_inputs

    if args.dataset:
        return dataset_inputs(args.dataset, args.split, data_dir=args.data_dir, limit=args.limit)

    def warn(message: str) -> None:
        if is_main:  # every process collects the same inputs: one warning is enough
            print(f"{PROG}: warning: {message}", file=sys.stderr)

    return collect_inputs(args.images, list_file=args.list, limit=args.limit, warn=warn)


def build_main(command: str, args: argparse.Namespace) -> int:
    """`build` and `add`: show_attend_tell.image_search.build_index on the processes `accelerate launch` started."""
    import torch
    from transformers.utils import logging as transformers_logging

    from show_attend_tell.caption_files import start_accelerator
    from show_attend_tell.errors import one_line
    from show_attend_tell.hub import UnsafeWeightsError, load_model_and_processor
    from show_attend_tell.image_search import build_index

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    accelerator = start_accelerator()
    is_main = accelerator.is_main_process
    try:
        model, processor = load_model_and_processor(
            args.model,
            device=accelerator.device,
            dtype=getattr(torch, args.dtype),
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        return fail(f"cannot load the model: {one_line(error)}", command) if is_main else 2
    try:
        inputs = index_inputs(args, is_main)
        built = build_index(
            model,
            processor,
            args.index,
            inputs,
            create=command == "build",
            state=accelerator,
            num_beams=args.num_beams,
            num_return_sequences=args.num_return_sequences,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            autocast=accelerator.autocast,
            progress=not args.no_progress,
            label=f"{PROG} {command}: ",
        )
    except (OSError, ValueError, ImportError) as error:
        # A refused, damaged or missing index, an unreadable --list, a dataset that cannot be loaded (or no
        # `datasets` installed): one line, status 2.
        return fail(error, command) if is_main else 2
    accelerator.end_training()
    if not is_main:
        return 0
    failed = f", {built.failed} could not be read" if built.failed else ""
    print(
        f"{PROG} {command}: {built.added} pictures indexed, {built.total} in {args.index}{failed}",
        file=sys.stderr,
    )
    return 1 if built.failed else 0


def index_main(command: str, argv: Sequence[str]) -> int:
    args = parse_index_args(command, argv)
    return remove_main(args) if command == "remove" else build_main(command, args)


if __name__ == "__main__":
    sys.exit(main())
