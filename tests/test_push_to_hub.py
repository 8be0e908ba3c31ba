"""Sharing: the model card, push_to_hub through transformers, scripts/push_to_hub.py, safe loading. No network."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
import transformers.utils.hub as transformers_hub
from conftest import load_script
from huggingface_hub import ModelCard
from transformers import AutoModel, pipeline

from show_attend_tell import ShowAttendTellConfig, hub
from show_attend_tell.saving import save_model_folder

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "model_card.md"
TOKEN = "hf_SentinelTokenThatMustNeverBeWrittenToDisk"
SCORES = {  # compute_caption_metrics' scores (fractions) of two beam sizes
    "beam_1": {"bleu_1": 0.61, "bleu_2": 0.41, "bleu_3": 0.27, "bleu_4": 0.18, "meteor": 0.17},
    "beam_3": {
        "bleu_1": 0.64,
        "bleu_2": 0.43,
        "bleu_3": 0.29,
        "bleu_4": 0.195,
        "meteor": 0.18,
        "cider": 0.42,
    },
}

push_script = load_script("push_to_hub")


@pytest.fixture
def model_dir(tmp_path, tiny_model, processor) -> Path:
    return save_model_folder(tmp_path / "model", tiny_model, processor)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the model card ------------------------------------------------------------------------------


def test_model_card_template_is_a_complete_card():
    text = CARD.read_text()
    card = ModelCard(text)
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "image-to-text"
    assert card.data.library_name == "transformers"
    assert "arxiv:1502.03044" in card.data.tags  # the paper, in the metadata the Hub reads
    assert "https://arxiv.org/abs/1502.03044" in text
    for section in (
        "## Intended use and limits",
        "## Training",
        "## Evaluation",
        "## How to use",
        "## Citation",
    ):
        assert section in text
    for marker in ("model-summary", "checkpoint-details", "training", "results-table", "attention-figure"):
        assert f"<!-- {marker} -->" in text and f"<!-- /{marker} -->" in text
    # What depends on the checkpoint is filled in from it: the template states none of the paper's setup.
    for paper_setup in (
        "ResNet-101",
        "2048 channels",
        "14 x 14",
        "196",
        "| 64 |",
        "29,000",
        "512 / 512 / 512",
        "4e-4",
    ):
        assert paper_setup not in text, paper_setup
    assert "| 66.7 | 43.4 | 28.8 | 19.1 | 18.49 |" in text  # the paper's Flickr30K soft-attention numbers
    assert 'pipeline("image-to-text"' in text and "AutoModel.from_pretrained" in text
    assert "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention" in text
    assert "@inproceedings{xu2015show" in text
    assert hub.render_model_card(text) == text  # nothing to fill in: rendering changes nothing


TRAINING_ARGS = {  # training_args.json as scripts/train.py writes it, with values far from the paper's
    "dataset": "synthetic",
    "data_dir": None,
    "dataset_options": {"num_train": 40, "image_size": 64},
    "train_split": "train",
    "val_split": "validation",
    "max_train_samples": None,
    "max_val_samples": 8,
    "captions_per_image": 2,
    "min_word_freq": 1,
    "max_caption_words": 20,
    "model_size": "tiny",
    "no_pretrained_encoder": True,
    "fine_tune_encoder": False,
    "fine_tune_stages": "3",
    "epochs": 2,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "decoder_lr": 0.003,
    "encoder_lr": 0.0001,
    "alpha_c": 1.0,  # also in the config, where the card reads it
    "grad_clip": 5.0,
    "mixed_precision": "no",
    "seed": 7,
    "max_steps": None,
    "num_processes": 1,
}
TRAINING_METRICS = {
    "best": {"bleu_4_approx": 0.31, "epoch": 2},
    "stopped_because": "epochs",
    "data": {"train_rows": 40, "val_rows": 8},
}


def test_the_card_describes_the_checkpoint_it_ships_with(tmp_path, model_dir, tiny_model):
    (model_dir / hub.TRAINING_ARGS_NAME).write_text(json.dumps(TRAINING_ARGS))
    (model_dir / hub.TRAINING_METRICS_NAME).write_text(json.dumps(TRAINING_METRICS))
    report = {**EVALUATE_REPORT, "dataset": "synthetic", "num_images": 7, "settings": {"max_samples": 7}}
    out = hub.assemble_repository(
        model_dir,
        tmp_path / "repository",
        card_template=CARD.read_text(),
        eval_results=report,
        with_figure=False,
    )
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    config = tiny_model.config
    grid, pixels = config.encoded_image_size, config.num_pixels
    # training data and hyperparameters from training_args.json and metrics.json
    for value in (
        "synthetic (num_train=40, image_size=64)",
        "40 training images and 8 validation images",
        "2 captions per image, at most 8 validation images",
        "truncated to 20 words",
        "at least 1 times",
        f"({config.vocab_size} entries",
        "| Model size preset | tiny |",
        "randomly initialised, frozen",
        f"alpha_c = {config.alpha_c}",
        "decoder learning rate 0.003",
        "| Batch size | 8 |",
        "| Epochs | 2 |",
        "| Seed | 7 |",
        "best validation BLEU-4 (approximate tokenisation): epoch 2",
    ):
        assert value in text, value
    # sizes and usage shapes from the folder's config and processor
    summary = text.split("<!-- model-summary -->", 1)[1].split("<!-- /model-summary -->", 1)[0]
    assert "resized to 64 x 64" in summary and f"pooled to {grid} x {grid}" in summary
    assert f"over the {pixels} grid positions" in summary and "randomly initialised ResNet" in summary
    assert "| Input | RGB, resized to 64 x 64 pixels |" in text
    assert f"(len(words), {pixels})" in text and f"(sequences, steps, {pixels})" in text
    assert hub.GRID_PLACEHOLDER not in text and hub.PIXELS_PLACEHOLDER not in text
    # an evaluation of the first N images says so, in the table and in the metadata
    assert "| This model (synthetic test (first 7)) |" in text
    assert {r.dataset_split for r in card.data.eval_results} == {"test (first 7)"}
    # the paper is linked; its setup is not claimed where it would be wrong
    assert "arxiv:1502.03044" in card.data.tags
    assert card.data.datasets is None  # not trained on Flickr30K
    checkpoint_and_training = text.split("## Checkpoint", 1)[1].split("## Evaluation", 1)[0]
    for paper_setup in ("ResNet-101", "| 64 |", "Flickr30K", "29,000", "14 x 14", "196", "4e-4", "512 / 512"):
        assert paper_setup not in checkpoint_and_training, paper_setup
    for paper_setup in ("ResNet-101", "14 x 14", "(len(words), 196)", "256 x 256"):
        assert paper_setup not in text, paper_setup


def test_a_folder_without_training_args_says_its_training_is_not_recorded(tmp_path, model_dir):
    out = hub.assemble_repository(
        model_dir, tmp_path / "repository", card_template=CARD.read_text(), with_figure=False
    )
    text = (out / "README.md").read_text()
    training = text.split("<!-- training -->", 1)[1].split("<!-- /training -->", 1)[0]
    assert "holds no `training_args.json`" in training
    assert "| 64 |" not in text and "29,000" not in text and "ResNet-101" not in text


EVALUATE_REPORT = {  # what scripts/evaluate_captions.py --output writes, abridged
    "model": "/home/someone/outputs/model",
    "dataset": "flickr30k",
    "split": "test",
    "num_images": 1000,
    "tokenization": "ptb",
    "results": SCORES,
    "predictions": {"beam_1": [{"image_id": "1", "caption": "a dog", "references": ["a dog runs"]}]},
    "settings": {"data_dir": "/home/someone/data"},
    "timings": {"generate_seconds_beam_1": 12.5},
}


def test_an_evaluation_report_normalises_to_percent():
    # (its card_results, what evaluate_captions.py --update-model-card renders, too: tests/test_evaluation.py)
    results = hub.normalize_eval_results(EVALUATE_REPORT)
    assert (results["dataset"], results["split"]) == ("Flickr30K", "test")
    assert [r["num_beams"] for r in results["results"]] == [1, 3]
    assert results["results"][1]["metrics"] == {
        "BLEU-1": 64.0,
        "BLEU-2": 43.0,
        "BLEU-3": 29.0,
        "BLEU-4": 19.5,
        "METEOR": 18.0,
        "CIDEr": 42.0,
    }


def test_reports_written_before_the_official_tokenisation_keep_what_they_were():
    legacy = {"tokenization": "coco-caption PTB (Java with METEOR, else the pure-Python equivalent)"}
    with_meteor = {**EVALUATE_REPORT, "settings": legacy}  # METEOR ran: so did the Java tokeniser
    assert hub.normalize_eval_results(with_meteor)["tokenization"] == "ptb"
    without_meteor = {**with_meteor, "results": {"beam_3": {"bleu_4": 0.19, "cider": 0.4}}}
    assert hub.normalize_eval_results(without_meteor)["tokenization"] == "approximate"
    assert hub.normalize_eval_results(EVALUATE_REPORT)["tokenization"] == "ptb"


def test_only_an_evaluation_report_is_read_and_junk_is_refused_in_one_line():
    # a report's own entries only: a local path is not shown, other keys and unknown scores are left out
    report = {
        **EVALUATE_REPORT,
        "dataset": "/home/someone/data/shapes",
        "results": {"beam_5": {"bleu_4": 0.5}},
    }
    results = hub.normalize_eval_results({**report, "loss": 2.3})
    assert results["dataset"] == "shapes"
    assert results["results"] == [{"num_beams": 5, "metrics": {"BLEU-4": 50.0}}]
    for junk, message in [
        (
            {"bleu_4": 0.191, "num_beams": 5},
            "not an evaluation report",
        ),  # scores without a report around them
        ({"results": [{"num_beams": 3, "metrics": {"bleu_4": 0.19}}]}, "not an evaluation report"),
        ({"results": {"beam_3": {"accuracy": 0.5}}}, "name none of"),
    ]:
        with pytest.raises(ValueError, match=message) as raised:
            hub.normalize_eval_results(junk)
        assert "\n" not in str(raised.value)


def test_card_with_results_has_a_model_index_and_a_results_table():
    config = ShowAttendTellConfig.tiny(vocab_size=40)
    text = hub.render_model_card(
        CARD.read_text(),
        repo_id="someone/sat-flickr30k",
        eval_results=EVALUATE_REPORT,
        config=config,
        num_parameters=123_456,
        generation={"num_beams": 3, "max_new_tokens": 51},
        figure="attention_example.png",
    )
    card = ModelCard(text)
    assert card.data.model_name == "sat-flickr30k"
    values = {
        (r.metric_name, (r.metric_args or {}).get("num_beams")): r.metric_value
        for r in card.data.eval_results
    }
    assert values[("BLEU-4", 3)] == 19.5 and values[("METEOR", 1)] == 17.0 and values[("CIDEr", 3)] == 42.0
    result = card.data.eval_results[0]
    assert (result.task_type, result.dataset_type, result.dataset_split) == (
        "image-to-text",
        "nlphuji/flickr30k",
        "test",
    )
    assert "| This model (Flickr30K test) | beam 3 | 64.00 | 43.00 | 29.00 | 19.50 | 18.00 | 42.00 |" in text
    assert "| 66.7 | 43.4 | 28.8 | 19.1 | 18.49 | – |" in text
    assert "![Where the model looked for each word of its caption](attention_example.png)" in text
    assert "| Vocabulary | 40 words" in text and "ResNet (depths [1, 1, 1, 1]" in text
    assert 'model="someone/sat-flickr30k"' in text and hub.REPO_ID_PLACEHOLDER not in text


# --- push_to_hub through the transformers API -----------------------------------------------------------


class FakeTransformersHub:
    """Stands in for the Hub behind transformers' `push_to_hub`: records the repository and every file."""

    def __init__(self) -> None:
        self.repos: list[tuple[str, bool | None]] = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        self.repos.append((repo_id, private))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:  # read now: transformers deletes its temporary folder afterwards
            self.files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    def create_branch(self, *args, **kwargs):
        return None


