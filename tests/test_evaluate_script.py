"""scripts/evaluate_captions.py: captioning a split with several beam sizes, scoring a predictions file, the model card."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import load_script, write_flickr30k_hub_folder
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from show_attend_tell import evaluation
from show_attend_tell.hub import normalize_eval_results
from show_attend_tell.metrics import compute_caption_metrics
from show_attend_tell.saving import save_model_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "evaluate_captions.py"

evaluate_script = load_script("evaluate_captions")

NUM_IMAGES = 7  # not a multiple of the batch size below, so the last batch is partial


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    """A tiny synthetic test split (generated once, cached on disk for the module's tests)."""
    cache = tmp_path_factory.mktemp("synthetic")
    return [
        "--dataset",
        "synthetic",
        "--cache-dir",
        str(cache),
        "--dataset-option",
        "image_size=32",
        "--max-samples",
        str(NUM_IMAGES),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def split(data_args):
    args = evaluate_script.parse_args(["--predictions", "unused", *data_args])
    return evaluation.load_split(
        args.dataset,
        args.split,
        cache_dir=args.cache_dir,
        max_samples=args.max_samples,
        options=args.dataset_options,
    )


@pytest.fixture
def model_dir(tmp_path, tiny_model, processor) -> Path:
    return save_model_folder(tmp_path / "model", tiny_model, processor)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = evaluate_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


# --- captioning with a model -------------------------------------------------------------------------


def test_model_run_writes_scores_captions_table_card_and_retrieval(
    tmp_path, model_dir, data_args, split, tiny_model, processor, capsys, monkeypatch
):
    monkeypatch.setenv("SHOW_ATTEND_TELL_CACHE", str(tmp_path / "cache"))  # retrieval's feature cache
    card = shutil.copyfile(REPO / "model_card.md", tmp_path / "model_card.md")
    output = tmp_path / "eval" / "results.json"
    status, out, err = run(
        [
            "--model", model_dir, *data_args, "--split", "test", "--num-beams", "2", "1",
            "--batch-size", 3, "--num-workers", 1, "--max-new-tokens", 12, "--device", "auto",
            "--metrics", "bleu", "rouge", "cider", "--output", output, "--retrieval",
            "--update-model-card", card, "--card-beams", "all", "--fuse-attention", "--capture-steps",
        ],
        capsys,
    )  # fmt: skip
    assert status == 0, err
    report = json.loads(output.read_text())
    # the compiled scores and the captured steps: the same captions, checked below
    assert report["settings"]["fuse_attention"] is True and report["settings"]["capture_steps"] is True

    assert report["dataset"] == "synthetic" and report["split"] == "test"
    assert report["num_images"] == NUM_IMAGES == len(split)
    assert list(report["results"]) == ["beam_1", "beam_2"] == list(report["predictions"])
    assert report["settings"]["num_beams"] == [1, 2] and report["settings"]["device"] == "cpu"
    assert report["timings"]["captioning_seconds"] > 0
    keys = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}
    for label, scores in report["results"].items():
        assert set(scores) == keys
        assert all(0.0 <= scores[k] <= 1.0 for k in keys - {"cider"}) and 0.0 <= scores["cider"] <= 10.0

        # One caption per image, in the split's order, with that image's references.
        rows = report["predictions"][label]
        assert [r["image_id"] for r in rows] == split["image_id"]
        assert [r["references"] for r in rows] == split["captions"]
        # The JSON's scores are those of the captions it holds.
        expected = compute_caption_metrics(
            [r["caption"] for r in rows], [r["references"] for r in rows], metrics=("bleu", "rouge", "cider")
        )
        assert scores == pytest.approx(expected, abs=1e-12)

    # Batched, shared-encoder decoding gives what one generate() per picture gives.
    for row, image in zip(report["predictions"]["beam_2"], split["image"], strict=True):
        with torch.no_grad():
            ids = tiny_model.generate(**processor(images=image), num_beams=2, max_new_tokens=12)
        assert row["caption"] == processor.batch_decode(ids)[0]

    # The table: a header with the metric names, one row per beam size, percentages with one decimal.
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("Decoding"))
    assert header.split() == ["Decoding", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    beam_1 = next(line for line in lines if line.startswith("beam 1"))
    assert beam_1.split()[2] == f"{100 * report['results']['beam_1']['bleu_1']:.1f}"
    assert any(line.startswith("beam 2") for line in lines)

    retrieval = report["retrieval"]
    assert retrieval["num_images"] == NUM_IMAGES and retrieval["num_queries"] == 5 * NUM_IMAGES
    assert all(0.0 <= retrieval[f"recall@{k}"] <= 1.0 for k in (1, 5, 10))
    assert retrieval["recall@10"] == 1.0  # 7 images: every rank is within 10
    assert "R@1" in out

    # The results file scores again with --predictions (e.g. after METEOR failed): the same numbers.
    status, _, err = run(["--predictions", output, *data_args, "--metrics", "bleu", "rouge", "cider"], capsys)
    assert status == 2 and "pick one with --predictions-entry" in err
    rescored = tmp_path / "rescored.json"
    argv = ["--predictions", output, "--predictions-entry", "beam_2", *data_args, "--output", rescored]
    status, _, err = run([*argv, "--metrics", "bleu", "rouge", "cider"], capsys)
    assert status == 0, err
    assert json.loads(rescored.read_text())["results"]["predictions"] == report["results"]["beam_2"]

    # push_to_hub.py --eval-results reads the same file.
    normalized = normalize_eval_results(report)
    assert [r["num_beams"] for r in normalized["results"]] == [1, 2]
    assert normalized["results"][1]["metrics"]["BLEU-4"] == round(
        100 * report["results"]["beam_2"]["bleu_4"], 2
    )

    # Both beam sizes went into the card's model-index, in percent.
    metadata = front_matter(card.read_text())
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    by_beam = {(m["name"], m["args"]["num_beams"]): m["value"] for m in metrics}
    assert by_beam[("BLEU-4", 2)] == round(100 * report["results"]["beam_2"]["bleu_4"], 2)
    assert by_beam[("ROUGE-L", 1)] == round(100 * report["results"]["beam_1"]["rouge_l"], 2)


# --- a predictions file ------------------------------------------------------------------------------


def test_perfect_predictions_score_far_above_shuffled_ones(tmp_path, data_args, split, capsys):
    ids, refs = split["image_id"], split["captions"]
    perfect = write_jsonl(
        tmp_path / "perfect.jsonl", [{"image_id": i, "caption": r[0]} for i, r in zip(ids, refs, strict=True)]
    )
    rotated = refs[1:] + refs[:1]  # every image gets another image's caption
    shuffled = write_jsonl(
        tmp_path / "shuffled.jsonl",
        [{"image_id": i, "caption": r[0]} for i, r in zip(ids, rotated, strict=True)],
    )
    # The same captions as a JSON array (coco-caption's results format), in another order, ids as given.
    array = tmp_path / "perfect.json"
    array.write_text(
        json.dumps([{"image_id": i, "caption": r[0]} for i, r in reversed(list(zip(ids, refs, strict=True)))])
    )

    scores = {}
    for name, path in (("perfect", perfect), ("shuffled", shuffled), ("array", array)):
        output = tmp_path / f"{name}.out.json"
        status, out, err = run(
            ["--predictions", path, *data_args, "--metrics", "bleu", "--output", output], capsys
        )
        assert status == 0, err
        report = json.loads(output.read_text())
        assert report["model"] is None and list(report["results"]) == ["predictions"]
        assert len(report["predictions"]["predictions"]) == NUM_IMAGES
        scores[name] = report["results"]["predictions"]
        assert "predictions" in out  # the table's row
    assert scores["perfect"]["bleu_4"] == pytest.approx(1.0)
    assert scores["array"] == scores["perfect"]
    assert scores["shuffled"]["bleu_4"] < scores["perfect"]["bleu_4"] - 0.3


def perfect_rows(split) -> list[dict]:
    return [
        {"image_id": i, "caption": r[0]} for i, r in zip(split["image_id"], split["captions"], strict=True)
    ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed", "line 3: not valid JSON"),
        ("unknown", "line 2: unknown image_id 'no-such-image'"),
        ("duplicate", "again (first at line 1)"),
        ("missing", f"no caption for 1 of the {NUM_IMAGES} images"),
        ("not_an_object", "line 1: expected a JSON object"),
        ("no_caption", "has no caption (the captioning run reported: corrupt file)"),
        ("no_id", "line 1: no image_id"),
        ("empty", "no predictions in the file"),
    ],
)
def test_predictions_file_errors_name_the_line(tmp_path, data_args, split, capsys, case, message):
    rows = perfect_rows(split)
    lines = [json.dumps(row) for row in rows]
    if case == "malformed":
        lines[2] = lines[2][:-5]
    elif case == "unknown":
        lines[1] = json.dumps({"image_id": "no-such-image", "caption": "a red circle"})
    elif case == "duplicate":
        lines.append(lines[0])
    elif case == "missing":
        del lines[-1]
    elif case == "not_an_object":
        lines[0] = json.dumps(["a", "list"])
    elif case == "no_caption":
        lines[0] = json.dumps({"image_id": rows[0]["image_id"], "error": "corrupt file"})
    elif case == "no_id":
        lines[0] = json.dumps({"caption": "a red circle"})
    elif case == "empty":
        lines = ["", "  "]
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    status, _, err = run(["--predictions", path, *data_args, "--metrics", "bleu"], capsys)
    assert status == 2
    assert "evaluate_captions.py: error:" in err and message in err, err


