"""A saved folder loads anywhere: in-process, and in a fresh process without this package, on both majors; a broken
folder is refused with one line naming the file; the folder's code runs only with trust_remote_code."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import load_script, run_check_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModel

from show_attend_tell import hub
from show_attend_tell.saving import save_model_folder

REPO = Path(__file__).parent.parent
# `make test` and `make test-compat` build an overlay with transformers 4.57 in .venv-compat
COMPAT_OVERLAY = REPO / ".venv-compat"
RUNNING_MAJOR = int(transformers.__version__.split(".")[0])


@pytest.fixture
def saved_folder(tmp_path, tiny_model, processor):
    return save_model_folder(tmp_path / "model", tiny_model, processor)


@pytest.mark.compat
def test_folder_contents(saved_folder):
    names = {path.name for path in saved_folder.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "configuration_show_attend_tell.py",
        "modeling_show_attend_tell.py",
        "cache_show_attend_tell.py",
        "tokenization_show_attend_tell.py",
        "image_processing_show_attend_tell.py",
        "processing_show_attend_tell.py",
    }
    assert expected <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    auto_map = json.loads((saved_folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_show_attend_tell.ShowAttendTellForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_show_attend_tell.ShowAttendTellConfig"
    # no code file imports the package by its absolute name: users have only the folder
    for code_file in saved_folder.glob("*_show_attend_tell.py"):
        assert "show_attend_tell." not in code_file.read_text().replace("_show_attend_tell.", "")


@pytest.mark.compat
def test_in_process_round_trip_gives_the_same_captions(saved_folder, tiny_model, processor, sample_image):
    loaded = AutoModel.from_pretrained(saved_folder, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "ShowAttendTellForConditionalGeneration"
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = processor(images=sample_image)
    assert torch.equal(
        loaded.generate(**inputs, max_new_tokens=6), tiny_model.generate(**inputs, max_new_tokens=6)
    )
    assert loaded.generation_config.num_beams == 3


@pytest.mark.compat
def test_saving_replaces_an_existing_folder_atomically(saved_folder, tiny_model, processor):
    (saved_folder / "stale.txt").write_text("old")
    save_model_folder(saved_folder, tiny_model, processor, extra_files={"notes/README.md": "hello"})
    assert not (saved_folder / "stale.txt").exists()
    assert (saved_folder / "notes" / "README.md").read_text() == "hello"
    leftovers = [p.name for p in saved_folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _other_major_overlay() -> Path | None:
    """PYTHONPATH value that gives the other transformers major (None: the base .venv, i.e. 5.x)."""
    if RUNNING_MAJOR >= 5:
        if not (COMPAT_OVERLAY / "transformers").is_dir():
            pytest.skip("transformers 4.x overlay missing: run `make test` or `make test-compat`")
        return COMPAT_OVERLAY
    return None


@pytest.mark.compat
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["same major", "other major"])
def test_fresh_process_without_the_package_loads_and_captions(
    loader, saved_folder, tiny_model, processor, sample_image, tmp_path
):
    image_path = tmp_path / "image.png"
    sample_image.save(image_path)
    if loader == "same major":
        paths = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
        overlay = Path(paths[0]).resolve() if paths else None
    else:
        overlay = _other_major_overlay()
    result = run_check_script("remote_load_check.py", [saved_folder, image_path], tmp_path, overlay)

    assert result["package_importable"] is False
    assert result["model_module"].startswith("transformers_modules")  # the folder's own code
    assert result["config_class"] == "ShowAttendTellConfig"
    assert result["model_class"] == "ShowAttendTellForConditionalGeneration"
    assert result["tokenizer_class"] == "ShowAttendTellTokenizer"
    assert result["image_processor_class"] == "ShowAttendTellImageProcessor"
    assert result["processor_class"] == "ShowAttendTellProcessor"
    assert result["vocab"] == processor.tokenizer.get_vocab()

    inputs = processor(images=sample_image)
    torch.testing.assert_close(torch.tensor(result["pixel_values"]), inputs["pixel_values"].flatten()[:50])
    assert result["greedy_ids"] == tiny_model.generate(**inputs, num_beams=1, max_new_tokens=8).tolist()
    beam = tiny_model.generate(**inputs, num_beams=3, max_new_tokens=8)
    assert result["beam_ids"] == beam.tolist()
    assert result["caption"] == processor.batch_decode(beam)[0]


# --- broken model folders: one line naming the file, never a traceback -------------------------------


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory) -> Path:
    """A good model folder, built once per module; the tests below copy it and break one file each."""
    from conftest import CAPTIONS, sharpened_tiny_model

    from show_attend_tell import (
        ShowAttendTellImageProcessor,
        ShowAttendTellProcessor,
        ShowAttendTellTokenizer,
    )

    tokenizer = ShowAttendTellTokenizer.train_from_captions(CAPTIONS, min_freq=5)
    processor = ShowAttendTellProcessor(ShowAttendTellImageProcessor(size=64), tokenizer)
    return save_model_folder(
        tmp_path_factory.mktemp("clean") / "model", sharpened_tiny_model(len(tokenizer)), processor
    )


def broken_copy(clean: Path, where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(clean, where)
    return where


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Rewrites a JSON file after `change` edited its data in place."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def assert_refused(folder: Path, file_name: str, *phrases: str, error: type = hub.ModelLoadError) -> str:
    """Loading `folder` raises `error` with one line that names `folder/file_name` and says `phrases`."""
    with pytest.raises(error) as caught:
        hub.load_model_and_processor(folder)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert str(folder / file_name) in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def _safetensors_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def _drop_a_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["decoder.output_layer.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["decoder.output_layer.bias"][3] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _tokens(vocab_filter: Callable[[str, int], bool]) -> Callable[[Any], None]:
    def change(data: Any) -> None:
        data["model"]["vocab"] = {w: i for w, i in data["model"]["vocab"].items() if vocab_filter(w, i)}

    return change


def _more_words(data: Any) -> None:
    vocab = data["model"]["vocab"]
    vocab["zebra"] = len(vocab)


def _set(field: str, value: Any) -> Callable[[Any], None]:
    def change(data: Any) -> None:
        data[field] = value

    return change


def _encoder_widths(data: Any) -> None:
    data["encoder_config"]["hidden_sizes"][-1] = 48


# (name, how to break the folder, the file the message names, phrases it must hold)
CORRUPTIONS: list[tuple[str, Callable[[Path], None], str, tuple[str, ...]]] = [
    # weights
    (
        "empty weights",
        lambda f: (f / "model.safetensors").write_bytes(b""),
        "model.safetensors",
        ("truncated",),
    ),
    (
        "weights not safetensors",
        lambda f: (f / "model.safetensors").write_bytes(b"PK\x03\x04" * 50),
        "model.safetensors",
        ("not a readable safetensors",),
    ),
    (
        "weights with bytes appended",
        lambda f: (f / "model.safetensors").write_bytes(_safetensors_bytes(f) + b"\0" * 64),
        "model.safetensors",
        ("corrupt",),
    ),
    ("a weight missing", _drop_a_weight, "model.safetensors", ("lacks weights", "decoder.output_layer.bias")),
    ("a NaN weight", _nan_weight, "model.safetensors", ("NaN",)),
    ("no weights at all", lambda f: (f / "model.safetensors").unlink(), "", ("no safetensors weights",)),
    # config.json: types, values, shapes
    (
        "config not JSON",
        lambda f: (f / "config.json").write_text('{"vocab_size": 20,'),
        "config.json",
        ("not valid JSON",),
    ),
    ("config a list", lambda f: (f / "config.json").write_text("[]"), "config.json", ("not a JSON object",)),
    (
        "decoder_dim a string",
        lambda f: edit_json(f / "config.json", _set("decoder_dim", "abc")),
        "config.json",
        ("decoder_dim", "'abc'"),
    ),
    (
        "embed_dim a float",
        lambda f: edit_json(f / "config.json", _set("embed_dim", 16.5)),
        "config.json",
        ("embed_dim",),
    ),
    (
        "attention_dim true",
        lambda f: edit_json(f / "config.json", _set("attention_dim", True)),
        "config.json",
        ("attention_dim",),
    ),
    (
        "vocab_size null",
        lambda f: edit_json(f / "config.json", _set("vocab_size", None)),
        "config.json",
        ("vocab_size",),
    ),
    (
        "encoded_image_size 0",
        lambda f: edit_json(f / "config.json", _set("encoded_image_size", 0)),
        "config.json",
        ("encoded_image_size",),
    ),
    (
        "dropout a string",
        lambda f: edit_json(f / "config.json", _set("dropout", "high")),
        "config.json",
        ("dropout",),
    ),
    (
        "pad id out of range",
        lambda f: edit_json(f / "config.json", _set("pad_token_id", 999)),
        "config.json",
        ("pad_token_id",),
    ),
    (
        "decoder_dim another size",
        lambda f: edit_json(f / "config.json", _set("decoder_dim", 32)),
        "config.json",
        ("shape", "model.safetensors"),
    ),
    (
        "encoder widths changed",
        lambda f: edit_json(f / "config.json", _encoder_widths),
        "config.json",
        ("shape",),
    ),
    (
        "encoder_config wrong type",
        lambda f: edit_json(f / "config.json", _set("encoder_config", {"hidden_sizes": "wide"})),
        "config.json",
        (),
    ),
    (
        "another model type",
        lambda f: edit_json(f / "config.json", _set("model_type", "bert")),
        "config.json",
        ("model_type",),
    ),
    ("no config", lambda f: (f / "config.json").unlink(), "", ("no config.json",)),
    # tokenizer.json: structure and vocabulary
    (
        "tokenizer without added_tokens",
        lambda f: edit_json(f / "tokenizer.json", lambda d: d.pop("added_tokens")),
        "tokenizer.json",
        (),
    ),
    (
        "tokenizer model empty",
        lambda f: (f / "tokenizer.json").write_text('{"model": {}, "added_tokens": []}'),
        "tokenizer.json",
        ("not a tokenizer file",),
    ),
    (
        "tokenizer a list",
        lambda f: (f / "tokenizer.json").write_text("[1, 2]"),
        "tokenizer.json",
        ("not a tokenizer file",),
    ),
    (
        "tokenizer not JSON",
        lambda f: (f / "tokenizer.json").write_text("<html>"),
        "tokenizer.json",
        ("not valid JSON",),
    ),
    (
        "tokenizer ids strings",
        lambda f: edit_json(f / "tokenizer.json", lambda d: d["model"]["vocab"].update(red="x")),
        "tokenizer.json",
        ("not a tokenizer file",),
    ),
    (
        "tokenizer added_tokens a dict",
        lambda f: edit_json(f / "tokenizer.json", _set("added_tokens", {})),
        "tokenizer.json",
        ("added_tokens",),
    ),
    (
        "empty vocabulary",
        lambda f: edit_json(f / "tokenizer.json", _tokens(lambda w, i: i < 4)),
        "tokenizer.json",
        ("no words",),
    ),
    (
        "no vocabulary at all",
        lambda f: edit_json(
            f / "tokenizer.json", lambda d: (d["model"].update(vocab={}), d.update(added_tokens=[]))
        ),
        "tokenizer.json",
        ("lacks the special tokens",),
    ),
    (
        "vocabulary of another model",
        lambda f: edit_json(f / "tokenizer.json", _more_words),
        "tokenizer.json",
        ("different models",),
    ),
    ("no tokenizer", lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json", ("missing",)),
    (
        "preprocessor config not JSON",
        lambda f: (f / "preprocessor_config.json").write_text("{'size': 64}"),
        "preprocessor_config.json",
        ("not valid JSON",),
    ),
]


@pytest.mark.compat
@pytest.mark.parametrize("name, corrupt, file_name, phrases", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_broken_model_folder_is_refused_with_one_line_naming_the_file(
    name, corrupt, file_name, phrases, clean_folder, tmp_path
):
    folder = broken_copy(clean_folder, tmp_path / "model")
    corrupt(folder)
    assert_refused(folder, file_name, *phrases)


@pytest.mark.compat
def test_the_clean_folder_loads(clean_folder):
    model, processor = hub.load_model_and_processor(clean_folder)
    assert type(model).__module__ == "show_attend_tell.modeling_show_attend_tell"
    assert len(processor.tokenizer) == model.config.vocab_size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_weights_cut_anywhere_or_replaced_by_random_bytes_are_refused(data, clean_folder, tmp_path):
    folder = broken_copy(clean_folder, tmp_path / "model")
    original = _safetensors_bytes(folder)
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(original) - 1), label="cut at")
        (folder / "model.safetensors").write_bytes(original[:cut])
    else:
        junk = data.draw(st.binary(min_size=0, max_size=4096), label="random bytes")
        (folder / "model.safetensors").write_bytes(junk)
    assert_refused(folder, "model.safetensors", "not a readable safetensors file")


SIZE_FIELDS = ["vocab_size", "embed_dim", "attention_dim", "decoder_dim", "encoded_image_size"]
NOT_A_SIZE = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x) or x < 1),
    st.integers(max_value=0),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(SIZE_FIELDS), value=NOT_A_SIZE)
def test_a_config_size_of_the_wrong_type_is_refused(field, value, clean_folder, tmp_path):
    folder = broken_copy(clean_folder, tmp_path / "model")
    edit_json(folder / "config.json", _set(field, value))
    assert_refused(folder, "config.json")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(SIZE_FIELDS[1:]), value=st.integers(1, 64))
def test_a_config_size_that_does_not_fit_the_weights_is_refused(field, value, clean_folder, tmp_path):
    folder = broken_copy(clean_folder, tmp_path / "model")
    stored = json.loads((folder / "config.json").read_text())[field]
    edit_json(folder / "config.json", _set(field, value))
    if value == stored:
        hub.load_model_and_processor(folder)  # unchanged: loads
    elif field == "encoded_image_size":
        hub.load_model_and_processor(folder)  # the pooled grid's size holds no weights: any size loads
    else:
        assert_refused(folder, "config.json", "shape")


class _RunsCodeWhenUnpickled:
    """Unpickling this creates the file `marker`: proof that a pickle was read."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.compat
