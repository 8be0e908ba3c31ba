"""`pipeline("image-to-text")` from a saved folder: in this process, and in a fresh one on both majors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import run_check_script
from PIL import Image
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from show_attend_tell.pipeline_show_attend_tell import PIPELINE_DECLARATION, words_and_attention
from show_attend_tell.saving import save_model_folder

pytestmark = pytest.mark.compat

COMPAT_OVERLAY = Path(__file__).parent.parent / ".venv-compat"
RUNNING_MAJOR = int(transformers.__version__.split(".")[0])


@pytest.fixture
def folder(tmp_path, tiny_model, processor):
    return save_model_folder(tmp_path / "model", tiny_model, processor)


@pytest.fixture
def pretrained_folder(tmp_path, tiny_model, processor) -> Path:
    """A folder written the plain transformers way: `model.save_pretrained` and `processor.save_pretrained`."""
    directory = tmp_path / "pretrained"
    tiny_model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture
def images(tmp_path) -> Path:
    """Two small pictures and a corrupt one."""
    directory = tmp_path / "images"
    directory.mkdir()
    generator = np.random.default_rng(3)
    Image.fromarray(generator.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(directory / "a.png")
    Image.fromarray(generator.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(directory / "b.jpg")
    (directory / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return directory


def reference_captions(model, processor, image_path: Path, **generate_kwargs) -> list[str]:
    inputs = processor(images=Image.open(image_path))
    with torch.no_grad():
        ids = model.generate(**inputs, **generate_kwargs)
    return processor.batch_decode(ids)


def test_saved_folder_declares_its_pipeline(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == PIPELINE_DECLARATION
    assert (folder / "pipeline_show_attend_tell.py").is_file()
    code = (folder / "pipeline_show_attend_tell.py").read_text()
    assert "show_attend_tell." not in code.replace("_show_attend_tell.", "")  # only sibling imports


def test_a_folder_saved_with_save_pretrained_serves_its_pipeline(
    pretrained_folder, tiny_model, processor, images
):
    config = json.loads((pretrained_folder / "config.json").read_text())
    assert config["custom_pipelines"] == PIPELINE_DECLARATION
    assert (pretrained_folder / "pipeline_show_attend_tell.py").is_file()  # copied with the model's code
    captioner = pipeline("image-to-text", model=str(pretrained_folder), trust_remote_code=True)
    assert type(captioner).__name__ == "ShowAttendTellImageToTextPipeline"
    expected = reference_captions(tiny_model, processor, images / "a.png", max_new_tokens=6)
    assert captioner(str(images / "a.png"), max_new_tokens=6) == [{"generated_text": expected[0]}]


def test_a_model_resaved_without_its_pipeline_code_drops_the_declaration(pretrained_folder, tmp_path):
    """
    A model loaded from a folder's code (as where the package is not installed) has only the files that
    loading the model needs; when the folder it came from lacks the pipeline's code too, the folder it is
    saved to must not declare a pipeline whose code it lacks.
    """
    (pretrained_folder / "pipeline_show_attend_tell.py").unlink()
    remote_class = get_class_from_dynamic_module(
        "modeling_show_attend_tell.ShowAttendTellForConditionalGeneration", pretrained_folder
    )
    remote_class.register_for_auto_class("AutoModel")  # what AutoModel does for a folder's code
    code_dir = Path(sys.modules[remote_class.__module__].__file__).parent
    (code_dir / "pipeline_show_attend_tell.py").unlink(missing_ok=True)  # left by an earlier pipeline load
    model = remote_class.from_pretrained(pretrained_folder)
    assert model.config.custom_pipelines == PIPELINE_DECLARATION  # read from the folder's config.json
    model.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "image-to-text" not in config.get("custom_pipelines", {})
    assert not (tmp_path / "resaved" / "pipeline_show_attend_tell.py").exists()
    assert type(remote_class.from_pretrained(tmp_path / "resaved")).__name__ == remote_class.__name__


def test_pipeline_captions_like_generate(folder, tiny_model, processor, images):
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    assert type(captioner).__name__ == "ShowAttendTellImageToTextPipeline"
    a, b = images / "a.png", images / "b.jpg"
    expected_a = reference_captions(tiny_model, processor, a, max_new_tokens=6)
    expected_b = reference_captions(tiny_model, processor, b, max_new_tokens=6)

    assert captioner(str(a), max_new_tokens=6) == [{"generated_text": expected_a[0]}]
    assert captioner(Image.open(b), max_new_tokens=6) == [{"generated_text": expected_b[0]}]
    batched = captioner([str(a), str(b), Image.open(a)], batch_size=2, max_new_tokens=6)
    assert batched == [[{"generated_text": t}] for t in (expected_a[0], expected_b[0], expected_a[0])]


def test_pipeline_returns_one_list_per_image_with_several_sequences(folder, tiny_model, processor, images):
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6}
    outputs = captioner([str(images / "a.png"), str(images / "b.jpg")], batch_size=2, generate_kwargs=kwargs)
    assert [len(per_image) for per_image in outputs] == [2, 2]
    for per_image, name in zip(outputs, ("a.png", "b.jpg"), strict=True):
        expected = reference_captions(tiny_model, processor, images / name, **kwargs)
        assert [record["generated_text"] for record in per_image] == expected
    with pytest.raises(ValueError, match="both directly and in `generate_kwargs`"):
        captioner(str(images / "a.png"), max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})


def test_pipeline_returns_attention_maps_aligned_with_words(folder, tiny_model, processor, images):
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    record = captioner(str(images / "a.png"), return_attention=True, num_beams=2, max_new_tokens=6)[0]
    inputs = processor(images=Image.open(images / "a.png"))
    with torch.no_grad():
        outputs = tiny_model.generate(
            **inputs, num_beams=2, max_new_tokens=6, output_attentions=True, return_dict_in_generate=True
        )
    words, maps = words_and_attention(outputs.sequences[0], outputs.attention_maps[0], processor.tokenizer)
    assert record["words"] == words and len(words) > 0
    assert record["attention"].shape == (len(words), tiny_model.config.num_pixels)
    np.testing.assert_allclose(record["attention"], maps, atol=1e-6)
    np.testing.assert_allclose(record["attention"].sum(axis=1), 1.0, atol=1e-5)  # distributions over the grid
    assert record["generated_text"] == processor.batch_decode(outputs.sequences)[0]


def test_words_and_attention_stop_at_end_and_keep_unknown_words(tokenizer):
    ids = [tokenizer.bos_token_id, 5, tokenizer.unk_token_id, 6, tokenizer.eos_token_id, 0, 0]
    maps = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    words, rows = words_and_attention(torch.tensor(ids), maps, tokenizer)
    assert words == [tokenizer.convert_ids_to_tokens(5), "<unk>", tokenizer.convert_ids_to_tokens(6)]
    np.testing.assert_array_equal(rows, maps[:3].numpy())  # step t produced token t + 1


def test_pipeline_names_a_bad_file_in_one_line(folder, images):
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    with pytest.raises(ValueError) as caught:
        captioner(str(images / "bad.jpg"))
    message = str(caught.value)
    assert str(images / "bad.jpg") in message and "\n" not in message
    assert "corrupt" in message or "not an image" in message


# --- a fresh process without the package, both majors, URLs from a local server -----------------------


def _overlay_for(loader: str) -> str | None:
    """The PYTHONPATH for the child: this process's (made absolute: the child runs elsewhere), or the other major's."""
    if loader == "same major":
        entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
        return os.pathsep.join(str(Path(e).resolve()) for e in entries) or None
    if RUNNING_MAJOR >= 5:
        if not (COMPAT_OVERLAY / "transformers").is_dir():
            pytest.skip("transformers 4.x overlay missing: run `make test` or `make test-compat`")
        return str(COMPAT_OVERLAY)
    return None  # running on 4.x: the other major is the base .venv


@pytest.mark.slow
@pytest.mark.parametrize(
    "loader, saved_by",
    [
        ("same major", "save_model_folder"),
        ("other major", "save_model_folder"),
        ("same major", "save_pretrained"),
    ],
)
def test_fresh_process_pipeline_on_both_majors(
    loader, saved_by, folder, pretrained_folder, tiny_model, processor, images, tmp_path
):
    overlay = _overlay_for(loader)
    model_folder = folder if saved_by == "save_model_folder" else pretrained_folder
    result = run_check_script("pipeline_remote_check.py", [model_folder, images], tmp_path, overlay)

    expected_major = RUNNING_MAJOR if loader == "same major" else (4 if RUNNING_MAJOR >= 5 else 5)
    assert int(result["transformers"].split(".")[0]) == expected_major
    assert result["pipeline_class"] == "ShowAttendTellImageToTextPipeline"
    assert result["pipeline_module"].startswith("transformers_modules")  # the folder's own code
    assert result["model_module"].startswith("transformers_modules")

    a = reference_captions(tiny_model, processor, images / "a.png", max_new_tokens=6)[0]
    b = reference_captions(tiny_model, processor, images / "b.jpg", max_new_tokens=6)[0]
    assert result["path"] == [{"generated_text": a}]
    assert result["url"] == [{"generated_text": a}]
    assert result["pil"] == [{"generated_text": b}]
    assert result["list_batched"] == [[a], [b], [a]]
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6}
    assert result["beams"] == [
        reference_captions(tiny_model, processor, images / name, **kwargs) for name in ("a.png", "b.jpg")
    ]
    attention = result["attention"]
    assert attention["shape"] == [len(attention["words"]), tiny_model.config.num_pixels]
    np.testing.assert_allclose(attention["row_sums"], 1.0, atol=1e-5)
    assert "HTTP error 404" in result["errors"]["missing_url"]
    assert "bad.jpg" in result["errors"]["bad_file"] and "\n" not in result["errors"]["bad_file"]
