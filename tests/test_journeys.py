"""User journeys: every public entry point, used as a user would, on many varied pictures.

One small model is trained for a few seconds on the embedded synthetic shapes with scripts/train.py (the
package's own training, in this process), so that its captions end at different lengths, and saved as a
complete model folder. About 60 pictures (synthetic shapes, random noise of odd sizes and aspect ratios,
RGBA, grayscale, 16-bit, palette, CMYK, 1 x 1, very wide and very tall) then go through `generate()`,
`pipeline("image-to-text")`, scripts/caption.py, the HTTP API, the web demo's handlers,
scripts/push_to_hub.py, scripts/evaluate_captions.py and scripts/search_images.py at beams 1, 3 and 5, and every
result is compared with what `generate()` gives that picture alone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import load_script, reset_accelerate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

from show_attend_tell.data import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
BEAMS = (1, 3, 5)
#: Longer than any caption the model writes (19 tokens at most, measured), so every caption ends at <end>.
MAX_NEW_TOKENS = 24
#: Training that gives captions of 4 to 17 words (the synthetic captions name one or two shapes).
TRAIN_OPTIONS = (
    "--dataset synthetic --dataset-option num_train=200 --dataset-option num_validation=8 "
    "--dataset-option num_test=0 --dataset-option image_size=32 --model-size tiny --seed 7 --min-word-freq 1 "
    "--batch-size 32 --captions-per-image 4 --decoder-lr 5e-3 --epochs 12 --max-val-samples 0 "
    "--num-workers 0 --report-to none --log-steps 1000 --checkpoint-steps 0"
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


# ==================================================================================================
# The model and the pictures
# ==================================================================================================


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("journeys")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    """A complete model folder written by scripts/train.py after about 15 s of training."""
    options = [*TRAIN_OPTIONS.split(), "--dataset-cache-dir", str(workdir / "data")]
    options += ["--output-dir", str(workdir / "run")]
    try:
        assert load_script("train").main(options) == 0
    finally:
        reset_accelerate()
    folder = workdir / "run" / "model"
    names = {path.name for path in folder.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "processor_config.json",
        "modeling_show_attend_tell.py",
        "pipeline_show_attend_tell.py",
    } <= names
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)


def random_picture(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    """Noise with a few flat blocks (so that neighbouring pixels agree sometimes), in `mode`."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, height), rng.integers(0, width)
        pixels[top : top + height // 2 + 1, left : left + width // 2 + 1] = rng.integers(0, 256, 3)
    picture = Image.fromarray(pixels)
    if mode == "I;16":
        wide = pixels.mean(axis=2).astype(np.uint16) * 257  # the full 16-bit range
        return Image.fromarray(wide)  # uint16: mode I;16
    if mode == "RGBA":
        picture.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return picture
    if mode == "P":
        return picture.quantize(colors=16)
    return picture.convert(mode)


@pytest.fixture(scope="module")
def pictures(workdir) -> list[Path]:
    """60 picture files: 24 synthetic shape pictures and 36 random ones of every size, shape and mode."""
    folder = workdir / "pictures"
    folder.mkdir()
    paths = []
    shapes = make_synthetic_dataset(num_train=0, num_validation=0, num_test=24, image_size=32, seed=11)
    for index, image in enumerate(shapes["test"]["image"]):
        paths.append(folder / f"shapes_{index:02d}.png")
        image.save(paths[-1])
    rng = np.random.default_rng(17)
    sizes = [(1, 1), (2, 3), (1, 300), (300, 1), (640, 8), (7, 500), (64, 64), (33, 17), (256, 256)]
    modes = ["RGB", "RGBA", "L", "I;16", "P", "LA", "CMYK", "1"]
    for index in range(36):
        width, height = sizes[index] if index < len(sizes) else rng.integers(1, 200, 2)
        mode = modes[index % len(modes)]
        picture = random_picture(rng, int(width), int(height), mode)
        suffix = ".jpg" if mode == "CMYK" else ".png"
        paths.append(folder / f"random_{index:02d}_{mode.replace(';', '')}_{width}x{height}{suffix}")
        picture.save(paths[-1])
    return paths


def generate_alone(model, processor, image: Image.Image, num_beams: int, **options) -> Any:
    """What the README's `generate()` call gives one picture by itself."""
    inputs = processor(images=image, return_tensors="pt")
    options.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    with torch.no_grad():
        return model.generate(**inputs, num_beams=num_beams, **options)


def strip(ids: torch.Tensor, processor) -> list[int]:
    """A returned row up to and including its <end> (rows of a batch are padded to the longest)."""
    ids = ids.tolist()
    end = processor.tokenizer.eos_token_id
    return ids[: ids.index(end) + 1] if end in ids else ids


@pytest.fixture(scope="module")
def expected(model, processor, pictures) -> dict[int, list[list[int]]]:
    """For each beam size, the ids `generate()` gives each picture alone (opened with PIL, as in the README)."""
    return {
        beams: [strip(generate_alone(model, processor, Image.open(p), beams)[0], processor) for p in pictures]
        for beams in BEAMS
    }


def varied(expected_ids: list[list[int]], count: int) -> list[int]:
    """
    Indices of `count` pictures for the slower journeys: one per caption length, longest first (the captions
    that end last are those whose beam search runs longest), then the rest in order.
    """
    by_length: dict[int, int] = {}
    for index, ids in enumerate(expected_ids):
        by_length.setdefault(len(ids), index)
    chosen = [by_length[length] for length in sorted(by_length, reverse=True)]
    chosen += [index for index in range(len(expected_ids)) if index not in chosen]
    return chosen[:count]


def texts(expected_ids: list[list[int]], processor) -> list[str]:
    return [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in expected_ids]


def test_the_trained_model_writes_captions_of_varied_lengths(expected, pictures):
    """Otherwise the journeys would not exercise beam search that runs past its winners' <end>."""
    assert len(pictures) >= 50
    for beams in BEAMS:
        lengths = {len(ids) for ids in expected[beams]}
        assert len(lengths) >= 2, (beams, lengths)
        assert all(ids[-1] == 2 for ids in expected[beams])  # every caption ended with <end>


# ==================================================================================================
# generate()
# ==================================================================================================


def assert_maps_follow_words(outputs, processor, rows: int) -> None:
    """One map per returned token up to and including <end>, each summing to 1; zeros after <end>."""
    maps = outputs.attention_maps
    assert maps.shape[:2] == (rows, outputs.sequences.shape[1] - 1)
    for row in range(rows):
        ids = strip(outputs.sequences[row], processor)
        words = len(ids) - 1  # every token after <start>, <end> included
        sums = maps[row].sum(-1)
        torch.testing.assert_close(sums[:words], torch.ones(words), atol=1e-4, rtol=0)
        assert torch.all(maps[row, words:] == 0)


@pytest.mark.parametrize("num_beams", BEAMS)
def test_generate_with_attention_on_each_picture_alone(model, processor, pictures, expected, num_beams):
    for index, path in enumerate(pictures):
        outputs = generate_alone(
            model,
            processor,
            Image.open(path),
            num_beams,
            output_attentions=True,
            return_dict_in_generate=True,
        )
        assert strip(outputs.sequences[0], processor) == expected[num_beams][index], path.name
        assert_maps_follow_words(outputs, processor, rows=1)


@pytest.mark.parametrize("num_beams", BEAMS)
def test_a_batch_gives_each_picture_its_result_alone(model, processor, pictures, expected, num_beams):
    images = [Image.open(path) for path in pictures]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**inputs, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
        outputs = model.generate(
            **inputs,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    assert [strip(row, processor) for row in plain] == expected[num_beams]
    assert [strip(row, processor) for row in outputs.sequences] == expected[num_beams]
    assert_maps_follow_words(outputs, processor, rows=len(images))


@pytest.mark.parametrize("num_beams", [3, 5])
def test_beam_search_that_runs_past_the_winners_end(model, processor, captioner, pictures, num_beams):
    """
    Without length normalisation (`length_penalty=0`) the shortest caption often wins while the search goes on
    until every beam has ended: the run that crashed with IndexError. It must happen here (else the test
    would prove nothing), and the maps, the pipeline and the ids must be right when it does.
    """
    past_the_end = 0
    for path in pictures:
        options = {"length_penalty": 0.0}
        plain = generate_alone(model, processor, Image.open(path), num_beams, **options)
        outputs = generate_alone(
            model,
            processor,
            Image.open(path),
            num_beams,
            output_attentions=True,
            output_scores=True,
            return_dict_in_generate=True,
            **options,
        )
        past_the_end += len(outputs.scores) > outputs.sequences.shape[1] - 1
        ids = strip(plain[0], processor)
        assert strip(outputs.sequences[0], processor) == ids, path.name
        assert_maps_follow_words(outputs, processor, rows=1)
        (record,) = captioner(
            str(path),
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
            generate_kwargs=options,
            return_attention=True,
        )
        assert record["generated_text"] == processor.tokenizer.decode(ids, skip_special_tokens=True)
        assert_words_and_maps(record, ids, processor)
    assert past_the_end >= 2


@pytest.mark.parametrize("num_beams", [3, 5])
def test_num_return_sequences_have_one_map_per_word(model, processor, pictures, num_beams):
    for path in pictures[::6]:
        outputs = generate_alone(
            model,
            processor,
            Image.open(path),
            num_beams,
            num_return_sequences=num_beams,
            output_attentions=True,
            return_dict_in_generate=True,
        )
        assert_maps_follow_words(outputs, processor, rows=num_beams)


# ==================================================================================================
# pipeline("image-to-text")
# ==================================================================================================


@pytest.fixture(scope="module")
def captioner(model_dir):
    return pipeline("image-to-text", model=str(model_dir), trust_remote_code=True)


def assert_words_and_maps(record: dict[str, Any], expected_ids: list[int], processor) -> None:
    """The pipeline's words are the caption's (without <end>), each with a map over the grid summing to 1."""
    words = processor.tokenizer.convert_ids_to_tokens(expected_ids[1:-1])
    assert record["words"] == words
    attention = record["attention"]
    assert attention.dtype == np.float32 and attention.shape[0] == len(words)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("num_beams", BEAMS)
def test_pipeline_equals_generate(captioner, processor, pictures, expected, num_beams):
    want = texts(expected[num_beams], processor)
    options = {"num_beams": num_beams, "max_new_tokens": MAX_NEW_TOKENS}
    single = [captioner(str(path), **options) for path in pictures[:20]]
    assert single == [[{"generated_text": text}] for text in want[:20]]
    listed = captioner([str(path) for path in pictures], batch_size=7, **options)
    assert [records[0]["generated_text"] for records in listed] == want
    with_attention = captioner(
        [str(path) for path in pictures], batch_size=5, return_attention=True, **options
    )
    for records, ids in zip(with_attention, expected[num_beams], strict=True):
        (record,) = records
        assert record["generated_text"] == processor.tokenizer.decode(ids, skip_special_tokens=True)
        assert_words_and_maps(record, ids, processor)
    alone = captioner(str(pictures[0]), return_attention=True, **options)
    assert_words_and_maps(alone[0], expected[num_beams][0], processor)


@pytest.mark.parametrize("num_beams", [3, 5])
def test_pipeline_num_return_sequences(captioner, model, processor, pictures, expected, num_beams):
    paths = [str(path) for path in pictures[::5]]
    results = captioner(
        paths,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=3,
    )
    for path, records in zip(paths, results, strict=True):
        want = generate_alone(model, processor, Image.open(path), num_beams, num_return_sequences=num_beams)
        assert [record["generated_text"] for record in records] == processor.batch_decode(
            want, skip_special_tokens=True
        )
    first = captioner(
        paths[0],
        num_beams=num_beams,
        num_return_sequences=2,
        return_attention=True,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    assert len(first) == 2 and all(len(r["words"]) == len(r["attention"]) for r in first)


@st.composite
def free_pictures(draw) -> Image.Image:
    """Any size from 1 x 1 to 300 px a side, any common mode, noise or flat colour."""
    width = draw(st.integers(1, 300))
    height = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "I;16", "P", "CMYK", "1", "I", "F"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (height, width), dtype=np.int32), mode="I")
    if mode == "F":
        return Image.fromarray(rng.normal(0, 100, (height, width)).astype(np.float32), mode="F")
    return random_picture(rng, width, height, mode)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picture=free_pictures(), num_beams=st.sampled_from(BEAMS))
