#!/usr/bin/env python
"""Text-to-image search at scale: the caption index's quality against exhaustive ranking, and its speed.

    python benchmarks/bench_search.py                      # both parts, results JSON in benchmarks/results/
    python benchmarks/bench_search.py --quality-only --model outputs/demo/run/model
    python benchmarks/bench_search.py --speed-only         # 10k, 100k and 1M rows: a few minutes on 2 cores
    python benchmarks/bench_search.py --quick --model M    # every part on tiny sizes: checks the benchmark

Each part's figures are stored with the command, the time and the load average it ran under; rerunning one
part keeps the other part's latest figures in the results file.

Quality. For the synthetic test split and for a generated gallery of --gallery-size pictures, each picture is
written to a folder and indexed with `scripts/search_images.py build` (the real captioning path: beam search,
n-best captions); each query is one of a picture's reference captions, its own picture the only positive.
Recall@1/5/10 of the two-stage search (the index's --candidates best, re-ranked by the caption likelihood)
is printed next to the exhaustive ranking's (every picture scored by the same likelihood), and their ratio.
The model: --model, else outputs/demo/run/model when `make demo` made it, else a tiny one trained here with
scripts/train.py for a couple of minutes (cached under $SHOW_ATTEND_TELL_CACHE or ~/.cache/show_attend_tell).

Speed. Indexes of --sizes caption rows composed from the synthetic dataset's vocabulary and grammar (one
caption per picture: one row = one picture), then for natural multi-word queries (the same grammar): the
first-stage latency (top 100), the two-stage latency with re-ranking of the top 20 from cached features and
with the encoder run on them (the paper-size model, random weights: the cost is what matters), the build
rate and the size on disk. SQLite FTS5 (the engine compiled into Python) is measured on the same rows with
the plain OR of the query's words, the engine comparison that chose tantivy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cpu_bench_search.json"
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def bench_model(args: argparse.Namespace) -> Path:
    """--model, the demo's model, or a tiny model trained here once with scripts/train.py."""
    if args.model:
        return Path(args.model)
    demo = REPO / "outputs" / "demo" / "run" / "model"
    if demo.is_dir():
        return demo
    root = Path(os.environ.get("SHOW_ATTEND_TELL_CACHE", Path.home() / ".cache" / "show_attend_tell"))
    run = root / "bench_search_model"
    if not (run / "model" / "config.json").is_file():
        options = (
            "--dataset synthetic --dataset-option image_size=32 --dataset-option num_train=2000 "
            "--dataset-option num_validation=50 --dataset-option num_test=250 --model-size tiny "
            "--fine-tune-encoder --fine-tune-stages all --decoder-lr 4e-3 --encoder-lr 4e-3 --alpha-c 0 "
            "--batch-size 60 --captions-per-image 5 --epochs 1000 --max-train-images 20000 --max-minutes 3 "
            f"--max-val-samples 50 --num-workers 0 --checkpoint-steps 0 --output-dir {run} --overwrite-output-dir"
        )
        print(f"training a tiny model: python scripts/train.py {options}", flush=True)
        from show_attend_tell.training import build_parser, check_args, train

        training_args = build_parser().parse_args(options.split())
        check_args(training_args)
        train(training_args)
    return run / "model"


# --------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------