@pytest.mark.parametrize("keep_safetensors_shard", [False, True])
def test_a_sharded_index_naming_a_pickle_is_refused_before_any_torch_load(
    keep_safetensors_shard, clean_folder, tmp_path, monkeypatch
):
    folder = broken_copy(clean_folder, tmp_path / "model")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, folder / "model-00001-of-00002.safetensors")
    marker = tmp_path / "UNPICKLED"
    torch.save({n: _RunsCodeWhenUnpickled(marker) for n in names[half:]}, folder / "model-00002-of-00002.bin")
    weight_map = {n: "model-00002-of-00002.bin" for n in names[half:]}
    if keep_safetensors_shard:
        weight_map.update({n: "model-00001-of-00002.safetensors" for n in names[:half]})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    assert_refused(
        folder, "model.safetensors.index.json", "model-00002-of-00002.bin", error=hub.UnsafeWeightsError
    )
    assert loads == [] and not marker.exists()


@pytest.mark.compat
def test_a_sharded_index_naming_a_missing_shard_is_refused(clean_folder, tmp_path):
    folder = broken_copy(clean_folder, tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"decoder.output_layer.bias": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_refused(folder, "model-00002-of-00002.safetensors", "missing")


# --- one way to load: the folder's code runs only when asked for -------------------------------------

CODE_FILES = [
    "configuration_show_attend_tell",
    "modeling_show_attend_tell",
    "cache_show_attend_tell",
    "tokenization_show_attend_tell",
    "image_processing_show_attend_tell",
    "processing_show_attend_tell",
]


def folder_with_marked_code(clean: Path, where: Path) -> tuple[Path, Path]:
    """A model folder whose code files each create a file in `where/marks/` when they are imported."""
    # a folder name of its own: transformers 4.x names the imported code after the folder, and reuses it
    folder = broken_copy(clean, where / f"model-{uuid.uuid4().hex[:8]}")
    marks = where / "marks"
    marks.mkdir()
    for name in CODE_FILES:
        path = folder / f"{name}.py"
        # the marks folder's path makes each folder's code unique, so transformers imports it afresh
        path.write_text(
            path.read_text() + f"\nimport pathlib as _mark\n_mark.Path({str(marks)!r}, {name!r}).touch()\n"
        )
    return folder, marks


def ran(marks: Path) -> list[str]:
    return sorted(path.name for path in marks.iterdir())


@pytest.mark.compat
def test_the_folders_code_runs_only_with_trust_remote_code(clean_folder, tmp_path, sample_image):
    folder, marks = folder_with_marked_code(clean_folder, tmp_path)
    model, processor = hub.load_model_and_processor(folder)
    assert ran(marks) == []
    assert type(model).__module__ == "show_attend_tell.modeling_show_attend_tell"
    assert type(processor.tokenizer).__module__ == "show_attend_tell.tokenization_show_attend_tell"

    remote, remote_processor = hub.load_model_and_processor(folder, trust_remote_code=True)
    assert ran(marks) == sorted(CODE_FILES)  # every code file of the folder ran
    for part in (remote, remote_processor, remote_processor.tokenizer, remote_processor.image_processor):
        assert type(part).__module__.startswith("transformers_modules"), type(part)
    # the same model either way
    inputs = processor(images=sample_image)
    assert torch.equal(
        model.generate(**inputs, max_new_tokens=6),
        remote.generate(**remote_processor(images=sample_image), max_new_tokens=6),
    )


def synthetic_data_options(tmp_path: Path) -> list[str]:
    """evaluate_captions.py's options for a small synthetic split, cached under `tmp_path`."""
    return [
        "--dataset",
        "synthetic",
        "--cache-dir",
        str(tmp_path / "data"),
        "--dataset-option",
        "image_size=32",
    ]


def test_scripts_run_the_folders_code_only_with_trust_remote_code(
    clean_folder, sample_image, tmp_path, capsys
):
    from show_attend_tell.serve import Captioner

    image = tmp_path / "picture.png"
    sample_image.save(image)
    caption = load_script("caption")
    evaluate = load_script("evaluate_captions")
    search_images = load_script("search_images")
    data = synthetic_data_options(tmp_path)
    data += ["--max-samples", "2", "--no-progress", "--num-workers", "0", "--num-beams", "1"]
    data += ["--max-new-tokens", "4", "--device", "cpu", "--metrics", "bleu"]

    def run_all(folder: Path, *flag: str) -> str:
        argv = ["--model", str(folder), str(image), "--max-new-tokens", "4", "--no-progress", *flag]
        capsys.readouterr()
        assert caption.main(argv) == 0
        captions = capsys.readouterr().out
        assert evaluate.main(["--model", str(folder), *data, *flag]) == 0
        Captioner.from_pretrained(str(folder), device="cpu", trust_remote_code=bool(flag))
        index = ["build", "--index", str(folder.parent / "index"), "--model", str(folder), str(image)]
        index += ["--num-beams", "2", "--num-return-sequences", "2", "--max-new-tokens", "4", "--no-progress"]
        assert search_images.main([*index, *flag]) == 0
        return captions

    folder, marks = folder_with_marked_code(clean_folder, tmp_path / "without")
    plain = run_all(folder)
    assert ran(marks) == []  # before: evaluate_captions.py ran the folder's code files without being asked
    # each script on a folder of its own: a process imports a folder's code files once
    folder, marks = folder_with_marked_code(clean_folder, tmp_path / "with")
    assert run_all(folder, "--trust-remote-code") == plain  # the same captions from the folder's code
    assert ran(marks) == sorted(CODE_FILES)


SCRIPT_CORRUPTIONS = {
    "truncated weights": (
        lambda f: (f / "model.safetensors").write_bytes(_safetensors_bytes(f)[:5000]),
        "model.safetensors",
    ),
    "decoder_dim a string": (
        lambda f: edit_json(f / "config.json", _set("decoder_dim", "abc")),
        "config.json",
    ),
    "tokenizer without added_tokens": (
        lambda f: edit_json(f / "tokenizer.json", lambda d: d.pop("added_tokens")),
        "tokenizer.json",
    ),
    "empty vocabulary": (
        lambda f: edit_json(f / "tokenizer.json", _tokens(lambda w, i: i < 4)),
        "tokenizer.json",
    ),
}


@pytest.mark.parametrize("corruption", sorted(SCRIPT_CORRUPTIONS))
def test_each_script_says_in_one_line_which_file_is_broken(corruption, clean_folder, tmp_path, capsys):
    from show_attend_tell import serve

    corrupt, file_name = SCRIPT_CORRUPTIONS[corruption]
    folder = broken_copy(clean_folder, tmp_path / "model")
    corrupt(folder)
    image = tmp_path / "picture.png"
    image.write_bytes(b"")  # never read: the model is refused first
    evaluate = load_script("evaluate_captions")
    search_images = load_script("search_images")
    push_to_hub = load_script("push_to_hub")
    data = synthetic_data_options(tmp_path)
    runs = {
        "caption.py": lambda flag: load_script("caption").main(["--model", str(folder), str(image), *flag]),
        "evaluate_captions.py": lambda flag: evaluate.main(
            ["--model", str(folder), *data, "--max-samples", "1", *flag]
        ),
        "serve": lambda flag: serve.main(["--model", str(folder), *flag]),
        "app.py": lambda flag: load_script("app").main(["--model", str(folder), "--device", "cpu", *flag]),
        "search_images.py build": lambda flag: search_images.main(
            ["build", "--index", str(tmp_path / "index"), "--model", str(folder), str(image), *flag]
        ),
        # push_to_hub.py has no --trust-remote-code: it copies the folder's code files without running them
        "push_to_hub.py": lambda flag: push_to_hub.main(
            ["--model", str(folder), "--repo-id", "me/sat", "--dry-run", str(tmp_path / "hub")]
        ),
    }
    for name, run in runs.items():
        for flag in ([], ["--trust-remote-code"]) if name != "push_to_hub.py" else ([],):
            capsys.readouterr()
            assert run(flag) == 2, (name, flag)
            errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(errors) == 1 and "Traceback" not in errors[0], (name, flag, errors)
            assert str(folder / file_name) in errors[0], (name, flag, errors)


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` as huggingface_hub's cache holds a downloaded repository (what an offline machine has)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.mark.compat
def test_a_hub_repository_is_checked_like_a_folder(clean_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(cache, "someone/sat", clean_folder)
    model, processor = hub.load_model_and_processor("someone/sat")
    assert len(processor.tokenizer) == model.config.vocab_size

    broken = broken_copy(clean_folder, tmp_path / "broken")
    edit_json(broken / "tokenizer.json", _tokens(lambda word, index: index < 4))
    _fake_hub_cache(cache, "someone/empty-vocabulary", broken)
    with pytest.raises(
        hub.ModelLoadError, match=r"snapshots/\w+/tokenizer.json: the vocabulary holds no words"
    ):
        hub.load_model_and_processor("someone/empty-vocabulary")

    with pytest.raises(
        hub.ModelLoadError, match=r"^someone/absent: no such folder, and the Hub repository"
    ) as caught:
        hub.load_model_and_processor("someone/absent")
    assert "\n" not in str(caught.value)
    with pytest.raises(hub.ModelLoadError, match=r"no such model folder$"):
        hub.load_model_and_processor(tmp_path / "no" / "such" / "folder")
