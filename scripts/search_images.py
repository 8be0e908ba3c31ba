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
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "search_images.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Rank images by how well a text query captions them."
    )
    parser.add_argument("queries", nargs="*", help="one or more text queries")
    parser.add_argument("--model", required=True, help="model folder or Hub repository id")
    source = parser.add_mutually_exclusive_group(required=True)
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
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    args = parser.parse_args(argv)
    if args.recall and args.dataset is None:
        parser.error("--recall needs --dataset (the captions are the queries)")
    if not args.recall and not args.queries:
        parser.error("give at least one query (or --recall with --dataset)")
    if args.images is not None and not args.images.is_dir():
        # Checked before torch is even imported: a typo should not cost seconds of loading.
        parser.error(f"--images {args.images}: not a folder")
    for name in ("top_k", "batch_size", "encode_batch_size", "max_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def figure_path(base: Path, position: int) -> Path:
    """FILE.png for the first query, FILE-2.png, FILE-3.png ... for the next ones."""
    return base if position == 0 else base.with_name(f"{base.stem}-{position + 1}{base.suffix or '.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as transformers_logging

    from show_attend_tell.hub import UnsafeWeightsError, load_model_and_processor
    from show_attend_tell.retrieval import (
        CaptionRetriever,
        ImageGallery,
        retrieval_recall,
        save_search_figure,
    )

    # Loading messages would bury the results; our own warnings (skipped images) stay visible.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.basicConfig(format=f"{PROG}: warning: %(message)s", level=logging.WARNING)

    def fail(message: str) -> int:
        print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, processor = load_model_and_processor(args.model, device=device)
    except (OSError, UnsafeWeightsError, ValueError) as error:
        return fail(f"cannot load the model: {error}")

    cache = {"cache_dir": args.cache_dir, "use_cache": not args.no_cache}
    try:
        if args.images is not None:
            gallery = ImageGallery.from_folder(args.images)
            split = None
        else:
            from show_attend_tell.data import load_caption_dataset

            dataset = load_caption_dataset(
                args.dataset,
                data_dir=args.data_dir,
                splits=[args.split],
                max_samples_per_split=args.max_images,
            )
            split = next(iter(dataset.values()))
            gallery = ImageGallery.from_dataset(split)
    except (OSError, ValueError) as error:
        return fail(error)

    if args.recall:
        metrics = retrieval_recall(
            model,
            processor,
            split,
            batch_size=args.batch_size,
            encode_batch_size=args.encode_batch_size,
            progress=not args.json,
            **cache,
        )
        if args.json:
            print(json.dumps(metrics, indent=2))
        else:
            for name, value in metrics.items():
                print(f"{name}\t{value:.4f}" if isinstance(value, float) else f"{name}\t{value}")
        return 0

    try:
        retriever = CaptionRetriever(
            model,
            processor,
            gallery,
            batch_size=args.batch_size,
            encode_batch_size=args.encode_batch_size,
            **cache,
        )
    except ValueError as error:  # no readable image at all
        return fail(error)

    results = []
    for position, query in enumerate(args.queries):
        try:
            result = retriever.search(query, top_k=args.top_k, return_attention=args.figure is not None)
        except ValueError as error:
            return fail(error)
        if result.unknown_words:
            print(
                f"{PROG}: warning: {query!r}: words the model does not know: {', '.join(result.unknown_words)}",
                file=sys.stderr,
            )
        figure = None
        if args.figure is not None:
            figure = save_search_figure(figure_path(args.figure, position), result, gallery)
        results.append(
            {
                "query": query,
                "unknown_words": result.unknown_words,
                "figure": str(figure) if figure else None,
                "hits": [
                    {"rank": hit.rank, "score": hit.score, "image": hit.image_id} for hit in result.hits
                ],
            }
        )
        if not args.json:
            print(f"# {query}" + (f"  (figure: {figure})" if figure else ""))
            for hit in result.hits:
                print(f"{hit.rank}\t{hit.score:.4f}\t{hit.image_id}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