def quality(args: argparse.Namespace, work: Path) -> dict:
    from show_attend_tell.data import make_synthetic_dataset
    from show_attend_tell.hub import load_model_and_processor
    from show_attend_tell.image_search import build_index
    from show_attend_tell.retrieval import (
        ImageGallery,
        IndexedRetriever,
        encode_gallery,
        score_captions,
        tokenize_queries,
    )

    model_dir = bench_model(args)
    model, processor = load_model_and_processor(model_dir, device="cpu")
    size = processor.image_processor.size
    image_size = int(size["height"] if isinstance(size, dict) else size)
    image_size = 32 if image_size <= 32 else 64
    galleries = {
        "synthetic test split": make_synthetic_dataset(
            num_train=0, num_validation=0, num_test=args.test_size, image_size=image_size
        )["test"],
        f"generated gallery of {args.gallery_size}": make_synthetic_dataset(
            num_train=0, num_validation=0, num_test=args.gallery_size, image_size=image_size, seed=2026
        )["test"],
    }
    report = {
        "model": str(model_dir),
        "candidates": args.candidates,
        "test_size": args.test_size,
        "num_beams": args.num_beams,
        "galleries": {},
    }
    for name, split in galleries.items():
        folder = work / name.replace(" ", "_") / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(split):
            row["image"].save(folder / f"{i:05d}.png")
        index = folder.parent / "index"
        started = time.perf_counter()
        build_index(  # what scripts/search_images.py build does
            model,
            processor,
            index,
            [folder],
            num_beams=args.num_beams,
            num_return_sequences=args.num_beams,
            batch_size=64,
            progress=False,
        )
        build_seconds = time.perf_counter() - started

        gallery = ImageGallery.from_folder(folder)
        features = encode_gallery(model, processor, gallery, use_cache=False)
        rng = random.Random(0)
        picked = rng.sample(range(len(split)), min(args.queries, len(split)))
        queries = [split[i]["captions"][rng.randrange(len(split[i]["captions"]))] for i in picked]
        positions = {image_id: p for p, image_id in enumerate(gallery.ids)}
        positives = [positions[f"{i:05d}.png"] for i in picked]

        started = time.perf_counter()
        # (images, queries); many rows per forward: the tiny model's cost is the per-step overhead, not the rows
        scores = score_captions(model, features, tokenize_queries(processor, queries), batch_size=8192)
        exhaustive_seconds = time.perf_counter() - started
        own = scores[torch.tensor(positives), torch.arange(len(queries))]
        exhaustive_ranks = (1 + (scores > own.unsqueeze(0)).sum(dim=0)).tolist()

        def recall(ranks: list[int]) -> dict[str, float]:
            return {f"recall@{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}

        entry = {
            "pictures": len(split),
            "queries": len(queries),
            "exhaustive": recall(exhaustive_ranks),
            "build_seconds": round(build_seconds, 1),
            "exhaustive_seconds_per_query": round(exhaustive_seconds / len(queries), 4),
            "two_stage": {},
        }
        for candidates in args.candidates:
            retriever = IndexedRetriever(
                model, processor, index, gallery=gallery, features=features, candidates=candidates
            )
            two_stage_ranks = []
            started = time.perf_counter()
            for query, positive in zip(queries, positives, strict=True):
                result = retriever.search(query, top_k=10, return_attention=False)
                hit_positions = [positions[Path(hit.image_id).name] for hit in result.hits]
                two_stage_ranks.append(
                    hit_positions.index(positive) + 1 if positive in hit_positions else 10**9
                )
            seconds = time.perf_counter() - started
            values = recall(two_stage_ranks)
            values["seconds_per_query"] = round(seconds / len(queries), 4)
            values["r5_ratio"] = round(values["recall@5"] / max(entry["exhaustive"]["recall@5"], 1e-9), 3)
            entry["two_stage"][str(candidates)] = values
        report["galleries"][name] = entry
        print(
            f"\n{name}: {len(split)} pictures, {len(queries)} queries, index built in {build_seconds:.0f} s"
        )
        print(f"  {'':22} {'R@1':>6} {'R@5':>6} {'R@10':>6}  R@5 / exhaustive R@5 (target >= 0.95)")
        rows = [("exhaustive", entry["exhaustive"])]
        rows += [(f"two stage, {c} candidates", v) for c, v in entry["two_stage"].items()]
        for label, values in rows:
            ratio = f"  {values['r5_ratio']:.3f}" if "r5_ratio" in values else ""
            print(f"  {label:22} " + " ".join(f"{values[f'recall@{k}']:6.3f}" for k in (1, 5, 10)) + ratio)
        sys.stdout.flush()
    return report


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------


def compose(rng: random.Random) -> str:
    """A caption in the synthetic dataset's grammar and vocabulary."""
    from show_attend_tell.data.synthetic import COLORS, SHAPES, SIZES

    def thing() -> str:
        return f"{rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)}"

    form = rng.randrange(4)
    if form == 0:
        return f"a {thing()}"
    if form == 1:
        return f"a {thing()} {RELATIONS[rng.choice(list(RELATIONS))]} a {thing()}"
    if form == 2:
        return f"there is a {thing()} and a {thing()}"
    return f"a {thing()}, a {thing()} and a {thing()}"


def natural_query(rng: random.Random) -> str:
    """What a person would type: a phrase or two of the same vocabulary, with or without articles."""
    from show_attend_tell.data.synthetic import COLORS, SHAPES, SIZES

    form = rng.randrange(4)
    if form == 0:
        return f"{rng.choice(COLORS)} {rng.choice(SHAPES)}"
    if form == 1:
        return f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)}"
    if form == 2:
        return compose(rng)
    return f"{rng.choice(COLORS)} {rng.choice(SHAPES)} next to a {rng.choice(SHAPES)}"