def test_flickr30k_from_a_downloaded_folder_and_offline(tmp_path, split, capsys, monkeypatch):
    # --data-dir: the folder `hf download nlphuji/flickr30k ... --local-dir DIR` makes (here: the synthetic
    # test pictures in nlphuji's schema and layout).
    images = split.cast_column("image", datasets.Image(decode=False))
    rows = [
        {
            "image": row["image"]["bytes"],
            "captions": row["captions"],
            "image_id": row["image_id"],
            "split": "test",
        }
        for row in images
    ]
    folder = write_flickr30k_hub_folder(tmp_path / "flickr30k", rows)
    predictions = write_jsonl(tmp_path / "p.jsonl", perfect_rows(split))
    output = tmp_path / "out.json"
    argv = ["--predictions", predictions, "--dataset", "flickr30k", "--data-dir", folder, "--split", "test"]
    argv += ["--cache-dir", tmp_path / "hf-cache", "--metrics", "bleu", "--output", output, "--no-progress"]
    with pytest.warns(UserWarning, match="differ from Karpathy's Flickr30K split"):
        status, _, err = run(argv, capsys)
    assert status == 0, err
    assert json.loads(output.read_text())["results"]["predictions"]["bleu_4"] == pytest.approx(1.0)

    # Without network and without --data-dir: one line that says how to get that folder.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    status, _, err = run(
        ["--predictions", predictions, "--dataset", "flickr30k", "--cache-dir", tmp_path], capsys
    )
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "could not download nlphuji/flickr30k" in err and "then pass --data-dir DIR" in err
    assert (
        "`hf download nlphuji/flickr30k --repo-type dataset --revision refs/convert/parquet --local-dir DIR`"
        in err
    )


