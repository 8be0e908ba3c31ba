"""show_attend_tell.evaluation from Python: the split, a predictions file, scores, the table, the report, the card.
(tests/test_evaluate_script.py runs the same through scripts/evaluate_captions.py, with a model.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from hypothesis import given
from hypothesis import strategies as st

from show_attend_tell import evaluation
from show_attend_tell.evaluation import EvaluationError
from show_attend_tell.hub import normalize_eval_results
from show_attend_tell.metrics import compute_caption_metrics

CARD = Path(__file__).resolve().parent.parent / "model_card.md"
NUM_IMAGES = 6


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synthetic")
    return evaluation.load_split(
        "synthetic", "val", cache_dir=cache, max_samples=NUM_IMAGES, options={"image_size": 32}
    )


def test_the_split_and_its_references(rows):
    assert len(rows) == NUM_IMAGES and set(rows.column_names) >= {"image", "captions", "image_id"}
    references = evaluation.references_by_id(rows)
    assert list(references) == [str(i) for i in rows["image_id"]]
    assert list(references.values()) == rows["captions"]
    with pytest.raises(EvaluationError, match="twice"):
        evaluation.references_by_id({"image_id": ["a", "a"], "captions": [["x"], ["y"]]})
    with pytest.raises(EvaluationError, match="no reference caption"):
        evaluation.references_by_id({"image_id": ["a"], "captions": [["", "  "]]})
    with pytest.raises(EvaluationError, match="Unknown"):
        evaluation.load_split("synthetic", "holdout")
    with pytest.raises(EvaluationError, match="no-such-folder"):
        evaluation.load_split("no-such-folder/data.json")


def test_a_report_round_trip_scores_writes_reads_back_and_updates_a_card(tmp_path, rows):
    references = evaluation.references_by_id(rows)
    first = [refs[0] for refs in references.values()]
    # a predictions file as JSON lines, in another order than the split's
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"image_id": i, "caption": c}) for i, c in zip(references, first, strict=True)]
    path.write_text("\n".join(reversed(lines)) + "\n")
    captions = {
        "beam_1": [" ".join(refs[-1].split()[:2]) for refs in references.values()],  # worse
        "beam_3": evaluation.read_predictions(path, references),
    }
    assert captions["beam_3"] == first  # in the split's order

    scores = evaluation.score_captions(
        captions, references, metrics=("bleu", "cider"), tokenizer="approximate"
    )
    assert scores.error is None and list(scores.results) == ["beam_1", "beam_3"]
    assert scores.results["beam_3"]["bleu_4"] == pytest.approx(1.0)
    for label, texts in captions.items():  # each entry is the corpus score of its own captions
        expected = compute_caption_metrics(
            texts, list(references.values()), metrics=("bleu", "cider"), tokenizer="approximate"
        )
        assert scores.results[label] == pytest.approx(expected)
    assert set(scores.timings) == {"scoring_seconds_beam_1", "scoring_seconds_beam_3"}

    report = evaluation.build_report(
        model="m",
        dataset="synthetic",
        split="validation",
        references=references,
        captions=captions,
        scores=scores,
        tokenizer="approximate",
        settings={"max_samples": NUM_IMAGES},
        timings=scores.timings,
    )
    output = tmp_path / "eval" / "results.json"
    evaluation.write_report(output, report)
    written = json.loads(output.read_text())
    assert written["results"] == scores.results and written["num_images"] == NUM_IMAGES
    assert written["tokenization"] == "approximate" and written["settings"]["tokenization"].startswith(
        "APPROX"
    )
    assert [row["references"] for row in written["predictions"]["beam_3"]] == list(references.values())
    # the report is itself a predictions file: each entry reads back as its captions
    with pytest.raises(EvaluationError, match="pick one with --predictions-entry"):
        evaluation.read_predictions(output, references)
    for label, texts in captions.items():
        assert evaluation.read_predictions(output, references, entry=label) == texts

    # the card gets the best entry, labelled approximate, on the first N images
    card = shutil.copyfile(CARD, tmp_path / "model_card.md")
    evaluation.update_model_card(card, written)
    metadata = ModelCard(card.read_text()).data
    assert {r.metric_args["num_beams"] for r in metadata.eval_results} == {3}
    assert {r.dataset_split for r in metadata.eval_results} == {f"validation (first {NUM_IMAGES})"}
    assert all("approximate" in r.metric_name for r in metadata.eval_results)
    # all entries: what push_to_hub.py --eval-results shows of the whole report
    assert normalize_eval_results(evaluation.card_results(written, "all")) == normalize_eval_results(written)
    with pytest.raises(ValueError, match="'best' or 'all'"):
        evaluation.card_results(written, "worst")


def test_a_failing_scoring_is_returned_after_the_entries_before_it(monkeypatch):
    references = {"a": ["a red circle"], "b": ["a blue square"]}
    captions = {"beam_1": ["a red circle", "a blue square"], "beam_3": ["a red circle", "a square"]}
    calls = []

    def only_once(predictions, refs, **kwargs):
        calls.append(predictions)
        if len(calls) > 1:
            raise RuntimeError("METEOR needs Java")
        return {"bleu_4": 1.0}

    monkeypatch.setattr(evaluation, "compute_caption_metrics", only_once)
    scores = evaluation.score_captions(captions, references, tokenizer="approximate")
    assert scores.results == {"beam_1": {"bleu_4": 1.0}}
    assert isinstance(scores.error, EvaluationError) and "METEOR needs Java" in str(scores.error)


def test_without_java_official_scores_stop_in_one_line(monkeypatch):
    assert evaluation.choose_tokenization(approximate=True) == "approximate"
    monkeypatch.setattr(evaluation, "java_available", lambda: False)
    with pytest.raises(EvaluationError) as raised:
        evaluation.choose_tokenization()
    assert "default-jre-headless" in str(raised.value) and "\n" not in str(raised.value)
    monkeypatch.setattr(evaluation, "java_available", lambda: True)
    assert evaluation.choose_tokenization() == "ptb"


SCORE_KEYS = [key for key, _ in evaluation.TABLE_COLUMNS]


@given(
    results=st.dictionaries(
        st.sampled_from(["beam_1", "beam_3", "beam_5", "predictions"]),
        st.dictionaries(st.sampled_from(SCORE_KEYS), st.floats(0, 1), min_size=1),
        min_size=1,
    ),
    approximate=st.booleans(),
)
def test_the_table_has_a_row_per_entry_and_a_column_per_score(results, approximate):
    table = evaluation.format_table(results, tokenizer="approximate" if approximate else "ptb").splitlines()
    assert table[0].startswith("scores: APPROXIMATE") == approximate
    header, rule, *rows = table[1:] if approximate else table
    names = header.split()[1:]
    assert names == [
        name for key, name in evaluation.TABLE_COLUMNS if any(key in s for s in results.values())
    ]
    assert set(rule) <= {"-", " "} and len(rows) == len(results)
    for row, (label, scores) in zip(rows, results.items(), strict=True):
        assert row.startswith(label.replace("_", " ") + (" (approx.)" if approximate else ""))
        cells = row.split()[-len(names) :]
        for name, cell in zip(names, cells, strict=True):
            key = SCORE_KEYS[[n for _, n in evaluation.TABLE_COLUMNS].index(name)]
            assert cell == (f"{100 * scores[key]:.1f}" if key in scores else "-")


def test_the_table_reports_retrieval():
    retrieval = {"recall@1": 0.5, "recall@5": 0.75, "recall@10": 1.0, "median_rank": 1.5}
    retrieval |= {"num_queries": 10, "num_images": 4}
    table = evaluation.format_table({"beam_3": {"bleu_4": 0.2}}, retrieval)
    assert table.splitlines()[-1] == (
        "text->image retrieval (10 captions, 4 images): R@1 50.0  R@5 75.0  R@10 100.0  median rank 1.5"
    )