def sqlite_fts5(rows: list[str], queries: list[str], path: Path) -> dict:
    """The same rows in SQLite FTS5, queried with the OR of each query's words (top 100 by bm25)."""
    from show_attend_tell.caption_index import query_terms

    started = time.perf_counter()
    connection = sqlite3.connect(path)
    connection.execute("CREATE VIRTUAL TABLE captions USING fts5(caption)")
    with connection:
        connection.executemany("INSERT INTO captions(caption) VALUES (?)", ((row,) for row in rows))
    build = time.perf_counter() - started
    latencies = []
    for query in queries:
        words = query_terms(query).get(1, [])
        if not words:
            continue
        match = " OR ".join(f'"{word}"' for word in words)
        started = time.perf_counter()
        connection.execute(
            "SELECT rowid FROM captions WHERE captions MATCH ? ORDER BY bm25(captions) LIMIT 100", (match,)
        ).fetchall()
        latencies.append(time.perf_counter() - started)
    connection.close()
    return {
        "build_seconds": round(build, 2),
        "or_query_ms_p50": round(1000 * statistics.median(latencies), 2),
        "or_query_ms_p95": round(1000 * percentile(latencies, 0.95), 2),
        "size_mib": round(path.stat().st_size / 2**20, 1),
    }


def rerank_model(vocab_size: int, tiny: bool = False):
    """
    The specification's model (ResNet-101, 512-wide decoder) with random weights: what the latency costs. With
    `tiny` (--quick), the tiny configuration, for a check of the benchmark itself rather than a measurement.
    """
    from show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration

    config = (
        ShowAttendTellConfig.tiny(vocab_size=vocab_size)
        if tiny
        else ShowAttendTellConfig(vocab_size=vocab_size)
    )
    return ShowAttendTellForConditionalGeneration(config).eval()


def speed(args: argparse.Namespace, work: Path) -> dict:
    from show_attend_tell import (
        ShowAttendTellImageProcessor,
        ShowAttendTellProcessor,
        ShowAttendTellTokenizer,
    )
    from show_attend_tell.caption_index import CaptionIndex, IndexedPicture
    from show_attend_tell.data import make_synthetic_dataset
    from show_attend_tell.retrieval import GalleryFeatures, ImageGallery, encode_gallery, rank_by_likelihood

    rng = random.Random(0)
    queries = [natural_query(rng) for _ in range(args.speed_queries)]
    pictures = make_synthetic_dataset(
        num_train=0, num_validation=0, num_test=args.real_pictures, image_size=64
    )["test"]
    tokenizer = ShowAttendTellTokenizer.train_from_captions(
        [c for row in pictures for c in row["captions"]], min_freq=1
    )
    processor = ShowAttendTellProcessor(ShowAttendTellImageProcessor(), tokenizer)
    model = rerank_model(len(tokenizer), tiny=args.quick)
    images = [row["image"] for row in pictures]
    started = time.perf_counter()
    # On disk, as a gallery's features are: a re-ranking reads its candidates' rows from the cache's files.
    real = encode_gallery(
        model, processor, ImageGallery.from_images(images), cache_dir=work / "features", batch_size=8
    )
    encode_seconds = time.perf_counter() - started
    record = {"fingerprint": "bench", "generation": {"composed": True}}
    report = {
        "queries": len(queries),
        "example_queries": queries[:6],
        "rerank_model": "tiny configuration, random weights (--quick)"
        if args.quick
        else "paper size (ResNet-101 at 256 px, 512-wide LSTM), random weights",
        "encoder_seconds_per_picture": round(encode_seconds / len(images), 3),
        "sizes": {},
    }
    for rows_wanted in args.sizes:
        folder = work / f"speed-{rows_wanted}"
        compose_rng = random.Random(rows_wanted)
        rows = [compose(compose_rng) for _ in range(rows_wanted)]
        index = CaptionIndex.create(folder / "index", record)
        started = time.perf_counter()
        # Ids say which real picture stands in for the row when re-ranking (row i -> picture i mod N).
        index.add(IndexedPicture(f"{i}", (row,), None) for i, row in enumerate(rows))
        build = time.perf_counter() - started
        for query in queries[:10]:  # warm the page cache and the engine's readers
            index.search(query, 100)
        first = []
        for query in queries:
            started = time.perf_counter()
            index.search(query, 100)
            first.append(time.perf_counter() - started)

        def two_stage(query: str, cached: bool, index: CaptionIndex = index) -> float:
            started = time.perf_counter()
            found = index.search(query, 20)
            if not found:
                return time.perf_counter() - started
            picks = [int(hit.image_id) % len(images) for hit in found]
            if cached:
                grid = real.select(picks).grid
            else:
                gallery = ImageGallery.from_images([images[p] for p in picks])
                grid = encode_gallery(model, processor, gallery, use_cache=False, batch_size=20).grid
            features = GalleryFeatures([hit.image_id for hit in found], list(range(len(found))), grid)
            rank_by_likelihood(model, processor, features, query, top_k=5, return_attention=True)
            return time.perf_counter() - started

        with torch.inference_mode():
            cached = [two_stage(query, True) for query in queries[: args.rerank_queries]]
            uncached = [two_stage(query, False) for query in queries[: args.encoder_queries]]
        entry = {
            "rows": rows_wanted,
            "build_seconds": round(build, 2),
            "build_rows_per_second": round(rows_wanted / build),
            "size_mib": round(index.size_on_disk() / 2**20, 3),
            "first_stage_ms_p50": round(1000 * statistics.median(first), 2),
            "first_stage_ms_p95": round(1000 * percentile(first, 0.95), 2),
            "two_stage_cached_ms_p50": round(1000 * statistics.median(cached), 1),
            "two_stage_cached_ms_p95": round(1000 * percentile(cached, 0.95), 1),
            "two_stage_encoder_ms_p50": round(1000 * statistics.median(uncached), 1),
            "two_stage_encoder_ms_p95": round(1000 * percentile(uncached, 0.95), 1),
        }
        if not args.no_sqlite:
            entry["sqlite_fts5"] = sqlite_fts5(rows, queries[:40], folder / "fts5.sqlite")
        report["sizes"][str(rows_wanted)] = entry
        print(
            f"\n{rows_wanted:>9,} rows: build {entry['build_seconds']} s ({entry['build_rows_per_second']:,} rows/s), "
            f"{entry['size_mib']} MiB\n"
            f"  first stage (top 100):        p50 {entry['first_stage_ms_p50']:7.2f} ms  p95 "
            f"{entry['first_stage_ms_p95']:7.2f} ms (target p95 <= 20)\n"
            f"  two stage, top 20, cached:    p50 {entry['two_stage_cached_ms_p50']:7.1f} ms  p95 "
            f"{entry['two_stage_cached_ms_p95']:7.1f} ms (target p95 <= 300)\n"
            f"  two stage, top 20, encoder:   p50 {entry['two_stage_encoder_ms_p50']:7.1f} ms  p95 "
            f"{entry['two_stage_encoder_ms_p95']:7.1f} ms"
            + (
                f"\n  SQLite FTS5, OR of the words: p50 {entry['sqlite_fts5']['or_query_ms_p50']:7.2f} ms  p95 "
                f"{entry['sqlite_fts5']['or_query_ms_p95']:7.2f} ms, build {entry['sqlite_fts5']['build_seconds']} s, "
                f"{entry['sqlite_fts5']['size_mib']} MiB"
                if "sqlite_fts5" in entry
                else ""
            ),
            flush=True,
        )
        del rows
    return report