# Unicode line breaks that str.splitlines() cuts at but JSON lets a string hold unescaped.
UNICODE_LINE_BREAKS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def test_predictions_with_unicode_line_breaks_in_captions(tmp_path, data_args, split, capsys):
    # Each caption is its image's first reference with one space replaced by a Unicode line break, written
    # unescaped (ensure_ascii=False, as most JSON writers do); the break is whitespace, so BLEU-4 stays 1.
    rows = perfect_rows(split)
    for number, row in enumerate(rows):
        row["caption"] = row["caption"].replace(" ", UNICODE_LINE_BREAKS[number % 3], 1)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8") and "\u0085" in path.read_text(encoding="utf-8")
    output = tmp_path / "out.json"
    status, _, err = run(["--predictions", path, *data_args, "--metrics", "bleu", "--output", output], capsys)
    assert status == 0, err
    report = json.loads(output.read_text())
    assert report["results"]["predictions"]["bleu_4"] == pytest.approx(1.0)
    assert [r["caption"] for r in report["predictions"]["predictions"]] == [r[0] for r in split["captions"]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    captions=st.lists(
        st.text(alphabet=st.one_of(st.characters(), st.sampled_from(UNICODE_LINE_BREAKS))),
        min_size=1,
        max_size=5,
    ),
    ascii_only=st.booleans(),
    line_end=st.sampled_from(["\n", "\r\n"]),
)
def test_predictions_file_keeps_any_unicode_caption(tmp_path, captions, ascii_only, line_end):
    # Any caption a JSON writer can write is read back (whitespace runs, line breaks included, become
    # one space: a newline in a hypothesis makes METEOR wait forever).
    # A lone surrogate (U+D800..U+DFFF) is written only escaped (ensure_ascii): it has no UTF-8 encoding.
    assume(ascii_only or not any("\ud800" <= char <= "\udfff" for caption in captions for char in caption))
    references = {f"image-{n}": ["a reference"] for n in range(len(captions))}
    lines = [
        json.dumps({"image_id": image_id, "caption": caption}, ensure_ascii=ascii_only)
        for image_id, caption in zip(references, captions, strict=True)
    ]
    path = tmp_path / "p.jsonl"
    path.write_bytes((line_end.join(lines) + line_end).encode("utf-8"))
    read = evaluation.read_predictions(path, references, "the split")
    assert read == [" ".join(caption.split()) for caption in captions]