@pytest.fixture
def fake_hub(monkeypatch) -> FakeTransformersHub:
    fake = FakeTransformersHub()
    if hasattr(transformers_hub, "hf_api"):  # transformers 5.x: one shared HfApi
        monkeypatch.setattr(transformers_hub, "hf_api", lambda: fake)
    else:  # transformers 4.x: huggingface_hub's module-level functions
        monkeypatch.setattr(transformers_hub, "create_repo", fake.create_repo)
        monkeypatch.setattr(transformers_hub, "create_commit", fake.create_commit)
        monkeypatch.setattr(transformers_hub, "create_branch", fake.create_branch, raising=False)
    # It would read the existing card from the Hub; a new repository has none.
    monkeypatch.setattr(
        transformers_hub, "create_and_tag_model_card", lambda *args, **kwargs: ModelCard("---\n---\n")
    )
    return fake


@pytest.mark.compat
def test_push_to_hub_uploads_the_code_files_with_the_weights(fake_hub, tiny_model, processor, model_dir):
    tiny_model.push_to_hub("someone/sat", private=True)
    uploaded = set(fake_hub.files)
    assert fake_hub.repos[0] == ("someone/sat", True)
    assert {"model.safetensors", "config.json", "generation_config.json"} <= uploaded
    assert {"modeling_show_attend_tell.py", "configuration_show_attend_tell.py"} <= uploaded
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in uploaded)
    auto_map = json.loads(fake_hub.files["config.json"])["auto_map"]
    assert auto_map["AutoModel"] == "modeling_show_attend_tell.ShowAttendTellForConditionalGeneration"

    processor.push_to_hub("someone/sat")
    assert {"processing_show_attend_tell.py", "tokenization_show_attend_tell.py", "tokenizer.json"} <= set(
        fake_hub.files
    )
    assert "image_processing_show_attend_tell.py" in fake_hub.files

    # The pipeline, pushed the transformers way, adds its code file and declares itself in config.json.
    captioner = pipeline("image-to-text", model=str(model_dir), trust_remote_code=True)
    captioner.push_to_hub("someone/sat")
    assert "pipeline_show_attend_tell.py" in fake_hub.files
    declared = json.loads(fake_hub.files["config.json"])["custom_pipelines"]["image-to-text"]
    assert declared["impl"] == "pipeline_show_attend_tell.ShowAttendTellImageToTextPipeline"
    assert list(declared["pt"]) == ["AutoModel"]