QUICK = {  # --quick: every part on tiny sizes, to check the benchmark itself (tests/test_bench_search.py)
    "test_size": 30,
    "gallery_size": 60,
    "queries": 20,
    "candidates": [10, 30],
    "num_beams": 2,
    "sizes": [300, 1000],
    "speed_queries": 20,
    "rerank_queries": 3,
    "encoder_queries": 1,
    "real_pictures": 4,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="the model whose search quality is measured (see above for the default)"
    )
    parser.add_argument("--quality-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and a tiny re-ranking model: checks, not figures"
    )
    parser.add_argument("--test-size", type=int, default=250, help="pictures of the synthetic test split")
    parser.add_argument("--gallery-size", type=int, default=2000, help="pictures of the generated gallery")
    parser.add_argument("--queries", type=int, default=250, help="quality queries per gallery")
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=[50, 100, 200],
        help="index candidates re-ranked (quality; one measurement per value)",
    )
    parser.add_argument(
        "--num-beams", type=int, default=5, help="beams and captions per picture of the index"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--speed-queries", type=int, default=200, help="first-stage queries per size")
    parser.add_argument(
        "--rerank-queries", type=int, default=30, help="two-stage queries from cached features"
    )
    parser.add_argument(
        "--encoder-queries", type=int, default=5, help="two-stage queries running the encoder"
    )
    parser.add_argument("--real-pictures", type=int, default=100, help="pictures standing in for the rows")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite FTS5 comparison")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        given = {
            a.split("=")[0].lstrip("-").replace("-", "_")
            for a in (argv or sys.argv[1:])
            if a.startswith("--")
        }
        for name, value in QUICK.items():
            if name not in given:  # what the command line says wins
                setattr(args, name, value)
    return args


def machine(threads: int) -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # fixed: a guess oversubscribes a shared 2-core machine
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    command = "python benchmarks/bench_search.py " + " ".join(sys.argv[1:] if argv is None else argv)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    # Each part keeps its own command and machine conditions: rerunning one leaves the other's latest figures.
    report = {part: previous[part] for part in ("quality", "speed") if part in previous}
    parts = {"quality": quality, "speed": speed}
    if args.speed_only:
        parts.pop("quality")
    if args.quality_only:
        parts.pop("speed")
    with tempfile.TemporaryDirectory(prefix="bench-search-") as work:
        for part, measure in parts.items():
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            conditions = {"command": command, "started": started, "machine_at_start": machine(args.threads)}
            results = measure(args, Path(work))
            report[part] = {**conditions, "machine_at_end": machine(args.threads), **results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