def test_predictions_update_the_model_card(tmp_path, data_args, split, capsys):
    card = shutil.copyfile(REPO / "model_card.md", tmp_path / "model_card.md")
    original = card.read_text()
    predictions = write_jsonl(tmp_path / "p.jsonl", perfect_rows(split))
    argv = [
        "--predictions",
        predictions,
        *data_args,
        "--metrics",
        "bleu",
        "rouge",
        "--update-model-card",
        card,
    ]
    status, _, err = run(argv, capsys)
    assert status == 0, err
    # Twice: the second run replaces the first run's results instead of adding to them.
    status, _, err = run(argv, capsys)
    assert status == 0, err

    text = card.read_text()
    metadata = front_matter(text)
    assert metadata["license"] == front_matter(original)["license"]  # the rest of the metadata is kept
    (index,) = metadata["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == "image-to-text"
    assert (
        result["dataset"]["name"] == "synthetic"
        and result["dataset"]["split"] == f"test (first {NUM_IMAGES})"
    )
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values["BLEU-4"] == 100.0 and values["BLEU-1"] == 100.0
    assert set(values) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"}
    table = text.split("<!-- results-table -->", 1)[1].split("<!-- /results-table -->", 1)[0]
    assert "| This model (synthetic test (first 7)) | default | 100.00 | 100.00 | 100.00 | 100.00 |" in table
    assert "| 66.7 | 43.4 | 28.8 | 19.1 | 18.49 |" in table  # the paper's row stays
    assert text.split("## How to use", 1)[1] == original.split("## How to use", 1)[1]


def test_best_beam_by_bleu_4():
    results = {"beam_1": {"bleu_4": 0.10}, "beam_3": {"bleu_4": 0.14}, "beam_5": {"bleu_4": 0.12}}
    assert evaluation.best_label(results) == "beam_3"
    report = {"dataset": "flickr30k", "split": "test", "num_images": 1000, "tokenization": "ptb"}
    report |= {
        "results": results,
        "predictions": {},
        "settings": {"max_samples": None, "data_dir": "/home/x"},
    }
    card = evaluation.card_results(report, "best")
    assert card == {
        "dataset": "flickr30k",
        "split": "test",
        "num_images": 1000,
        "tokenization": "ptb",
        "results": {"beam_3": {"bleu_4": 0.14}},
        "settings": {"max_samples": None},
    }
    assert len(evaluation.card_results(report, "all")["results"]) == 3
    assert normalize_eval_results(card)["results"] == [{"num_beams": 3, "metrics": {"BLEU-4": 14.0}}]


# --- METEOR and Java ---------------------------------------------------------------------------------


def test_without_java_the_script_stops_in_one_line_before_any_work(
    tmp_path, data_args, split, capsys, monkeypatch
):
    predictions = write_jsonl(tmp_path / "p.jsonl", perfect_rows(split))
    monkeypatch.setenv("PATH", str(tmp_path / "no-java-here"))  # `java` cannot be found
    output = tmp_path / "out.json"
    status, out, err = run(["--predictions", predictions, *data_args, "--output", output], capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert (
        "no working `java`" in line
        and "default-jre-headless" in line
        and "--approximate-tokenization" in line
    )
    assert not output.exists() and "images" not in out  # stopped before reading the split or scoring
    # the same with a `java` that shutil.which cannot see, whatever PATH says
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    status, _, err = run(["--predictions", predictions, *data_args, "--metrics", "bleu"], capsys)
    assert status == 2 and "no working `java`" in err


def test_approximate_tokenization_is_labelled_in_the_table_the_json_and_the_card(
    tmp_path, data_args, split, capsys, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path / "no-java-here"))
    card = shutil.copyfile(REPO / "model_card.md", tmp_path / "model_card.md")
    predictions = write_jsonl(tmp_path / "p.jsonl", perfect_rows(split))
    output = tmp_path / "out.json"
    argv = ["--predictions", predictions, *data_args, "--approximate-tokenization", "--output", output]
    status, out, err = run(
        [*argv, "--metrics", "bleu", "meteor", "cider", "--update-model-card", card], capsys
    )
    assert status == 0, err
    # the table
    assert "APPROXIMATE" in out and "predictions (approx.)" in out
    # the JSON
    report = json.loads(output.read_text())
    assert report["tokenization"] == "approximate" and report["settings"]["tokenization"].startswith(
        "APPROXIMATE"
    )
    scores = report["results"]["predictions"]
    assert "meteor" not in scores and scores["bleu_4"] == pytest.approx(1.0) and "cider" in scores
    assert err.count("METEOR needs Java") == 1 and report["warnings"]
    # the card: its table and its model-index metadata
    text = card.read_text()
    table = text.split("<!-- results-table -->", 1)[1].split("<!-- /results-table -->", 1)[0]
    assert "approximate tokenisation" in table and "APPROXIMATE" in table
    names = {m["name"] for m in front_matter(text)["model-index"][0]["results"][0]["metrics"]}
    assert names and all("approximate tokenisation" in name for name in names)
    # a card built later from the JSON (push_to_hub.py --eval-results) keeps the label
    assert normalize_eval_results(report)["tokenization"] == "approximate"

    # METEOR alone cannot be computed: an error, but the captions are still written.
    output.unlink()
    status, _, err = run([*argv, "--metrics", "meteor"], capsys)
    assert status == 2 and "METEOR needs Java" in err
    assert len(json.loads(output.read_text())["predictions"]["predictions"]) == NUM_IMAGES


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_all_metrics_with_meteor(tmp_path, data_args, split, capsys):
    predictions = write_jsonl(tmp_path / "p.jsonl", perfect_rows(split))
    output = tmp_path / "out.json"
    status, out, err = run(["--predictions", predictions, *data_args, "--output", output], capsys)
    assert status == 0, err
    scores = json.loads(output.read_text())["results"]["predictions"]
    assert set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}
    assert scores["meteor"] == pytest.approx(1.0, abs=0.01)
    header = next(line for line in out.splitlines() if line.startswith("Decoding"))
    assert header.split()[5] == "METEOR"


