"""Smoke test of benchmarks/bench_generate.py: its --quick mode runs the full-size model on a few images,
prints every figure with its ratio and writes JSON; its exactness checks must hold. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sharpen_decoder

from show_attend_tell.saving import save_model_folder

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_generate.py"


@pytest.mark.slow
def test_bench_generate_quick_checks_exactness_and_writes_json(tmp_path, tiny_model, processor):
    # a saved model folder stands for the trained model (`make demo`'s) of the bf16 agreement on trained weights
    sharpen_decoder(tiny_model, std=0.3)
    save_model_folder(tmp_path / "trained", tiny_model, processor)
    json_out = tmp_path / "bench_generate.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--skip-peer", "--skip-memory", "--threads", "1"]
    command += ["--device", "cpu", "--json-out", str(json_out), "--trained-model", str(tmp_path / "trained")]
    command += ["--overlap-batches", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for figure in ("decoder-only, generate()", "end-to-end / encoder-only", "decoder batching"):
        assert figure in completed.stdout
    result = json.loads(json_out.read_text())
    exactness = result["exactness"]
    # the classic per-image beam search and generate() return the same captions in float32, and so do the
    # fast inference path and the plain step
    assert exactness["reference_vs_generate_fp32"] == 1.0
    assert exactness["fast_vs_plain_fp32"] == 1.0
    # a stream of batches through generate_overlapped gets each batch's generate(pixel_values) ids
    assert exactness["overlapped_vs_generate"] == 1.0
    assert "stream of 2 batches, overlapped / encoder" in completed.stdout
    assert result["settings"]["batch_size"] == 8 and result["settings"]["device"] == "cpu"
    # a float32 decoder whose weights are rounded to bf16: the bound on any bf16 computation's agreement
    assert 0 <= exactness["fp32_decoder_with_bf16_rounded_weights"] <= 1
    trained = result["trained_model"]
    assert trained["images"] == 16 and trained["config"]["vocab_size"] == tiny_model.config.vocab_size
    for key in ("bf16_vs_fp32_end_to_end", "bf16_vs_fp32_decoder", "fp32_decoder_with_bf16_rounded_weights"):
        assert 0 < trained[key] <= 1, key  # a share of the 16 pictures, some of them identical
    assert "bf16 ids = float32, trained model, end-to-end" in completed.stdout


@pytest.mark.slow
def test_bench_generate_measures_each_piece_of_the_fast_path_with_and_without_it(tmp_path):
    json_out = tmp_path / "pieces.json"
    command = [sys.executable, str(SCRIPT), "--pieces-only", "--quick", "--threads", "1", "--device", "cpu"]
    command += ["--no-fused-attention", "--json-out", str(json_out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    pieces = json.loads(json_out.read_text())["pieces"]
    expected = {
        "fast path (all of it)",
        "prepacked bf16 weights",
        "attention scores in a reused buffer",
        "float32 logits of the likeliest words",
    }
    assert set(pieces) == expected
    for name, piece in pieces.items():
        ratios = piece["decoder_ratios"]
        assert len(ratios) == len(piece["end_to_end_ratios"]) == 1, name  # --quick: 1 repeat
        assert all(ratio > 0 for ratio in ratios + piece["end_to_end_ratios"]), name
        assert name in completed.stdout
