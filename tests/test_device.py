"""The one device choice (show_attend_tell.device.pick_device) and what the scripts make of `--device`."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import load_script
from hypothesis import given, settings
from hypothesis import strategies as st

from show_attend_tell.device import pick_device


def machine(monkeypatch: pytest.MonkeyPatch, cuda: int = 0, mps: bool = False) -> None:
    """Pretends this machine has `cuda` CUDA devices and MPS or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(0, False, "cpu"), (0, True, "mps"), (1, True, "cuda"), (2, False, "cuda")]
)
def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch, cuda: int, mps: bool, expected: str) -> None:
    machine(monkeypatch, cuda, mps)
    assert pick_device() == pick_device("auto") == torch.device(expected)


def test_a_named_device_is_checked_against_this_machine(monkeypatch) -> None:
    machine(monkeypatch, cuda=2)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^cuda:2: this machine has 2 CUDA device\(s\), numbered from 0$"):
        pick_device("cuda:2")
    with pytest.raises(ValueError, match=r"^mps: Apple's MPS is not available here$"):
        pick_device("mps")
    machine(monkeypatch, cuda=0)
    with pytest.raises(ValueError, match=r"^cuda: CUDA is not available here$"):
        pick_device("cuda")
    with pytest.raises(ValueError, match=r"^gpu: not a device; use auto "):
        pick_device("gpu")


@settings(max_examples=100, deadline=None)
@given(
    name=st.one_of(
        st.text(max_size=12), st.from_regex(r"(cpu|cuda|mps|meta|xpu)(:[0-9]{1,2})?", fullmatch=True)
    )
)
def test_any_name_gives_a_device_or_one_line_naming_it(name: str) -> None:
    try:
        device = pick_device(name)
    except ValueError as error:
        message = str(error)
        assert message.startswith(f"{name}: ") and "\n" not in message.replace(name, "")
    else:
        assert isinstance(device, torch.device)


def test_the_scripts_say_which_option_is_wrong(monkeypatch, tmp_path: Path, capsys) -> None:
    # search_images.py, app.py and the HTTP service check --device before loading anything (the model path does not even exist).
    machine(monkeypatch, cuda=0)
    search = load_script("search_images")
    assert (
        search.main(
            ["a dog", "--model", str(tmp_path / "none"), "--images", str(tmp_path), "--device", "cuda"]
        )
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == "search_images.py: error: --device cuda: CUDA is not available here"
    )
    pytest.importorskip("gradio")
    app = load_script("app")
    assert app.main(["--model", str(tmp_path), "--device", "cuda:0"]) == 2  # a folder: checked by parse_args
    assert capsys.readouterr().err.strip().endswith("error: --device cuda:0: CUDA is not available here")
    pytest.importorskip("uvicorn")
    from show_attend_tell import serve

    assert serve.main(["--model", str(tmp_path / "none"), "--device", "mps"]) == 2
    assert capsys.readouterr().err.strip() == "--device mps: Apple's MPS is not available here"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_machine_auto_is_cuda() -> None:
    assert pick_device().type == "cuda"
    count = torch.cuda.device_count()
    assert pick_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(ValueError, match=f"this machine has {count} CUDA device"):
        pick_device(f"cuda:{count}")


def test_every_command_line_describes_device_and_remote_code_alike(capsys) -> None:
    """One meaning of --device and --trust-remote-code, however a script declares them (search_images.py and
    app.py write the texts out, to answer --help without importing torch)."""
    from show_attend_tell import serve
    from show_attend_tell.device import DEVICE_HELP
    from show_attend_tell.hub import TRUST_REMOTE_CODE_HELP

    parsers = {
        name: load_script(name).parse_args
        for name in ("caption", "evaluate_captions", "search_images", "app")
    }
    parsers["serve"] = serve.parse_args
    for command in ("build", "add"):
        parsers[f"search_images {command}"] = functools.partial(
            load_script("search_images").parse_index_args, command
        )
    for name, parse_args in parsers.items():
        with pytest.raises(SystemExit):
            parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help to the terminal's width
        assert TRUST_REMOTE_CODE_HELP in text, name
        # caption.py's and the index commands' device is Accelerate's
        assert (DEVICE_HELP in text) == (
            name not in ("caption", "search_images build", "search_images add")
        ), name
