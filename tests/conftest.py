"""Shared fixtures: a tiny word map, model and processor, helpers for meaningful decoding tests, and a runner for
the check scripts that load a saved folder in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput

from show_attend_tell import (
    ShowAttendTellConfig,
    ShowAttendTellForConditionalGeneration,
    ShowAttendTellImageProcessor,
    ShowAttendTellProcessor,
    ShowAttendTellTokenizer,
)

try:
    import datasets  # noqa: F401
except ImportError:
    # Under `make test-compat` (transformers 4.57 overlay) the installed datasets 5.x cannot import; only the
    # compat-marked tests run there, and none of them needs datasets.
    collect_ignore = [
        "test_app.py",
        "test_bench_search.py",
        "test_data.py",
        "test_dataset_options.py",
        "test_evaluate_script.py",
        "test_evaluation.py",
        "test_journeys.py",
        "test_retrieval.py",
        "test_serve.py",
        "test_training.py",
    ]

# Tests are CPU-only and must not oversubscribe the 2 cores when several processes run.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Hypothesis fails an example that takes over 200 ms by default: on a loaded 2-core CI machine a pause of the
# collector is enough. Speed belongs to benchmarks/, so no test has a deadline; the tests that set their own
# settings say deadline=None too.
settings.register_profile("no_deadline", deadline=None)
settings.load_profile("no_deadline")

TESTS = Path(__file__).parent

CAPTIONS = [
    "a small red circle left of a blue square",
    "a large green star above a yellow triangle",
    "a blue square right of a small red circle",
    "there is a yellow triangle below a green star",
] * 5


@pytest.fixture
def tokenizer() -> ShowAttendTellTokenizer:
    return ShowAttendTellTokenizer.train_from_captions(CAPTIONS, min_freq=5)


def sharpen_decoder(model: ShowAttendTellForConditionalGeneration, std: float = 0.6, seed: int = 0) -> None:
    """
    Gives the decoder weights large enough that each word's log-probabilities depend clearly on the words
    and image before it. With the default small initialisation, decoding tests could pass with a broken
    state or beam reorder, because every step would look alike.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def sharpened_tiny_model(
    vocab_size: int, std: float = 0.6, seed: int = 0, end_bias: float = 0.0
) -> ShowAttendTellForConditionalGeneration:
    """
    A tiny model in eval mode (built from seed 0) whose decoder is sharpened (`sharpen_decoder(model, std,
    seed)`). `end_bias` raises `<end>`'s logit, so that captions end after varied numbers of words.
    """
    torch.manual_seed(0)
    model = ShowAttendTellForConditionalGeneration(ShowAttendTellConfig.tiny(vocab_size=vocab_size)).eval()
    sharpen_decoder(model, std=std, seed=seed)
    if end_bias:
        with torch.no_grad():
            model.decoder.output_layer.bias[model.config.eos_token_id] += end_bias
    return model


def load_script(name: str) -> Any:
    """scripts/NAME.py as a module under a name of its own, as a test imports a command line to call its main."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_script_under_test", TESTS.parent / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons: each in-process training run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def unit_features(images: int, config: ShowAttendTellConfig, seed: int = 0) -> BaseModelOutput:
    """Unit-scale image features (a random ResNet's are 1e4 or more and saturate the LSTM)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(images, config.num_pixels, config.encoder_dim, generator=generator)
    return BaseModelOutput(last_hidden_state=features)


def bf16_and_float32_logits(
    model: ShowAttendTellForConditionalGeneration, images: int, rows_per_image: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Teacher-forced decoding of random words under bf16 autocast: its logits, and the float32 output layer
    applied to the same LSTM outputs (what the likeliest words' logits must equal).
    """
    features = unit_features(images, model.config, seed=5).last_hidden_state.to(device)
    input_ids = torch.randint(4, model.config.vocab_size, (images * rows_per_image, 4), device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        decoded = model.decoder(input_ids, features)
    with torch.inference_mode():
        output_layer = model.decoder.output_layer
        float32 = F.linear(decoded.lstm_outputs.float(), output_layer.weight, output_layer.bias)
    return decoded.logits, float32


@pytest.fixture
def tiny_model(tokenizer) -> ShowAttendTellForConditionalGeneration:
    return sharpened_tiny_model(len(tokenizer))


@pytest.fixture
def processor(tokenizer) -> ShowAttendTellProcessor:
    return ShowAttendTellProcessor(ShowAttendTellImageProcessor(size=64), tokenizer)


@pytest.fixture
def sample_image() -> Image.Image:
    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(48, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def run_check_script(
    script: str, arguments: Sequence[str | Path], workdir: Path, pythonpath: str | Path | None
) -> dict[str, Any]:
    """
    Runs `tests/<script>` in a fresh interpreter the way a Hub user would load a folder: offline, and with
    `pythonpath` (None: no PYTHONPATH) instead of this process's: it decides which transformers major the child
    gets. The script takes `arguments`, then the path of the JSON file it writes; returns what it wrote.
    """
    result_path = workdir / "result.json"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(
        HF_HUB_OFFLINE="1",
        # a cache of the folder's code per test: the child must import what this folder holds, not a leftover
        HF_MODULES_CACHE=str(workdir / "modules"),
        # the pipeline check fetches its images from a server on 127.0.0.1, which a proxy could not reach
        NO_PROXY="127.0.0.1,localhost",
    )
    completed = subprocess.run(
        [sys.executable, str(TESTS / script), *(str(argument) for argument in arguments), str(result_path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(result_path.read_text())


def flickr30k_hub_features() -> Any:
    """nlphuji/flickr30k's parquet conversion, column for column (a `datasets.Features`)."""
    from datasets import Features, Image, Value

    from show_attend_tell.data.common import list_feature

    return Features(
        {
            "image": Image(),
            "caption": list_feature(Value("string")),
            "sentids": list_feature(Value("string")),
            "split": Value("string"),
            "img_id": Value("string"),
            "filename": Value("string"),
        }
    )


def write_flickr30k_hub_folder(folder: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """
    Writes rows {"image": PNG bytes, "captions": [...], "image_id": str, "split": "train"/"val"/"test"} into
    `folder` laid out like `hf download nlphuji/flickr30k --repo-type dataset --revision refs/convert/parquet
    --local-dir folder`: nlphuji's columns in TEST/test/000N.parquet (two shards), plus the .gitattributes and
    the .cache/huggingface/ metadata that `hf download` leaves there.
    """
    from datasets import Dataset

    table = Dataset.from_dict(
        {
            "image": [{"bytes": row["image"], "path": None} for row in rows],
            "caption": [list(row["captions"]) for row in rows],
            "sentids": [[f"{n}-{k}" for k in range(len(row["captions"]))] for n, row in enumerate(rows)],
            "split": [row["split"] for row in rows],
            "img_id": [row["image_id"] for row in rows],
            "filename": [f"{row['image_id']}.jpg" for row in rows],
        },
        features=flickr30k_hub_features(),
    )
    shards = folder / "TEST" / "test"
    shards.mkdir(parents=True)
    half = len(rows) // 2
    table.select(range(half)).to_parquet(str(shards / "0000.parquet"))
    table.select(range(half, len(rows))).to_parquet(str(shards / "0001.parquet"))
    (folder / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    metadata = folder / ".cache" / "huggingface" / "download" / "TEST" / "test"
    metadata.mkdir(parents=True)
    for shard in ("0000", "0001"):
        (metadata / f"{shard}.parquet.metadata").write_text("0123abcd\n4567ef\n1700000000.0\n")
    (folder / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    return folder
