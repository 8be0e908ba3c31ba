"""benchmarks/bench_search.py in its quick mode: every part runs on tiny sizes and writes figures that add up."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from serve_tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # captions 90 pictures and builds four small indexes (about a minute)


def bench_search():
    spec = importlib.util.spec_from_file_location(
        "bench_search_under_test", REPO / "benchmarks" / "bench_search.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_recalls(values: dict) -> None:
    recalls = [values[f"recall@{k}"] for k in (1, 5, 10)]
    assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls), values


def test_quick_mode_measures_every_part(tmp_path, capsys):
    pytest.importorskip("tantivy")
    model = save_tiny_model(tmp_path / "model")
    output = tmp_path / "results.json"
    argv = ["--quick", "--model", str(model), "--output", str(output), "--threads", "1"]
    assert bench_search().main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(output.read_text())

    quality = report["quality"]
    assert quality["model"] == str(model) and "--quick" in quality["command"]
    assert quality["machine_at_start"]["torch_threads"] == 1
    galleries = quality["galleries"]
    assert [g["pictures"] for g in galleries.values()] == [30, 60]
    for name, gallery in galleries.items():
        assert gallery["queries"] == 20 and name in printed
        assert_recalls(gallery["exhaustive"])
        assert set(gallery["two_stage"]) == {"10", "30"}
        for candidates, values in gallery["two_stage"].items():
            assert_recalls(values)
            expected = values["recall@5"] / max(gallery["exhaustive"]["recall@5"], 1e-9)
            assert values["r5_ratio"] == pytest.approx(expected, abs=1e-3)
            assert f"two stage, {candidates} candidates" in printed
    # The trained tiny model finds its pictures far above chance (5 in 60 for Recall@5) when it ranks them all.
    assert galleries["generated gallery of 60"]["exhaustive"]["recall@5"] > 0.25

    speed = report["speed"]
    assert set(speed["sizes"]) == {"300", "1000"} and "tiny" in speed["rerank_model"]
    for rows, entry in speed["sizes"].items():
        assert entry["rows"] == int(rows) and entry["build_rows_per_second"] > 0 and entry["size_mib"] > 0
        for stage in ("first_stage_ms", "two_stage_cached_ms", "two_stage_encoder_ms"):
            assert 0 < entry[f"{stage}_p50"] <= entry[f"{stage}_p95"], (stage, entry)
        # Re-ranking from cached features skips the encoder: it cannot cost more than running it.
        assert entry["two_stage_cached_ms_p50"] < entry["two_stage_encoder_ms_p50"]
        assert entry["sqlite_fts5"]["or_query_ms_p50"] > 0
        assert f"{int(rows):>9,} rows" in printed


def test_rerunning_one_part_keeps_the_other_parts_figures(tmp_path):
    pytest.importorskip("tantivy")
    output = tmp_path / "results.json"
    output.write_text(json.dumps({"quality": {"command": "earlier", "galleries": {}}}))
    argv = [
        "--quick",
        "--speed-only",
        "--sizes",
        "200",
        "--no-sqlite",
        "--output",
        str(output),
        "--threads",
        "1",
    ]
    assert bench_search().main(argv) == 0
    report = json.loads(output.read_text())
    assert report["quality"] == {"command": "earlier", "galleries": {}}
    assert set(report["speed"]["sizes"]) == {"200"} and "sqlite_fts5" not in report["speed"]["sizes"]["200"]
