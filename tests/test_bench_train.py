"""Smoke test of benchmarks/bench_train.py: its --quick mode runs on a tiny model, prints every variant with
its ratio to the reference and writes valid JSON. No timing is asserted (this machine is shared)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from show_attend_tell.modeling_show_attend_tell import PADDING_SHARE_WORTH_SKIPPING

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


@pytest.mark.slow
def test_bench_train_quick_prints_ratios_and_writes_json(tmp_path):
    json_out = tmp_path / "bench_train.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--model-size",
        "tiny",
        "--vocab-size",
        "64",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json-out",
        str(json_out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout

    assert "bench_train: " in out and "threads=1" in out  # the settings
    for label in (
        "reference: encoder per caption (fp32)",
        "ours: encoder once per image (fp32)",
        "ours: cached features (fp32)",
        "ours: encoder once per image (bf16)",
        "ours: cached features (bf16)",
    ):
        line = next((line for line in out.splitlines() if label in line), None)
        assert line is not None, f"{label!r} missing from:\n{out}"
        assert re.search(r"\d+\.\d\dx", line), line  # its ratio to the reference
    assert "PASS" in out or "FAIL" in out
    assert "Flickr30K's 29,000 training images" in out
    assert "cached features identical to encoding (fp32): True" in out

    result = json.loads(json_out.read_text())
    assert result["settings"]["model_size"] == "tiny"
    assert result["settings"]["captions_per_batch"] == 60  # 64 // 5 images x 5 captions
    variants = {row["variant"]: row for row in result["table"]}
    assert set(variants) == {"reference", "ours_fp32", "cached_fp32", "ours_bf16", "cached_bf16"}
    assert variants["reference"]["ratio"] == 1.0
    for row in result["table"]:
        assert row["captions_per_s"] > 0 and row["ratio"] > 0
    for name in ("cached_fp32", "cached_bf16"):
        assert variants[name]["target"] == ">= 10x" and isinstance(variants[name]["passed"], bool)
    cache = result["feature_cache"]
    assert cache["bytes_per_image"] == 16 * 4 * 4 * 2  # tiny: 16 channels on a 4 x 4 grid, float16
    assert cache["flickr30k_bytes"] == cache["bytes_per_image"] * 29_000
    assert result["check"]["cached_features_identical"] is True
    # what skipping padded steps buys, per precision, with the batch's share of padding
    assert "Skipping padded steps" in out
    pieces = {piece["dtype"]: piece for piece in result["padded_steps"]}
    assert set(pieces) == {"fp32", "bf16"}
    for piece in pieces.values():
        assert piece["ratio"] > 0 and piece["decoder_s_padded"] > 0 and piece["decoder_s_skipping"] > 0
        assert 0.0 < piece["padding"] < 0.5  # 15 +- 2 steps: some padding, never most of the batch
        assert piece["model_skips"] == (piece["padding"] >= PADDING_SHARE_WORTH_SKIPPING)