# --- the command line and the file's name ------------------------------------------------------------


def test_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        evaluate_script.parse_args(["--model", "m", "--predictions", "p.jsonl"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--predictions", "p.jsonl", "--retrieval"])
    assert "--retrieval needs a model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--model", "m", "--num-beams", "0"])
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--model", str(tmp_path / "no-such-model")])
    assert "no such folder" in capsys.readouterr().err
    args = evaluate_script.parse_args(["--model", "m", "--num-beams", "5", "1", "3", "1"])
    assert args.num_beams == [1, 3, 5] and args.metrics == ["bleu", "meteor", "rouge", "cider"]
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--model", "m", "--dataset-option", "use_cache=False"])
    assert "write use_cache=false" in capsys.readouterr().err


def test_no_script_shadows_the_evaluate_library(monkeypatch):
    """`python scripts/train.py` puts scripts/ first on sys.path; `import evaluate` must still be the library
    (scripts/evaluate.py once shadowed it, and every script carried a work-around)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.delitem(sys.modules, "evaluate", raising=False)
    library = importlib.import_module("evaluate")
    assert hasattr(library, "load") and Path(library.__file__).resolve() != SCRIPT
    assert str(SCRIPT.parent) in sys.path


@pytest.mark.slow
def test_runs_as_a_script(tmp_path, data_args, split):
    predictions = write_jsonl(tmp_path / "p.jsonl", perfect_rows(split))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--predictions",
            str(predictions),
            *data_args,
            "--metrics",
            "bleu",
            "cider",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "predictions" in completed.stdout and "100.0" in completed.stdout


def test_an_unreadable_image_is_reported_with_its_id(tiny_model, processor):
    from datasets import Dataset, Features, Image, Value

    good = io.BytesIO()
    PILImage.new("RGB", (20, 16), (200, 30, 30)).save(good, format="PNG")
    rows = Dataset.from_dict(
        {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"not a picture", "path": None}],
         "image_id": ["ok", "broken"]},
        features=Features({"image": Image(), "image_id": Value("string")}),
    )  # fmt: skip
    with pytest.raises(evaluation.EvaluationError) as raised:
        evaluation.caption_split(tiny_model, processor, rows, num_beams=[1, 3], progress=False)
    message = str(raised.value)
    assert message.startswith("image 'broken' (row 1) cannot be read: not an image file Pillow can read")
    assert "\n" not in message