# --- scripts/push_to_hub.py ---------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_writes_the_complete_repository_and_checks_that_it_loads(
    tmp_path, model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVALUATE_REPORT))
    out = tmp_path / "repository"
    argv = ["--model", str(model_dir), "--repo-id", "someone/sat", "--dry-run", str(out)]
    assert push_script.main([*argv, "--eval-results", str(results)]) == 0
    err = capsys.readouterr().err
    assert "loads without this package" in err and "nothing uploaded" in err

    files = files_of(out)
    expected = {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "README.md",
        "eval_results.json",
        hub.EXAMPLE_FIGURE_NAME,
        "configuration_show_attend_tell.py",
        "modeling_show_attend_tell.py",
        "tokenization_show_attend_tell.py",
        "image_processing_show_attend_tell.py",
        "processing_show_attend_tell.py",
        "pipeline_show_attend_tell.py",
    }
    assert expected <= set(files)
    assert not any(name.endswith(hub.PICKLE_WEIGHT_SUFFIXES) for name in files)
    assert not any(TOKEN.encode() in content for content in files.values())
    assert b"/home/someone" not in files["eval_results.json"]  # the scores, not the report's local paths
    assert json.loads(files["eval_results.json"]) == hub.normalize_eval_results(EVALUATE_REPORT)
    assert files[hub.EXAMPLE_FIGURE_NAME].startswith(b"\x89PNG")
    config = json.loads(files["config.json"])
    assert "image-to-text" in config["custom_pipelines"] and "AutoModel" in config["auto_map"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "image-to-text" and card.data.eval_results
    assert "](attention_example.png)" in card.text
    assert (
        "(ShowAttendTellForConditionalGeneration, ShowAttendTellImageToTextPipeline)" in err
    )  # the load check


class FakeHfApi:
    """Records `create_repo` and `upload_folder` as `huggingface_hub.HfApi` would receive them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return SimpleNamespace(repo_id=kwargs["repo_id"])

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.uploaded = files_of(Path(kwargs["folder_path"]))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/1")


def test_upload_creates_the_repository_and_uploads_the_checked_folder(
    tmp_path, model_dir, monkeypatch, capsys
):
    fake = FakeHfApi()
    monkeypatch.setattr(push_script, "make_api", lambda: fake)
    checked = []
    monkeypatch.setattr(hub, "check_folder_loads", lambda folder: checked.append(Path(folder)) or _report())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = ["--model", str(model_dir), "--repo-id", "someone/sat", "--private", "--no-figure"]
    assert push_script.main(argv) == 0
    assert [name for name, _ in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][1] == {
        "repo_id": "someone/sat",
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    upload = fake.calls[1][1]
    assert upload["repo_id"] == "someone/sat" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == checked[0]  # what was checked is what went up
    assert {"model.safetensors", "config.json", "README.md", "pipeline_show_attend_tell.py"} <= set(
        fake.uploaded
    )
    assert not any(TOKEN.encode() in content for content in fake.uploaded.values())
    assert "uploaded to someone/sat" in capsys.readouterr().err
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is gone


def _report() -> dict:
    return {"model_class": "M", "pipeline_class": "P", "caption": "c", "pipeline_caption": "c"}


@pytest.mark.slow
def test_a_folder_that_does_not_load_is_not_uploaded(tmp_path, model_dir, monkeypatch, capsys):
    fake = FakeHfApi()
    monkeypatch.setattr(push_script, "make_api", lambda: fake)
    assemble = hub.assemble_repository

    def assemble_then_break(model, output, **kwargs):
        folder = assemble(model, output, **kwargs)
        (folder / "modeling_show_attend_tell.py").write_text("raise ImportError('broken on purpose')\n")
        return folder

    monkeypatch.setattr(hub, "assemble_repository", assemble_then_break)
    status = push_script.main(["--model", str(model_dir), "--repo-id", "someone/sat", "--no-figure"])
    assert status == 1
    err = capsys.readouterr().err
    assert "refusing to upload a folder that does not load" in err and "broken on purpose" in err
    assert fake.calls == []


def test_no_token_stops_before_any_work(monkeypatch, model_dir, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit, match="no Hugging Face token found"):
        push_script.main(["--model", str(model_dir), "--repo-id", "someone/sat"])


def test_bad_arguments_are_refused(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit):
        push_script.main(["--model", str(model_dir), "--repo-id", "not a valid/id/at all"])
    assert "--repo-id" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text('{"accuracy": 1}')
    argv = ["--model", str(model_dir), "--repo-id", "a/b", "--dry-run", str(tmp_path / "o")]
    assert push_script.main([*argv, "--eval-results", str(tmp_path / "junk.json")]) == 2
    assert "not an evaluation report of scripts/evaluate_captions.py" in capsys.readouterr().err


# --- safe loading ---------------------------------------------------------------------------------------


class _RunsCodeWhenUnpickled:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def pickle_only_folder(tmp_path, model_dir) -> tuple[Path, Path]:
    """A model folder whose weights are only a pytorch_model.bin that runs code when unpickled."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "UNPICKLED"
    torch.save({"decoder.embedding.weight": _RunsCodeWhenUnpickled(marker)}, folder / "pytorch_model.bin")
    return folder, marker


@pytest.mark.compat
def test_a_pickle_only_folder_is_refused_and_never_unpickled(pickle_only_folder, capsys):
    folder, marker = pickle_only_folder
    with pytest.raises(hub.UnsafeWeightsError, match=r"no safetensors weights \(found pytorch_model.bin\)"):
        hub.load_model_and_processor(folder)
    # the ways a user loads the folder with transformers alone: refused too, and nothing unpickled
    with pytest.raises(OSError):
        AutoModel.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    with pytest.raises((OSError, ValueError, RuntimeError)):
        pipeline(
            "image-to-text", model=str(folder), trust_remote_code=True, model_kwargs={"use_safetensors": True}
        )
    if int(transformers.__version__.split(".")[0]) >= 5 or torch.__version__ >= "2.6":
        # without use_safetensors, transformers reads .bin files with torch.load(weights_only=True),
        # which refuses the object instead of calling it
        with pytest.raises(
            Exception, match=re.compile("weights_only|Unable to load weights|Weights only", re.I)
        ):
            AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert not marker.exists()
    argv = ["--model", str(folder), "--repo-id", "a/b", "--dry-run", str(folder.parent / "out")]
    assert push_script.main(argv) == 2
    assert "no safetensors weights" in capsys.readouterr().err
    assert not marker.exists()