def test_pipeline_equals_generate_on_any_picture(captioner, model, processor, picture, num_beams):
    want = generate_alone(
        model, processor, picture, num_beams, output_attentions=True, return_dict_in_generate=True
    )
    assert_maps_follow_words(want, processor, rows=1)
    ids = strip(want.sequences[0], processor)
    (record,) = captioner(picture, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS, return_attention=True)
    assert record["generated_text"] == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert_words_and_maps(record, ids, processor)


# ==================================================================================================
# scripts/caption.py
# ==================================================================================================


@pytest.fixture(scope="module")
def caption_script():
    return load_script("caption")


def by_path(pictures: list[Path], captions: list[str]) -> dict[str, str]:
    return {str(path): caption for path, caption in zip(pictures, captions, strict=True)}


@pytest.mark.parametrize("num_beams", BEAMS)
def test_caption_script_prints_lines_json_and_jsonl(
    caption_script, model_dir, pictures, expected, processor, num_beams, workdir, capsys
):
    want = by_path(pictures, texts(expected[num_beams], processor))
    common = [
        "--model",
        str(model_dir),
        "--num-beams",
        str(num_beams),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
    ]
    common += ["--no-progress", "--batch-size", "7"]
    assert caption_script.main([*common, *map(str, pictures)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert dict(line.split("\t") for line in lines) == want and len(lines) == len(pictures)

    assert caption_script.main([*common, "--json", str(pictures[0].parent)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["path"]: row["caption"] for row in rows} == want and len(rows) == len(pictures)

    output = workdir / f"captions-beam{num_beams}.jsonl"
    assert caption_script.main([*common, "--output", str(output), *map(str, pictures)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(path) for path in pictures]  # input order
    assert {row["path"]: row["caption"] for row in rows} == want


@pytest.mark.parametrize("num_beams", BEAMS)
def test_caption_script_visualizes_single_files(
    caption_script, model_dir, pictures, expected, processor, num_beams, workdir, capsys
):
    """--visualize on one file at a time: the journey that crashed at beams 3 and 5."""
    figures = workdir / f"figures-beam{num_beams}"
    for index in varied(expected[num_beams], 3):
        path = pictures[index]
        argv = [
            "--model",
            str(model_dir),
            str(path),
            "--num-beams",
            str(num_beams),
            "--json",
            "--no-progress",
        ]
        argv += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--visualize", str(figures)]
        assert caption_script.main(argv) == 0, path.name
        (row,) = json.loads(capsys.readouterr().out)
        assert row["caption"] == processor.tokenizer.decode(
            expected[num_beams][index], skip_special_tokens=True
        )
        with Image.open(row["figure"]) as figure:
            assert figure.format == "PNG" and figure.width > 100


# ==================================================================================================
# The HTTP API (show_attend_tell/serve.py)
# ==================================================================================================


def serve(model_dir: Path, max_wait_ms: float):
    from fastapi.testclient import TestClient

    from show_attend_tell.serve import Captioner, create_app

    app = create_app(Captioner.from_pretrained(str(model_dir), device="cpu"), max_wait_ms=max_wait_ms)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def http_client(model_dir):
    yield from serve(model_dir, max_wait_ms=0)


@pytest.fixture(scope="module")
def batching_http_client(model_dir):
    """A wait window long enough that requests sent together are captioned in one batch."""
    yield from serve(model_dir, max_wait_ms=500)


def post_picture(client, path: Path, **fields: Any) -> dict[str, Any]:
    response = client.post(
        "/caption",
        files={"image": (path.name, path.read_bytes(), "application/octet-stream")},
        data={
            key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in fields.items()
        },
    )
    assert response.status_code == 200, (path.name, response.text)
    return response.json()


def assert_http_attention(body: dict[str, Any], expected_ids: list[int], processor) -> None:
    words = processor.tokenizer.convert_ids_to_tokens(expected_ids[1:-1])
    assert body["tokens"] == words
    attention = np.asarray(body["attention"])
    assert body["attention_shape"][0] == len(words) and attention.shape[0] == len(words)
    assert attention.shape[1] == body["attention_shape"][1] * body["attention_shape"][2]
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("num_beams", BEAMS)
def test_http_caption_equals_generate(http_client, pictures, expected, processor, num_beams):
    for index, path in enumerate(pictures):
        ids = expected[num_beams][index]
        attend = index % 2 == 0
        body = post_picture(
            http_client, path, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS, return_attention=attend
        )
        assert body["caption"] == processor.tokenizer.decode(ids, skip_special_tokens=True), path.name
        assert body["num_beams"] == num_beams
        if attend:
            assert_http_attention(body, ids, processor)
        else:
            assert "attention" not in body


@pytest.mark.parametrize("num_beams", [3, 5])
def test_http_plain_requests_batched_with_an_attention_request(
    batching_http_client, pictures, expected, processor, num_beams
):
    """Requests sent at once share one generate() call; the one that asked for attention gets it, alone."""
    from concurrent.futures import ThreadPoolExecutor

    chosen = list(range(0, len(pictures), 5))
    client = batching_http_client
    batches_before = client.get("/stats").json()["batches"]
    with ThreadPoolExecutor(len(chosen)) as pool:
        bodies = list(
            pool.map(
                lambda index: post_picture(
                    client,
                    pictures[index],
                    num_beams=num_beams,
                    max_new_tokens=MAX_NEW_TOKENS,
                    return_attention=index == chosen[1],
                ),
                chosen,
            )
        )
    stats = client.get("/stats").json()
    assert stats["batches"] - batches_before < len(chosen)  # some of them were captioned together
    for index, body in zip(chosen, bodies, strict=True):
        ids = expected[num_beams][index]
        assert body["caption"] == processor.tokenizer.decode(ids, skip_special_tokens=True)
        if index == chosen[1]:
            assert_http_attention(body, ids, processor)
        else:
            assert "attention" not in body


# ==================================================================================================
# The web demo's handlers (scripts/app.py)
# ==================================================================================================


def on_screen(
    handler: Callable[..., Any], shown: tuple[Any, ...], *inputs: Any
) -> tuple[tuple, Exception | None]:
    """
    What the page shows after an event, as Gradio applies a handler: every value a generator yields (or the
    function returns) replaces the outputs; an exception leaves the last values shown and reports the error.
    """
    try:
        produced = handler(*inputs)
        for shown in produced if hasattr(produced, "__next__") else [produced]:  # noqa: B007
            pass
    except Exception as error:
        return shown, error
    return shown, None


@pytest.fixture(scope="module")
def app_handlers(model_dir, pictures, workdir) -> dict[str, Callable[..., Any]]:
    pytest.importorskip("gradio")
    from show_attend_tell.retrieval import CaptionRetriever, ImageGallery
    from show_attend_tell.serve import Captioner

    app = load_script("app")
    captioner = Captioner.from_pretrained(str(model_dir), device="cpu")
    gallery_dir = pictures[0].parent
    retriever = CaptionRetriever(
        captioner.model,
        captioner.processor,
        ImageGallery.from_folder(gallery_dir),
        cache_dir=workdir / "app-cache",
    )
    demo = app.build_demo(captioner, retriever, pictures[:6])
    return {function.name: function.fn for function in demo.fns.values()}


@pytest.mark.parametrize("num_beams", BEAMS)
def test_web_demo_captions_every_picture_like_generate(
    app_handlers, pictures, expected, processor, num_beams
):
    caption = app_handlers["caption"]
    shown: tuple = ("", None)
    for index in varied(expected[num_beams], 4):
        path = pictures[index]
        shown, error = on_screen(caption, shown, Image.open(path), num_beams, MAX_NEW_TOKENS - 1)
        assert error is None, (path.name, error)
        assert shown[0] == processor.tokenizer.decode(expected[num_beams][index], skip_special_tokens=True)
        assert isinstance(shown[1], Image.Image) and shown[1].width > 100


def test_web_demo_failure_clears_the_previous_caption_and_says_why(app_handlers, pictures):
    import gradio as gr

    caption = app_handlers["caption"]
    shown, error = on_screen(caption, ("", None), Image.open(pictures[0]), 3, 20)
    assert error is None and shown[0] and shown[1] is not None
    data = pictures[0].read_bytes()
    truncated = Image.open(io.BytesIO(data[: len(data) // 2]))  # opens; fails when its pixels are read
    shown, error = on_screen(caption, shown, truncated, 3, 20)
    assert isinstance(error, gr.Error) and "truncated" in str(error)
    assert shown == ("", None)
    shown, error = on_screen(caption, ("a caption", Image.new("RGB", (4, 4))), None, 3, 20)
    assert isinstance(error, gr.Error) and "Upload a picture" in str(error) and shown == ("", None)


def test_web_demo_search(app_handlers, pictures, expected, processor):
    import gradio as gr

    search = app_handlers["search"]
    query = processor.tokenizer.decode(expected[5][0], skip_special_tokens=True)
    (gallery, figure), error = on_screen(search, ([], None), query, 4)
    assert error is None and len(gallery) == 4 and isinstance(figure, Image.Image)
    scores = [float(label.rsplit("(", 1)[1].rstrip(")")) for _, label in gallery]
    assert scores == sorted(scores, reverse=True)
    assert [label.split()[0] for _, label in gallery] == ["#1", "#2", "#3", "#4"]
    shown, error = on_screen(search, (gallery, figure), "   ", 4)
    assert isinstance(error, gr.Error) and shown == ([], None)


# ==================================================================================================
# scripts/push_to_hub.py, scripts/evaluate_captions.py, scripts/search_images.py
# ==================================================================================================


def test_push_to_hub_dry_run_with_default_options(model_dir, workdir, capsys):
    """The default options draw the card's example attention figure (at the model's default beam size, 3)."""
    folder = workdir / "hub"
    assert (
        load_script("push_to_hub").main(
            ["--model", str(model_dir), "--repo-id", "someone/sat", "--dry-run", str(folder)]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "loads without this package" in err and "dry run" in err
    figures = [path for path in folder.iterdir() if path.suffix == ".png"]
    assert len(figures) == 1
    with Image.open(figures[0]) as figure:
        assert figure.width > 100
    assert figures[0].name in (folder / "README.md").read_text()


def test_evaluate_script_on_the_saved_folder(model_dir, workdir, capsys):
    output = workdir / "evaluation.json"
    argv = ["--model", str(model_dir), "--dataset", "synthetic", "--cache-dir", str(workdir / "data")]
    argv += ["--dataset-option", "image_size=32", "--dataset-option", "num_train=200"]
    argv += [
        "--dataset-option",
        "num_validation=8",
        "--dataset-option",
        "num_test=0",
        "--split",
        "validation",
    ]
    argv += ["--num-beams", "1", "3", "5", "--metrics", "bleu", "rouge", "cider", "--num-workers", "0"]
    argv += ["--no-progress", "--output", str(output), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    assert load_script("evaluate_captions").main(argv) == 0, capsys.readouterr().err
    results = json.loads(output.read_text())
    assert set(results["results"]) == {"beam_1", "beam_3", "beam_5"}
    for scores in results["results"].values():
        assert 0 < scores["bleu_4"] <= 1


def test_search_images_script_on_the_saved_folder(model_dir, pictures, expected, processor, workdir, capsys):
    query = processor.tokenizer.decode(expected[3][3], skip_special_tokens=True)
    argv = ["--model", str(model_dir), "--images", str(pictures[0].parent), query, "a large blue star"]
    argv += ["--json", "--top-k", "5", "--figure", str(workdir / "search.png"), "--no-cache"]
    assert load_script("search_images").main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [result["query"] for result in results] == [query, "a large blue star"]
    for result in results:
        assert [hit["rank"] for hit in result["hits"]] == [1, 2, 3, 4, 5]
        scores = [hit["score"] for hit in result["hits"]]
        assert scores == sorted(scores, reverse=True)
        with Image.open(result["figure"]) as figure:
            assert figure.format == "PNG"


# ==================================================================================================
# A folder re-saved from the folder's own code (issue 17, item 1)
# ==================================================================================================


@pytest.mark.parametrize("major", [5, 4])
def test_a_folder_resaved_from_remote_code_serves_the_pipeline(
    major, model_dir, model, processor, pictures, workdir, tmp_path
):
    from conftest import run_check_script

    overlay = None
    if major == 4:
        overlay = ROOT / ".venv-compat"
        if not (overlay / "transformers").is_dir():
            pytest.skip("transformers 4.x overlay missing: run `make test` or `make test-compat`")
    picture = pictures[3]
    result = run_check_script(
        "resave_remote_check.py", [model_dir, tmp_path / "resaved", picture], tmp_path, overlay
    )
    assert int(result["transformers"].split(".")[0]) == major
    want = [
        processor.batch_decode(
            generate_alone(model, processor, Image.open(picture), beams, max_new_tokens=12),
            skip_special_tokens=True,
        )[0]
        for beams in BEAMS
    ]
    assert result["original"]["pipeline_class"] == "ShowAttendTellImageToTextPipeline"
    assert result["original"]["captions"] == want
    assert "pipeline_show_attend_tell.py" in result["files"]
    assert result["resaved"] == result["original"]
