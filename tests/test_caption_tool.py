"""scripts/caption.py and show_attend_tell.caption_files: inputs, outputs, figures, several processes, resuming after a
kill, bounded memory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from show_attend_tell import caption_files
from show_attend_tell.saving import save_model_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "caption.py"
KILL_HELPER = Path(__file__).resolve().parent / "caption_kill_helper.py"

caption = load_script("caption")


def make_images(folder: Path, count: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"img{index:04d}.png"
        Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def model_dir(tmp_path, tiny_model, processor) -> Path:
    return save_model_folder(tmp_path / "model", tiny_model, processor)


def expected_captions(model, processor, paths, **generate_kwargs) -> list[str]:
    """One generate() per image: the reference the tool's batched, multi-process output must equal."""
    captions = []
    for path in paths:
        with torch.no_grad():
            ids = model.generate(**processor(images=Image.open(path)), **generate_kwargs)
        captions.append(processor.batch_decode(ids)[0])
    return captions


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# --- inputs and the JSONL bookkeeping ---------------------------------------------------------------


def test_inputs_from_folders_globs_and_a_list_each_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "photos" / "sub", 2)
    make_images(tmp_path / "photos", 1)
    (tmp_path / "photos" / "notes.txt").write_text("not a picture")  # skipped when scanning a folder
    make_images(tmp_path / "more", 2)
    (tmp_path / "list.txt").write_text(
        "# my list\n\nmore/img0001.png\nphotos/img0000.png\nhttp://host/x.jpg\n"
    )
    args = caption.parse_args(
        ["--model", "m", "photos", "more/*.png", "--list", "list.txt", "missing.jpg", "photos/notes.txt"]
    )
    keys = caption.collect_inputs(args).keys
    assert keys == [
        "photos/img0000.png",
        "photos/sub/img0000.png",
        "photos/sub/img0001.png",
        "more/img0000.png",
        "more/img0001.png",
        "missing.jpg",  # reported as a failed image, not dropped silently
        "photos/notes.txt",  # named explicitly: tried (and reported)
        "http://host/x.jpg",
    ]
    limited = caption.collect_inputs(caption.parse_args(["--model", "m", "photos", "--limit", "2"]))
    assert limited.keys == keys[:2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m"], "give images"),
        (["--model", "m", "a.png", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--model", "m", "a.png", "--dataset", "synthetic"], "cannot be combined"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_merge_orders_rows_keeps_each_image_once_and_ignores_a_torn_line(tmp_path):
    output = tmp_path / "captions.jsonl"
    output.write_text(
        json.dumps({"path": "b", "caption": "old b"})
        + "\n"
        + json.dumps({"path": "gone", "caption": "from an earlier input"})
        + "\n"
        + json.dumps({"path": "c", "error": "empty file (0 bytes)"})
        + "\n"
    )
    parts = caption_files.parts_dir(output)
    parts.mkdir()
    (parts / "process-000-1.jsonl").write_text(
        json.dumps({"path": "a", "caption": "new a"}) + "\n" + '{"path": "d", "capt'  # killed mid-write
    )
    (parts / "process-001-2.jsonl").write_text(json.dumps({"path": "c", "caption": "c, fixed"}) + "\n")
    assert caption_files.captioned_keys(output) == {"a", "b", "c", "gone"}

    captioned, failed, missing = caption_files.merge_rows(output, ["a", "b", "c", "d"])
    assert (captioned, failed, missing) == (3, 0, ["d"])
    assert read_rows(output) == [
        {"path": "a", "caption": "new a"},
        {"path": "b", "caption": "old b"},
        {"path": "c", "caption": "c, fixed"},  # a caption replaces an earlier failure
        {"path": "gone", "caption": "from an earlier input"},  # kept, after this run's images
    ]
    assert not parts.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["captions.jsonl"]  # no temporary file left


def test_figure_names_are_unique():
    names = caption_files.figure_names(["a/x.png", "b/x.png", "c/y.jpg", "https://host/z.png?size=2"])
    assert names["c/y.jpg"] == "y.png" and names["https://host/z.png?size=2"] == "z.png"
    assert len(set(names.values())) == 4 and names["a/x.png"].startswith("x-")


def test_caption_to_jsonl_from_python_resumes_and_retries_what_failed(
    tmp_path, tiny_model, processor, capsys
):
    paths = make_images(tmp_path / "photos", 5)
    broken = tmp_path / "photos" / "broken.png"
    broken.write_bytes(b"not a picture")
    inputs = caption_files.collect_inputs([str(tmp_path / "photos")])
    assert inputs.keys == [str(broken), *map(str, paths)]
    output = tmp_path / "out" / "captions.jsonl"
    options = {"batch_size": 2, "progress": False, "num_beams": 3, "max_new_tokens": 5}

    run = caption_files.caption_to_jsonl(tiny_model, processor, inputs, output, **options)
    assert (run.captioned, run.failed, run.missing, run.skipped, run.processes) == (5, 1, [], 0, 1)
    assert f"error: {broken}: not an image file Pillow can read" in capsys.readouterr().err
    expected = expected_captions(tiny_model, processor, paths, num_beams=3, max_new_tokens=5)
    unreadable = "not an image file Pillow can read (unknown format, or corrupt data)"
    assert read_rows(output) == [
        {"path": str(broken), "error": unreadable},
        *({"path": str(path), "caption": text} for path, text in zip(paths, expected, strict=True)),
    ]

    broken.write_bytes(paths[0].read_bytes())  # fixed: the next run captions it, and only it
    run = caption_files.caption_to_jsonl(tiny_model, processor, inputs, output, **options)
    assert (run.captioned, run.failed, run.skipped) == (6, 0, 5)
    assert "5 images already captioned" in capsys.readouterr().err
    assert read_rows(output)[0] == {"path": str(broken), "caption": expected[0]}
    assert not caption_files.parts_dir(output).exists()


# --- running the tool --------------------------------------------------------------------------------


@pytest.mark.compat
def test_captions_equal_generate_as_lines_json_and_jsonl(tmp_path, model_dir, tiny_model, processor, capsys):
    paths = make_images(tmp_path / "photos", 5)
    expected = expected_captions(tiny_model, processor, paths, num_beams=2, max_new_tokens=5)
    common = [
        "--model",
        str(model_dir),
        str(tmp_path / "photos"),
        "--num-beams",
        "2",
        "--max-new-tokens",
        "5",
    ]

    assert caption.main([*common, "--batch-size", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{path}\t{text}" for path, text in zip(paths, expected, strict=True)]

    # the attention scores compiled into one kernel, each step replayed from its buffers: the same captions
    options = ["--fuse-attention", "--capture-steps"]
    assert caption.main([*common, "--json", "--batch-size", "3", "--no-progress", *options]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"path": str(p), "caption": t} for p, t in zip(paths, expected, strict=True)]

    output = tmp_path / "out" / "captions.jsonl"
    assert caption.main([*common, "--output", str(output), "--num-workers", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "5 of 5 images captioned" in captured.err
    assert read_rows(output) == rows
    assert not caption_files.parts_dir(output).exists()


@pytest.mark.slow
def test_visualize_writes_a_figure_with_one_panel_per_word_plus_the_image(
    tmp_path, model_dir, tiny_model, processor, monkeypatch, capsys
):
    from show_attend_tell import visualization

    drawn = []
    original = visualization.save_attention_figure

    def recording_save(path, image, words, attention, **kwargs):
        drawn.append((Path(path), np.asarray(image), list(words), np.asarray(attention)))
        return original(path, image, words, attention, **kwargs)

    monkeypatch.setattr(visualization, "save_attention_figure", recording_save)
    paths = make_images(tmp_path / "photos", 3)
    figures = tmp_path / "figures"
    output = tmp_path / "captions.jsonl"
    argv = ["--model", str(model_dir), *map(str, paths), "--max-new-tokens", "6", "--visualize", str(figures)]
    assert caption.main([*argv, "--output", str(output), "--batch-size", "2"]) == 0

    rows = read_rows(output)
    assert sorted(p.name for p in figures.iterdir()) == ["img0000.png", "img0001.png", "img0002.png"]
    assert len(drawn) == 3
    for row, (figure_path, image, words, attention) in zip(rows, drawn, strict=True):
        assert row["figure"] == str(figure_path) and figure_path.stat().st_size > 0
        assert " ".join(words) == row["caption"]  # the figure shows the caption's words
        assert attention.shape == (len(words), tiny_model.config.num_pixels)
        size = processor.image_processor.size
        assert image.shape == (size["height"], size["width"], 3)
        figure = visualization.plot_attention(image, words, attention)
        assert len(figure.axes) == len(words) + 1  # the image, then one panel per word
        with Image.open(figure_path) as png:
            assert png.size == (
                int(figure.get_figwidth() * figure.dpi),
                int(figure.get_figheight() * figure.dpi),
            )
    # the maps are the ones generate() returns for that image, one per word
    from show_attend_tell.pipeline_show_attend_tell import words_and_attention

    with torch.no_grad():
        out = tiny_model.generate(
            **processor(images=Image.open(paths[0])),
            max_new_tokens=6,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    words, maps = words_and_attention(out.sequences[0], out.attention_maps[0], processor.tokenizer)
    assert drawn[0][2] == words
    np.testing.assert_allclose(drawn[0][3], maps, atol=1e-6)


def test_a_dataset_split_is_captioned_by_image_id(tmp_path, model_dir, tiny_model, processor, capsys):
    import datasets

    from show_attend_tell.data import CAPTION_FEATURES, write_parquet

    paths = make_images(tmp_path / "photos", 3)
    rows = {
        "image": [{"bytes": p.read_bytes(), "path": None} for p in paths]
        + [{"bytes": b"junk", "path": None}],
        "captions": [["a picture"]] * 4,
        "image_id": ["id-0", "id-1", "id-2", "id-broken"],
    }
    write_parquet({"test": datasets.Dataset.from_dict(rows, features=CAPTION_FEATURES)}, tmp_path / "data")
    output = tmp_path / "captions.jsonl"
    argv = ["--model", str(model_dir), "--dataset", str(tmp_path / "data"), "--split", "test"]
    status = caption.main([*argv, "--max-new-tokens", "5", "--output", str(output), "--no-progress"])
    assert status == 1  # one row failed
    err = capsys.readouterr().err
    assert "id-broken: not an image file" in err
    expected = expected_captions(tiny_model, processor, paths, max_new_tokens=5)
    assert read_rows(output) == [
        *({"image_id": f"id-{i}", "caption": text} for i, text in enumerate(expected)),
        {
            "image_id": "id-broken",
            "error": "not an image file Pillow can read (unknown format, or corrupt data)",
        },
    ]


def test_a_model_folder_without_safetensors_is_refused(tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    make_images(tmp_path / "photos", 1)
    assert caption.main(["--model", str(folder), str(tmp_path / "photos")]) == 2
    assert "cannot load the model" in capsys.readouterr().err


# --- several processes, a killed run, memory (subprocesses) -----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_accelerate_processes_give_the_single_process_captions_each_image_once(
    tmp_path, model_dir, capsys
):
    make_images(tmp_path / "photos", 40)
    common = [
        "--model",
        str(model_dir),
        str(tmp_path / "photos"),
        "--max-new-tokens",
        "5",
        "--batch-size",
        "4",
    ]
    single, double = tmp_path / "single.jsonl", tmp_path / "double.jsonl"
    assert caption.main([*common, "--output", str(single), "--no-progress"]) == 0
    assert "by 2 processes" not in capsys.readouterr().err
    # On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts ONE process (its
    # multi-CPU mode needs an MPI host file); the torchrun launcher behind --multi_gpu starts two, and the
    # tool then joins them over gloo on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    run = subprocess.run(
        [*launch, str(SCRIPT), *common, "--output", str(double), "--num-workers", "1", "--no-progress"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "40 of 40 images captioned by 2 processes" in run.stderr
    assert double.read_text() == single.read_text()  # same captions, same order
    keys = [row["path"] for row in read_rows(double)]
    assert len(keys) == len(set(keys)) == 40


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_with_every_image_once(tmp_path, model_dir, capsys):
    make_images(tmp_path / "photos", 24)
    common = [
        "--model",
        str(model_dir),
        str(tmp_path / "photos"),
        "--max-new-tokens",
        "5",
        "--batch-size",
        "4",
    ]
    common += ["--no-progress"]
    reference = tmp_path / "reference.jsonl"
    assert caption.main([*common, "--output", str(reference)]) == 0

    output = tmp_path / "captions.jsonl"
    killed = subprocess.run(
        [sys.executable, str(KILL_HELPER), "3", *common, "--output", str(output)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after 3 batches
    parts = list(caption_files.parts_dir(output).glob("*.jsonl"))
    assert len(parts) == 1 and not output.exists()
    assert len(read_rows(parts[0])) == 12
    with open(parts[0], "a") as part:
        part.write('{"path": "' + str(tmp_path / "photos" / "img0012.png") + '", "cap')  # torn last write

    capsys.readouterr()
    assert caption.main([*common, "--output", str(output)]) == 0
    assert "12 images already captioned" in capsys.readouterr().err
    assert output.read_text() == reference.read_text()  # every image once, in order, same captions
    assert not caption_files.parts_dir(output).exists()

    assert caption.main([*common, "--output", str(output)]) == 0  # nothing left to do
    assert "24 images already captioned" in capsys.readouterr().err
    assert output.read_text() == reference.read_text()


MEASURE_PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if status.returncode:
    sys.exit(status.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB: the peak of the tool's process
"""


@pytest.mark.slow
def test_memory_is_bounded_by_the_batch_not_the_collection(tmp_path, model_dir):
    make_images(tmp_path / "many", 2000, size=(24, 24))
    make_images(tmp_path / "few", 200, size=(24, 24))
    peaks = {}
    for name in ("few", "many"):
        command = [sys.executable, str(SCRIPT), "--model", str(model_dir), str(tmp_path / name)]
        command += ["--output", str(tmp_path / f"{name}.jsonl"), "--batch-size", "16", "--num-beams", "1"]
        command += ["--max-new-tokens", "3", "--no-progress"]
        run = subprocess.run(
            [sys.executable, "-c", MEASURE_PEAK_RSS, *command],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
        peaks[name] = int(run.stdout.strip()) / 1024  # MiB
    assert len(read_rows(tmp_path / "many.jsonl")) == 2000
    # 10x the images, the same peak up to allocator noise (measured: 2 MiB apart at about 1.2 GiB, which is
    # mostly torch and transformers themselves). Holding the collection's pixel values alone would add
    # 1800 more * 3 * 64 * 64 * 4 bytes = 84 MiB.
    assert peaks["many"] <= peaks["few"] + 40, peaks


# --- file names: bytes that are not UTF-8, tabs, newlines, backslashes; empty folders ---------------

# (name as bytes, as the plain output shows it): legal Linux file names that broke the tool or its output
ODD_NAMES = [
    (b"caf\xe9.png", "caf\\xe9.png"),  # Latin-1, not UTF-8
    (b"\xff\xfe.png", "\\xff\\xfe.png"),
    (b"tab\there.png", "tab\\there.png"),
    (b"new\nline.png", "new\\nline.png"),
    (b"back\\slash.png", "back\\\\slash.png"),
    ("café ☕.png".encode(), "café ☕.png"),  # valid UTF-8 stays as it is
    (b"plain.png", "plain.png"),
]


def odd_named_images(folder: Path) -> list[Path]:
    """One picture under each of ODD_NAMES, in the order the tool lists a scanned folder; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = make_images(folder.parent / "sources", len(ODD_NAMES))
    paths = []
    for (raw, _), source in zip(ODD_NAMES, sources, strict=True):
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), raw)))
        path.write_bytes(source.read_bytes())
        paths.append(path)
    return sorted(paths, key=str)


def unescape(field: str) -> str:
    """What bash's $'...' makes of a name the tool printed: the file name back (as Python holds it)."""
    import codecs

    return os.fsdecode(codecs.escape_decode(field.encode())[0])


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 need a Linux file system")
def test_odd_file_names_are_printed_escaped_one_line_each_and_reusable(
    tmp_path, model_dir, tiny_model, processor
):
    paths = odd_named_images(tmp_path / "photos")
    expected = dict(
        zip(paths, expected_captions(tiny_model, processor, paths, max_new_tokens=5), strict=True)
    )
    common = [sys.executable, str(SCRIPT), "--model", str(model_dir), str(tmp_path / "photos")]
    common += ["--max-new-tokens", "5", "--no-progress", "--batch-size", "3"]

    plain = subprocess.run(common, env=subprocess_env(), capture_output=True, timeout=300)
    assert plain.returncode == 0, plain.stderr.decode(errors="replace")[-3000:]
    lines = plain.stdout.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(paths) + 1  # one line per image, newline in a name or not
    shown = {}
    for line in lines[:-1]:
        name, text = line.split("\t")  # exactly two fields: a tab in a name is escaped
        shown[Path(unescape(name))] = text
    assert shown == {path: expected[path] for path in paths}
    assert {line.split("\t")[0].rsplit("/", 1)[1] for line in lines[:-1]} == {s for _, s in ODD_NAMES}

    as_json = subprocess.run([*common, "--json"], env=subprocess_env(), capture_output=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr.decode(errors="replace")[-3000:]
    rows = json.loads(as_json.stdout.decode("utf-8"))  # valid UTF-8 and valid JSON
    assert [(Path(row["path"]), row["caption"]) for row in rows] == list(expected.items())
    assert {os.fsencode(Path(row["path"]).name) for row in rows} == {raw for raw, _ in ODD_NAMES}

    # a terminal that shows ASCII only: the same JSON, with \uNNNN escapes for the other characters
    ascii_env = {**subprocess_env(), "PYTHONIOENCODING": "ascii"}
    as_ascii = subprocess.run([*common, "--json"], env=ascii_env, capture_output=True, timeout=300)
    assert as_ascii.returncode == 0, as_ascii.stderr.decode(errors="replace")[-3000:]
    assert json.loads(as_ascii.stdout.decode("ascii")) == rows


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 need a Linux file system")
def test_odd_file_names_in_jsonl_resume_and_errors(tmp_path, model_dir, capsys):
    paths = odd_named_images(tmp_path / "photos")
    broken = Path(os.fsdecode(os.fsencode(tmp_path / "photos") + b"/broken\xe9\n.png"))
    broken.write_bytes(b"not a picture")
    output = tmp_path / "captions.jsonl"
    argv = ["--model", str(model_dir), str(tmp_path / "photos"), "--max-new-tokens", "4", "--no-progress"]
    argv += ["--output", str(output), "--batch-size", "2"]
    assert caption.main(argv) == 1  # the broken picture
    err = capsys.readouterr().err
    assert "caption.py: error: " + caption_files.display_name(str(broken)) + ": " in err
    assert "broken\\xe9\\n.png: " in err
    text = output.read_bytes().decode("utf-8")  # valid UTF-8
    rows = [json.loads(line) for line in text.split("\n")[:-1]]
    assert len(rows) == len(paths) + 1
    assert {row["path"] for row in rows if "caption" in row} == set(map(str, paths))
    assert [row["path"] for row in rows if "error" in row] == [str(broken)]

    broken.unlink()
    assert caption.main(argv) == 0  # a re-run: every name found again in the bookkeeping, nothing redone
    assert f"{len(paths)} images already captioned" in capsys.readouterr().err
    assert [json.loads(line) for line in output.read_text("utf-8").splitlines() if "caption" in line] == [
        row for row in rows if "caption" in row
    ]


def test_figure_names_of_names_that_are_not_utf8():
    names = caption_files.figure_names(["a/caf\udce9.png", "b/caf\udce9.png", "c/caf\udce9.png"])
    assert len(set(names.values())) == 3 and all(name.isascii() for name in names.values())


def test_an_empty_folder_is_named_and_nothing_to_caption_is_an_error(tmp_path, model_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-pictures").mkdir()
    (tmp_path / "no-pictures" / "notes.txt").write_text("not a picture")
    make_images(tmp_path / "photos", 1)
    common = ["--model", str(model_dir), "--max-new-tokens", "3", "--no-progress"]

    assert caption.main([*common, str(tmp_path / "empty"), str(tmp_path / "no-pictures")]) == 1
    captured = capsys.readouterr()
    assert f"caption.py: warning: {tmp_path / 'empty'}: no images found" in captured.err
    assert f"caption.py: warning: {tmp_path / 'no-pictures'}: no images found" in captured.err
    assert "caption.py: error: no images to caption" in captured.err
    assert captured.out == ""

    # with pictures elsewhere: the empty folder is named, the others are captioned
    assert caption.main([*common, str(tmp_path / "empty"), str(tmp_path / "photos")]) == 0
    captured = capsys.readouterr()
    assert f"{tmp_path / 'empty'}: no images found" in captured.err
    assert len(captured.out.splitlines()) == 1


def test_the_help_documents_escaping_and_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        caption.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "caf\\xe9.png" in out and "$'...'" in out and "exit status" in out and "--trust-remote-code" in out
