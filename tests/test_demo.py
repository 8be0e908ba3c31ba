"""scripts/demo.py end to end, on a few hundred pictures instead of thousands (the real run: `make demo`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import load_script, reset_accelerate


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("SHOW_ATTEND_TELL_CACHE", str(tmp_path / "cache"))  # the synthetic data goes here
    demo = load_script("demo")
    output = tmp_path / "demo"
    argv = "--num-train 120 --num-validation 12 --num-test 12 --train-images 480 --max-minutes 2 --figures 2"
    try:
        assert demo.main([*argv.split(), "--output-dir", str(output)]) == 0
    finally:
        reset_accelerate()

    captured = capsys.readouterr()
    printed = captured.out
    assert "test BLEU-4" in printed and "attention localisation" in printed and "x chance" in printed
    # No noise: the synthetic data is written without progress bars, and scores never in 6.58e-11 form.
    assert "Saving the dataset" not in printed + captured.err
    score_lines = [
        line for line in (printed + captured.err).splitlines() if "BLEU" in line or "[3/5]" in line
    ]
    assert len(score_lines) >= 3  # the training's validation lines, the test scores, the closing summary
    assert not [line for line in score_lines if re.search(r"\d(?:\.\d+)?e[-+]\d+", line)]
    assert re.search(r"test BLEU-4 \d\.\d{4} \(target", printed)
    results = json.loads((output / "demo_results.json").read_text())
    assert 0.0 <= results["test"]["bleu_4"] <= 1.0
    assert 0.0 <= results["localisation"]["share"] <= 1.0 and 0.0 <= results["localisation"]["chance"] < 1.0
    assert results["training"]["images"] >= 480
    for i in range(2):
        figure = output / f"attention_{i}.png"
        assert figure.stat().st_size > 10_000
        assert str(figure) in printed
    assert (output / "run" / "model" / "model.safetensors").is_file()


def test_demo_training_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("SHOW_ATTEND_TELL_CACHE", str(tmp_path / "cache"))
    demo = load_script("demo")
    argv = "--num-train 8 --num-validation 2 --num-test 2 --train-images 0"
    try:
        assert demo.main([*argv.split(), "--output-dir", str(tmp_path / "demo")]) == 2
    finally:
        reset_accelerate()
    error = capsys.readouterr().err
    assert error.strip() == "training failed: --max-train-images must be positive, got 0"
