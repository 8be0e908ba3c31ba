"""scripts/train.py and show_attend_tell.training: learning, resuming, caching, several processes, bad input.

Every run uses the `tiny` model on a few dozen 32 px synthetic pictures, so a run takes a second or two.
Most runs call the script's `main()` in this process (no start-up cost); the ones that must be separate
processes (a SIGKILL, `accelerate launch`) run it as a subprocess with one thread per process.
"""

from __future__ import annotations

import errno
import importlib
import io
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, reset_accelerate, write_flickr30k_hub_folder
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file

from show_attend_tell.data import make_synthetic_dataset, write_parquet
from show_attend_tell.data.common import list_feature
from show_attend_tell.image_processing_show_attend_tell import ImageLoadError, load_image
from show_attend_tell.training import (
    CaptionBatchCollator,
    CaptionTrainingDataset,
    CheckpointError,
    DataError,
    EpochBatchSampler,
    FeatureCache,
    UsageError,
    build_parser,
    check_args,
    check_training_rows,
    list_checkpoints,
    read_training_state,
    remove_stale_temporaries,
    resolve_checkpoint,
    train,
    write_checkpoint,
)
from show_attend_tell.training.evaluation import attention_localisation, cells_in_box, peak_in_box

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
STEPS_PER_EPOCH = 10  # 40 pictures, 4 per batch (8 captions, 2 per picture)


# ==================================================================================================
# Fixtures and helpers
# ==================================================================================================


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic pictures are generated once per module and read from this cache afterwards."""
    cache = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(num_train=40, num_validation=8, num_test=0, image_size=32, seed=7, cache_dir=cache)
    return cache


# Options shared by the tiny runs; tests add theirs as strings split on whitespace ("--epochs 3").
TINY_OPTIONS = (
    "--model-size tiny --seed 7 --min-word-freq 1 --batch-size 8 --captions-per-image 2 --decoder-lr 3e-3 "
    "--num-workers 0 --report-to none --log-steps 1"
)
SYNTHETIC_OPTIONS = (
    "--dataset synthetic --dataset-option num_train=40 --dataset-option num_validation=8 "
    "--dataset-option num_test=0 --dataset-option image_size=32"
)


def split_options(*parts: str | Path) -> list[str]:
    return [word for part in parts for word in ([str(part)] if isinstance(part, Path) else part.split())]


def tiny_args(data_cache: Path, output: Path, *extra: str | Path) -> list[str]:
    """A tiny run: 40 synthetic pictures of 32 px, 10 steps per epoch, validation on 8 pictures."""
    return split_options(
        SYNTHETIC_OPTIONS, "--dataset-cache-dir", data_cache, TINY_OPTIONS, "--output-dir", output, *extra
    )


def parquet_args(data: Path, output: Path, *extra: str | Path) -> list[str]:
    """Like `tiny_args`, on a parquet folder written by `parquet_dataset`."""
    return split_options("--dataset", data, TINY_OPTIONS, "--output-dir", output, *extra)


def read_metrics(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    """The weights of the newest checkpoint (the last weights of a run; the model folder holds the best)."""
    return load_file(list_checkpoints(output / "checkpoints")[-1] / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def png(size: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def parquet_dataset(folder: Path, rows: list[dict], validation: list[dict] | None = None) -> Path:
    """Writes rows {"image": bytes, "captions": [...], "image_id": str} as train (and validation) parquet."""
    features = Features(
        {"image": ImageFeature(), "captions": list_feature(Value("string")), "image_id": Value("string")}
    )

    def as_split(items: list[dict]) -> Dataset:
        return Dataset.from_dict(
            {
                "image": [{"bytes": item["image"], "path": None} for item in items],
                "captions": [item["captions"] for item in items],
                "image_id": [item["image_id"] for item in items],
            },
            features=features,
        )

    splits = {"train": as_split(rows)}
    if validation is not None:
        splits["validation"] = as_split(validation)
    write_parquet(DatasetDict(splits), folder)
    return folder


def synthetic_rows(data_cache: Path, split: str = "train") -> list[dict]:
    dataset = make_synthetic_dataset(
        num_train=40, num_validation=8, num_test=0, image_size=32, seed=7, cache_dir=data_cache
    )[split].cast_column("image", ImageFeature(decode=False))
    return [
        {"image": row["image"]["bytes"], "captions": list(row["captions"]), "image_id": row["image_id"]}
        for row in dataset
    ]


# ==================================================================================================
# Learning
# ==================================================================================================


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path, train_script) -> Path:
    """
    An uninterrupted run of 3 epochs (frozen encoder, validation every epoch, checkpoints every 4 steps):
    what the resume, kill and cache tests must reproduce. Run in this process with one thread.
    """
    output = tmp_path_factory.mktemp("reference") / "run"
    assert train_script.main(tiny_args(data_cache, output, "--epochs 3 --checkpoint-steps 4")) == 0
    reset_accelerate()
    return output


def test_reference_run_output_folder(reference_run: Path) -> None:
    metrics = read_metrics(reference_run)
    assert metrics["global_step"] == 3 * STEPS_PER_EPOCH
    assert metrics["stopped_because"] == "epochs"
    assert [entry["epoch"] for entry in metrics["validation"]] == [1, 2, 3]
    assert all(0.0 <= entry["bleu_4_approx"] <= 1.0 for entry in metrics["validation"])
    assert {"model", "checkpoints", "metrics.json", "training_args.json"} <= {
        p.name for p in reference_run.iterdir()
    }
    model_dir = reference_run / "model"
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "processor_config.json",
        "training_args.json",
        "metrics.json",
        "modeling_show_attend_tell.py",
    ):
        assert (model_dir / name).is_file(), name
    args = json.loads((model_dir / "training_args.json").read_text())
    assert args["batch_size"] == 8 and args["images_per_batch"] == 4
    # --keep-checkpoints 3 (the default): only the newest three remain, all complete.
    names = [path.name for path in list_checkpoints(reference_run / "checkpoints")]
    assert names == ["checkpoint-00000024", "checkpoint-00000028", "checkpoint-00000030"]
    assert not [p for p in (reference_run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoints_keep_the_training_state_format(reference_run: Path) -> None:
    # training_state.json of checkpoints written before the loop moved into the package: the same keys, so
    # that a run started with an older version still resumes.
    saved = read_training_state(list_checkpoints(reference_run / "checkpoints")[-1])
    assert set(saved) == {"state", "args", "num_processes"} and saved["num_processes"] == 1
    assert set(saved["state"]) == {
        "global_step", "epoch", "batches_in_epoch", "images_seen", "train_seconds", "best_bleu_4", "best_epoch",
        "epochs_without_improvement", "bad_images", "image_visits", "bad_visits", "history",
    }  # fmt: skip
    assert saved["state"]["global_step"] == 3 * STEPS_PER_EPOCH and saved["state"]["epoch"] == 3
    assert set(saved["state"]["history"]) == {"train", "validation", "log"}


def test_training_from_python_returns_what_metrics_json_holds(tmp_path: Path, data_cache: Path) -> None:
    output = tmp_path / "run"
    args = build_parser().parse_args(tiny_args(data_cache, output, "--max-steps 3 --checkpoint-steps 2"))
    check_args(args)
    result = train(args)
    assert result == read_metrics(output)
    assert result["stopped_because"] == "max_steps" and result["global_step"] == 3
    assert result["images_seen"] == 3 * 4 and len(result["log"]) == 3
    assert [entry["step"] for entry in result["validation"]] == [3]  # the validation at the stop
    assert [p.name for p in list_checkpoints(output / "checkpoints")] == [
        "checkpoint-00000002",
        "checkpoint-00000003",
    ]
    assert json.loads((output / "model" / "metrics.json").read_text())["global_step"] == 3


def test_training_from_python_raises_the_usage_error_the_script_prints(
    tmp_path: Path, data_cache: Path, reference_run: Path
) -> None:
    checkpoint = list_checkpoints(reference_run / "checkpoints")[0]
    args = build_parser().parse_args(
        tiny_args(data_cache, tmp_path / "run", "--seed 8 --resume-from-checkpoint", checkpoint)
    )
    check_args(args)
    with pytest.raises(UsageError, match="--seed: 7 then, 8 now"):
        train(args)


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP"])
def test_deepspeed_or_fsdp_is_refused_in_words_for_python_and_the_script(
    tmp_path: Path, data_cache: Path, train_script, capsys, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from show_attend_tell.training import loop

    class ConfiguredAccelerator(Accelerator):
        """What `accelerate config` with DeepSpeed or FSDP gives (those need GPUs to start for real)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.state.distributed_type = DistributedType[kind]

    monkeypatch.setattr(loop, "Accelerator", ConfiguredAccelerator)
    argv = tiny_args(data_cache, tmp_path / "run", "--max-steps 1")
    args = build_parser().parse_args(argv)
    check_args(args)
    with pytest.raises(UsageError) as raised:
        train(args)
    message = str(raised.value)
    assert {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}[kind] in message and "(DDP)" in message
    assert "script" not in message  # train(args) is called from Python too
    assert not (tmp_path / "run").exists()  # refused before any work
    reset_accelerate()
    capsys.readouterr()
    assert train_script.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_dataset_default_is_flickr30k_as_in_the_evaluation_script() -> None:
    train_default = build_parser().parse_args([]).dataset
    assert train_default == "flickr30k"
    assert load_script("evaluate_captions").parse_args(["--model", "m"]).dataset == train_default


def test_console_output_has_readable_scores_and_no_dataset_saving_bars(
    tmp_path: Path, train_script, capsys
) -> None:
    # A fresh dataset cache: the synthetic pictures are generated and written during this run.
    output = tmp_path / "run"
    args = tiny_args(tmp_path / "fresh-cache", output, "--epochs 1 --checkpoint-steps 0")
    assert train_script.main(args) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "Saving the dataset" not in text and "shards)" not in text
    assert not re.findall(r"\d(?:\.\d+)?e[-+]\d+", text), "a score printed in scientific notation"
    best = read_metrics(output)["best"]["bleu_4_approx"]
    assert f"best validation BLEU-4 (approx.) {best:.4f};" in printed.out
    assert re.search(
        r"epoch 1: loss \d+\.\d{4}, top-5 accuracy \d\.\d{4}, validation BLEU-4 \(approx\.\) \d\.\d{4}",
        printed.out,
    )


def test_short_training_lowers_the_loss(tmp_path: Path, data_cache: Path, train_script) -> None:
    output = tmp_path / "run"
    status = train_script.main(
        tiny_args(
            data_cache,
            output,
            "--epochs 6 --decoder-lr 1e-2 --max-val-samples 0 --checkpoint-steps 0 --report-to tensorboard",
        )
    )
    assert status == 0
    losses = [entry["loss"] for entry in read_metrics(output)["log"]]
    assert len(losses) == 6 * STEPS_PER_EPOCH
    start, end = np.mean(losses[:5]), np.mean(losses[-5:])
    assert end < 0.6 * start, f"loss went from {start:.3f} to {end:.3f}"
    assert list((output / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    # Without validation the folder holds the last weights, and loads like any model.
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(output / "model", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output / "model", trust_remote_code=True)
    ids = model.generate(**processor(images=Image.new("RGB", (32, 32), "white")), max_new_tokens=5)
    assert isinstance(processor.batch_decode(ids)[0], str)
    from transformers import pipeline

    captioner = pipeline("image-to-text", model=str(output / "model"), trust_remote_code=True)
    assert isinstance(captioner(Image.new("RGB", (32, 32), "white"))[0]["generated_text"], str)


@pytest.mark.slow
def test_tiny_set_is_overfit_to_its_exact_captions(tmp_path: Path, data_cache: Path, train_script) -> None:
    # Four pictures with one caption each, trained on and validated on the same pictures.
    rows = [dict(row, captions=row["captions"][:1]) for row in synthetic_rows(data_cache)[:4]]
    data = parquet_dataset(tmp_path / "data", rows, validation=rows)
    output = tmp_path / "run"
    status = train_script.main(
        parquet_args(
            data,
            output,
            "--batch-size 4 --captions-per-image 1 --dropout 0 --epochs 150 --checkpoint-steps 0 --log-steps 50",
            "--fine-tune-encoder --fine-tune-stages all --decoder-lr 1e-2 --encoder-lr 1e-2",
        )
    )
    assert status == 0
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(output / "model", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output / "model", trust_remote_code=True)
    images = [Image.open(io.BytesIO(row["image"])) for row in rows]
    ids = model.generate(**processor(images=images), num_beams=1, max_new_tokens=30)
    captions = processor.batch_decode(ids)
    expected = [" ".join(processor.tokenizer.normalize_caption(row["captions"][0])) for row in rows]
    assert captions == expected
    assert read_metrics(output)["best"]["bleu_4_approx"] == pytest.approx(1.0)


# ==================================================================================================
# Resuming, crash safety
# ==================================================================================================


def test_resume_in_the_middle_of_an_epoch_matches_an_uninterrupted_run(
    tmp_path: Path, data_cache: Path, reference_run: Path, train_script
) -> None:
    output = tmp_path / "run"
    common = "--epochs 3 --checkpoint-steps 4"
    assert train_script.main(tiny_args(data_cache, output, common, "--max-steps 13")) == 0
    first = read_metrics(output)
    assert first["stopped_because"] == "max_steps" and first["global_step"] == 13  # mid epoch 2
    state = json.loads((list_checkpoints(output / "checkpoints")[-1] / "training_state.json").read_text())
    assert (state["state"]["epoch"], state["state"]["batches_in_epoch"]) == (1, 3)

    # What a process killed while writing checkpoint 14 leaves behind: ignored, then cleaned up.
    stale = output / "checkpoints" / ".tmp-checkpoint-00000014-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    reset_accelerate()
    assert train_script.main(tiny_args(data_cache, output, common, "--resume-from-checkpoint latest")) == 0
    assert not stale.exists()
    assert read_metrics(output)["global_step"] == 3 * STEPS_PER_EPOCH
    assert_same_weights(final_weights(output), final_weights(reference_run))
    assert_same_weights(
        load_file(output / "model" / "model.safetensors"),
        load_file(reference_run / "model" / "model.safetensors"),
    )
    reference_losses = [entry["loss"] for entry in read_metrics(reference_run)["log"]]
    assert [entry["loss"] for entry in read_metrics(output)["log"]] == reference_losses


def test_resume_with_gradient_accumulation_matches(tmp_path: Path, data_cache: Path, train_script) -> None:
    common = "--epochs 2 --gradient-accumulation-steps 3 --checkpoint-steps 2 --max-val-samples 0"
    assert train_script.main(tiny_args(data_cache, tmp_path / "whole", common)) == 0
    reset_accelerate()
    # 10 batches per epoch in groups of 3, 3 and 3, then a group of 1: 4 steps per epoch; stop after step 5.
    assert train_script.main(tiny_args(data_cache, tmp_path / "split", common, "--max-steps 5")) == 0
    reset_accelerate()
    resumed = tiny_args(data_cache, tmp_path / "split", common, "--resume-from-checkpoint latest")
    assert train_script.main(resumed) == 0
    assert read_metrics(tmp_path / "whole")["global_step"] == 8
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "whole"))


def test_bf16_mixed_precision_on_the_cpu(tmp_path: Path, data_cache: Path, train_script) -> None:
    output = tmp_path / "run"
    assert train_script.main(tiny_args(data_cache, output, "--mixed-precision bf16 --max-steps 4")) == 0
    assert read_metrics(output)["global_step"] == 4
    assert (output / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_matches(
    tmp_path: Path, data_cache: Path, reference_run: Path, train_script
) -> None:
    output = tmp_path / "run"
    seed = int(time.time()) % 10_000
    delay = random.Random(seed).uniform(0.0, 0.5)
    # A checkpoint at every step, so that the kill often lands while one is being written.
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        *tiny_args(data_cache, output, "--epochs 3 --checkpoint-steps 1 --keep-checkpoints 2"),
    ]
    process = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(output / "checkpoints"):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill: nothing was tested"

    # Whatever the kill interrupted, every checkpoint that looks complete is complete.
    for checkpoint in list_checkpoints(output / "checkpoints"):
        load_file(checkpoint / "model.safetensors")
        json.loads((checkpoint / "training_state.json").read_text())
    killed_at = json.loads(
        (list_checkpoints(output / "checkpoints")[-1] / "training_state.json").read_text()
    )["state"]["global_step"]

    status = train_script.main(
        tiny_args(
            data_cache,
            output,
            "--epochs 3 --checkpoint-steps 1 --keep-checkpoints 2 --resume-from-checkpoint latest",
        )
    )
    assert status == 0, (
        f"resume failed (kill after {delay:.2f} s, seed {seed}, checkpoint at step {killed_at})"
    )
    assert_same_weights(final_weights(output), final_weights(reference_run))
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"

    def good(path: Path) -> None:
        (path / "model.safetensors").write_bytes(b"weights-1")

    first = write_checkpoint(folder, 1, good, {"state": {"global_step": 1}})

    def disk_full(path: Path) -> None:
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        CheckpointError, match=r"no space left.*previous checkpoint .*checkpoint-00000001 is intact"
    ):
        write_checkpoint(folder, 2, disk_full, {"state": {"global_step": 2}})
    assert list_checkpoints(folder) == [first]
    assert (first / "model.safetensors").read_bytes() == b"weights-1"
    assert [p.name for p in folder.iterdir()] == [first.name]  # no temporary folder left behind


def test_disk_full_while_training_is_a_clear_error(
    tmp_path: Path, data_cache: Path, train_script, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from accelerate import Accelerator

    original = Accelerator.save_state
    calls = []

    def failing_save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    output = tmp_path / "run"
    status = train_script.main(
        tiny_args(data_cache, output, "--epochs 1 --checkpoint-steps 3 --max-val-samples 0")
    )
    assert status == 1
    error = capsys.readouterr().err
    assert "no space left on the device" in error and "checkpoint-00000003 is intact" in error
    assert "Traceback" not in error
    assert [p.name for p in list_checkpoints(output / "checkpoints")] == ["checkpoint-00000003"]
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]


# What a full disk raises, measured on a full tmpfs: safetensors (weights) and torch.save (optimizer state).
SAFETENSORS_DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_SAVE_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def disk_full_case(where: str) -> tuple[str, str, Callable[[tuple], bool], Callable[[], BaseException]]:
    """(module, attribute, which calls fail, the error they raise) for each writer a training run uses."""
    from safetensors import SafetensorError

    def second_checkpoint(call: tuple) -> bool:  # (obj, file) of safe_save_file and torch.save
        return "checkpoint-00000006" in str(call[1])

    records = itertools.count(1)
    return {
        # accelerator.save_state: the weights (safetensors), then the optimizer and random states (torch.save)
        "checkpoint-weights": ("accelerate.utils.other", "safe_save_file", second_checkpoint,
                               lambda: SafetensorError(SAFETENSORS_DISK_FULL)),
        "checkpoint-optimizer": ("torch", "save", second_checkpoint, lambda: RuntimeError(TORCH_SAVE_DISK_FULL)),
        # the model folder's weights (save_pretrained)
        "model-folder": ("transformers.modeling_utils", "safe_save_file", lambda call: True,
                         lambda: SafetensorError(SAFETENSORS_DISK_FULL)),
        # TensorBoard's event file, written by a thread of its own: from its 15th record on (3 per step)
        "tensorboard": ("tensorboard.summary.writer.record_writer", "RecordWriter.write",
                        lambda call: next(records) >= 15, lambda: OSError(errno.ENOSPC, "No space left on device")),
        # metrics.json, written by the training loop (write_text_atomic(path, text))
        "metrics": ("show_attend_tell.training.loop", "write_text_atomic", lambda call: Path(call[0]).name == "metrics.json",
                    lambda: OSError(errno.ENOSPC, "No space left on device")),
    }[where]  # fmt: skip


# TensorBoard's writer thread must not die with a traceback of its own (pytest reports it as this warning).
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "checkpoint-weights",
            "could not write checkpoint .*checkpoint-00000006: no space left on the device",
        ),
        ("checkpoint-optimizer", "could not write checkpoint .*checkpoint-00000006: .*is the disk full\\?"),
        ("model-folder", "could not write the model folder .*model: no space left on the device"),
        ("tensorboard", "could not write the TensorBoard logs in .*logs: no space left on the device"),
        ("metrics", "could not write metrics.json: no space left on the device"),
    ],
)
def test_disk_full_anywhere_is_one_line_and_keeps_the_checkpoints(
    tmp_path: Path, data_cache: Path, train_script, monkeypatch: pytest.MonkeyPatch, capsys, where, message
) -> None:
    module_name, attribute, fails, error = disk_full_case(where)
    owner = importlib.import_module(module_name)
    if "." in attribute:
        class_name, attribute = attribute.split(".")
        owner = getattr(owner, class_name)
    original = getattr(owner, attribute)

    def failing(*call, **kwargs):
        if fails(call):
            raise error()
        return original(*call, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)
    output = tmp_path / "run"
    report = "--report-to tensorboard" if where == "tensorboard" else ""
    args = tiny_args(data_cache, output, "--epochs 1 --checkpoint-steps 3 --max-val-samples 0", report)
    assert train_script.main(args) == 1
    error_text = capsys.readouterr().err
    assert "Traceback" not in error_text and "Exception in thread" not in error_text, error_text
    (line,) = [line for line in error_text.splitlines() if "error:" in line]
    assert re.search(message, line), line
    kept = list_checkpoints(output / "checkpoints")
    assert kept and all(path.name <= "checkpoint-00000010" for path in kept)  # what was saved is still there
    if where.startswith("checkpoint"):
        assert [path.name for path in kept] == [
            "checkpoint-00000003"
        ] and "checkpoint-00000003 is intact" in line
    leftovers = [
        p for folder in (output, output / "checkpoints") for p in folder.iterdir() if p.name.startswith(".")
    ]
    assert not leftovers  # no half-written folder


REPLACE_KILL_HELPER = Path(__file__).resolve().parent / "replace_kill_helper.py"


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a model folder, loaded the way every script loads one (which checks the folder)."""
    from show_attend_tell.hub import load_model_and_processor

    model, _ = load_model_and_processor(folder)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_killed_while_replacing_the_model_folder(
    tmp_path: Path, data_cache: Path, train_script, capsys, mode: str
) -> None:
    from show_attend_tell.saving import exchange_paths

    output = tmp_path / "run"
    base = "--epochs 1 --checkpoint-steps 0 --max-val-samples 0"
    assert train_script.main(tiny_args(data_cache, output, base)) == 0
    model = output / "model"
    first = model_weights(model)
    if mode == "exchange":
        probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
        for folder in probe:
            folder.mkdir()
        if not exchange_paths(*probe):
            pytest.skip("this system or file system cannot exchange two paths atomically")

    # A second run (other seed, so other weights) is killed while it puts its model folder in place.
    second_run = tiny_args(data_cache, output, base, "--seed 8 --overwrite-output-dir")
    completed = subprocess.run(
        [sys.executable, str(REPLACE_KILL_HELPER), mode, *second_run],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-2000:]
    leftovers = sorted(p.name.split("-")[0] for p in output.iterdir() if p.name.startswith(".model."))
    if mode == "exchange":
        # No window: `model` is the new folder, complete; the old one waits under the staging name.
        assert leftovers == [".model.tmp"]
        second = model_weights(model)
        assert any(not torch.equal(first[name], second[name]) for name in first)
    else:
        # Two renames: the kill left no `model` (the window): the old folder is set aside, the new one staged.
        assert not model.exists() and leftovers == [".model.old", ".model.tmp"]
        second = first

    # The next start tidies up: the set-aside folder goes back in place, the leftover goes away. (It stops
    # at a dataset that is not one, right after preparing the output folder.)
    capsys.readouterr()
    (tmp_path / "dataset_broken.json").write_text("{}")
    args = split_options("--dataset", tmp_path / "dataset_broken.json", TINY_OPTIONS, "--output-dir", output)
    assert train_script.main([*args, "--overwrite-output-dir"]) == 1
    printed = capsys.readouterr()
    assert "cannot load --dataset" in printed.err
    assert ("put back" in printed.out) == (mode == "two-renames")
    assert not [p.name for p in output.iterdir() if p.name.startswith(".model.")]
    restored = model_weights(model)
    assert all(torch.equal(second[name], restored[name]) for name in second)


def test_failed_second_rename_puts_the_old_folder_back(
    tmp_path: Path, tiny_model, processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import show_attend_tell.saving as saving

    model = saving.save_model_folder(tmp_path / "model", tiny_model, processor)
    first = model_weights(model)
    monkeypatch.setattr(saving, "exchange_paths", lambda first, second: False)  # as on Windows or NFS
    original_replace = os.replace

    def failing_replace(source, destination):
        if Path(destination) == model and Path(source).name.startswith(".model.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return original_replace(source, destination)

    monkeypatch.setattr(saving.os, "replace", failing_replace)
    with torch.no_grad():
        next(iter(tiny_model.parameters())).add_(1.0)  # other weights: the old folder must win
    with pytest.raises(OSError, match="cross-device"):
        saving.save_model_folder(model, tiny_model, processor)
    restored = model_weights(model)
    assert all(torch.equal(first[name], restored[name]) for name in first)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left beside it


def test_a_checkpoint_set_aside_by_a_killed_replacement_is_put_back(tmp_path: Path) -> None:
    # What a kill between the two renames leaves when a run rewrites checkpoint 3 (e.g. resumed at step 3).
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder, 2, lambda path: (path / "model.safetensors").write_bytes(b"2"), {"state": {}})
    aside = write_checkpoint(
        folder, 3, lambda path: (path / "model.safetensors").write_bytes(b"3"), {"state": {}}
    )
    aside.rename(folder / ".checkpoint-00000003.old-1a2b3c4d")
    (folder / ".tmp-checkpoint-00000003-5e6f7a8b").mkdir()  # the unfinished new one
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-00000002"]
    remove_stale_temporaries(folder)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert (folder / "checkpoint-00000003" / "model.safetensors").read_bytes() == b"3"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-00000002", "checkpoint-00000003"]


def test_unwritable_output_dir_is_a_clear_error(
    tmp_path: Path, data_cache: Path, train_script, capsys
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = train_script.main(tiny_args(data_cache, blocker / "run", "--epochs 1"))
    assert status == 1
    error = capsys.readouterr().err
    assert "could not write to --output-dir" in error and "Traceback" not in error


# ==================================================================================================
# Flickr30K without network
# ==================================================================================================

FLICKR30K_DOWNLOAD = (
    "`hf download nlphuji/flickr30k --repo-type dataset --revision refs/convert/parquet --local-dir DIR`"
)


def test_flickr30k_from_a_downloaded_folder_with_data_dir(
    tmp_path: Path, data_cache: Path, train_script, capsys
) -> None:
    # The folder `hf download ... --local-dir DIR` makes, holding synthetic pictures in nlphuji's schema.
    rows = [{**row, "split": "train"} for row in synthetic_rows(data_cache)]
    rows += [{**row, "split": "val"} for row in synthetic_rows(data_cache, "validation")]
    folder = write_flickr30k_hub_folder(tmp_path / "flickr30k", rows)
    output = tmp_path / "run"
    args = split_options(
        "--dataset flickr30k --data-dir", folder, "--dataset-cache-dir", tmp_path / "hf-cache"
    )
    args += split_options(TINY_OPTIONS, "--output-dir", output, "--epochs 1 --checkpoint-steps 0")
    with pytest.warns(UserWarning, match="differ from Karpathy's Flickr30K split"):  # a 48-picture copy
        assert train_script.main(args) == 0, capsys.readouterr().err
    metrics = read_metrics(output)
    assert metrics["data"]["train_rows"] == 40 and metrics["validation"][0]["images"] == 8


def test_flickr30k_offline_is_one_line_in_the_scripts_words(tmp_path: Path) -> None:
    # As a user without network runs it: a fresh process with HF_HUB_OFFLINE=1 and an empty hub cache.
    command = [sys.executable, str(TRAIN_SCRIPT), "--dataset", "flickr30k", *split_options(TINY_OPTIONS)]
    completed = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "run")],
        env=subprocess_env(HF_HOME=str(tmp_path / "hf-home")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: cannot load --dataset flickr30k: could not download nlphuji/flickr30k")
    assert FLICKR30K_DOWNLOAD in lines[0] and "--data-dir DIR" in lines[0] and "Karpathy JSON" in lines[0]
    assert "load_caption_dataset" not in lines[0] and "data_dir=" not in lines[0]  # no Python calls


def revision_missing() -> Exception:
    from datasets.exceptions import DatasetNotFoundError

    return DatasetNotFoundError(
        "Revision 'refs/convert/parquet' doesn't exist for dataset 'nlphuji/flickr30k'"
    )


def cut_off_download() -> Exception:
    from huggingface_hub.utils import httpx

    return httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize(
    "failure",
    [
        revision_missing,
        cut_off_download,
        lambda: ConnectionResetError(104, "Connection reset by peer"),
        lambda: TimeoutError("The read operation timed out"),
    ],
    ids=["revision-missing", "download-cut-off", "connection-reset", "timeout"],
)
def test_flickr30k_hub_failures_are_one_line_with_the_offline_hint(
    tmp_path: Path, train_script, monkeypatch: pytest.MonkeyPatch, capsys, failure
) -> None:
    import show_attend_tell.data.flickr30k as flickr30k

    def failing_load_dataset(*args, **kwargs):
        raise failure()

    monkeypatch.setattr(flickr30k, "load_dataset", failing_load_dataset)
    args = split_options("--dataset flickr30k", TINY_OPTIONS, "--output-dir", tmp_path / "run")
    assert train_script.main(args) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert "could not download nlphuji/flickr30k (revision refs/convert/parquet)" in error
    assert " ".join(str(failure()).split()) in error  # the cause, in one line
    assert FLICKR30K_DOWNLOAD in error and "then pass --data-dir DIR" in error


# ==================================================================================================
# Feature cache
# ==================================================================================================


def test_cached_features_train_exactly_like_the_encoder(
    tmp_path: Path, data_cache: Path, reference_run: Path, train_script
) -> None:
    output = tmp_path / "run"
    assert (
        train_script.main(tiny_args(data_cache, output, "--epochs 3 --checkpoint-steps 4 --cache-features"))
        == 0
    )
    cached, uncached = read_metrics(output), read_metrics(reference_run)
    assert [e["loss"] for e in cached["log"]] == [e["loss"] for e in uncached["log"]]
    assert_same_weights(final_weights(output), final_weights(reference_run))
    # The first epoch fills the cache; later epochs never run the encoder.
    assert [e["images_encoded"] for e in cached["train"]] == [40, 0, 0]
    assert [e["images_encoded"] for e in uncached["train"]] == [40, 40, 40]
    (folder,) = (output / "feature_cache").iterdir()
    features = np.load(folder / "features.npy", mmap_mode="r")
    assert features.dtype == np.float16
    assert features.shape == (40, 16, 4, 4)  # the tiny ResNet's native grid at 32 px
    assert (np.load(folder / "status.npy") == FeatureCache.CACHED).all()


def test_feature_cache_reuse_and_bad_rows(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, "key", num_rows=3, grid_shape=(2, 2, 2))
    assert cache.statuses().tolist() == [0, 0, 0]
    grid = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2) / 3
    cache.write(torch.tensor([1]), grid)
    cache.mark_bad([2])
    reopened = FeatureCache.create(tmp_path, "key", num_rows=3, grid_shape=(2, 2, 2))  # found, not recreated
    assert reopened.statuses().tolist() == [0, FeatureCache.CACHED, FeatureCache.BAD]
    assert torch.equal(reopened.read(1), grid[0].half())


# ==================================================================================================
# Several processes
# ==================================================================================================

AUDIT_HOOK = """
import os, sys
_root, _log = os.environ.get("AUDIT_ROOT"), os.environ.get("AUDIT_LOG")
if _root and _log and "RANK" in os.environ:
    _root = os.path.realpath(_root)
    _out = open(f"{_log}.rank{os.environ['RANK']}", "a")
    def _hook(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not writing:
                return
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(path))
            if path.startswith(_root):
                _out.write(f"{event} {path}\\n")
                _out.flush()
    sys.addaudithook(_hook)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path: Path, data_cache: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    output = tmp_path / "run"
    audit = tmp_path / "writes"
    # On a machine without GPUs, `accelerate launch --cpu` starts one process; --multi_gpu with
    # ACCELERATE_USE_CPU starts N processes that talk over gloo (what train.py's error message says).
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(TRAIN_SCRIPT),
        *tiny_args(data_cache, output, "--max-steps 6 --checkpoint-steps 2 --keep-checkpoints 10"),
    ]
    env = subprocess_env(
        ACCELERATE_USE_CPU="1",
        AUDIT_ROOT=str(output),
        AUDIT_LOG=str(audit),
        PYTHONPATH=os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    checksums = dict(
        re.findall(r"process (\d)/2: finished, parameter checksum ([0-9a-f]{16})", result.stdout)
    )
    assert set(checksums) == {"0", "1"}, result.stdout
    assert checksums["0"] == checksums["1"]
    assert "x 2 process(es)" in result.stderr + result.stdout

    main_writes = Path(f"{audit}.rank0").read_text().splitlines()
    other_writes = Path(f"{audit}.rank1").read_text().splitlines() if Path(f"{audit}.rank1").exists() else []
    assert any("/checkpoints/" in line for line in main_writes)
    assert any("model" in line for line in main_writes)
    assert other_writes == [], f"process 1 wrote under the output folder: {other_writes[:5]}"
    # 40 pictures, 4 per batch, 2 processes: 5 steps per epoch (a checkpoint at its end too).
    steps = [p.name for p in list_checkpoints(output / "checkpoints")]
    assert steps == [f"checkpoint-{step:08d}" for step in (2, 4, 5, 6)]
    metrics = read_metrics(output)
    assert metrics["global_step"] == 6 and metrics["images_seen"] == 6 * 2 * 4


def test_every_process_gets_its_share_of_the_batches() -> None:
    single = EpochBatchSampler(37, 4, seed=1)
    single.set_epoch(3)
    shards = [EpochBatchSampler(37, 4, seed=1, num_processes=3, process_index=p) for p in range(3)]
    for shard in shards:
        shard.set_epoch(3)
    batches = [list(shard) for shard in shards]
    assert len({len(b) for b in batches}) == 1  # the same number of steps on every process
    flat = sorted(i for b in batches for batch in b for i in batch)
    assert set(flat) == set(range(37))  # every picture, a few twice to even out the last round
    assert sorted(i for batch in single for i in batch) == list(range(37))
    other_epoch = EpochBatchSampler(37, 4, seed=1)
    other_epoch.set_epoch(4)
    assert list(other_epoch) != list(single)
    single.set_epoch(3, start_batch=5)  # resuming: the same batches, minus the first five
    assert list(single) == EpochBatchSampler(37, 4, seed=1).epoch_batches(3)[5:]


# ==================================================================================================
# Bad data
# ==================================================================================================


def corrupt_rows(data_cache: Path) -> list[dict]:
    rows = synthetic_rows(data_cache)
    rows[3]["image"] = b"\x89PNG not really"
    rows[11]["image"] = b""
    rows[17]["image"] = png()[:40]  # truncated
    rows[5]["captions"] = []
    rows[23]["captions"] = ["", "   "]
    return rows


@pytest.mark.parametrize("check_images", ["200", "0"], ids=["found-up-front", "found-while-training"])
def test_bad_rows_are_skipped_and_counted(
    tmp_path: Path, data_cache: Path, train_script, capsys, check_images: str
) -> None:
    data = parquet_dataset(
        tmp_path / "data", corrupt_rows(data_cache), validation=synthetic_rows(data_cache, "validation")
    )
    output = tmp_path / "run"
    args = parquet_args(data, output, "--epochs 2 --checkpoint-steps 0 --check-images", check_images)
    assert train_script.main(args) == 0
    data_report = read_metrics(output)["data"]
    assert data_report["skipped_empty_captions"] == 2
    assert data_report["skipped_undecodable_images"] == 3
    assert sorted(data_report["undecodable_image_ids"]) == sorted(
        f"synthetic-train-{i:06d}" for i in (3, 11, 17)
    )
    output_text = capsys.readouterr()
    assert "3 undecodable images" in output_text.out + output_text.err


def karpathy_dataset(folder: Path, rows: list[dict], validation: list[dict]) -> Path:
    """Writes rows {"image": bytes, "captions": [...], "image_id": str} as a Karpathy split JSON + images/."""
    (folder / "images").mkdir(parents=True)
    entries = []
    for split, items in (("train", rows), ("val", validation)):
        for item in items:
            filename = f"{item['image_id']}.png"
            (folder / "images" / filename).write_bytes(item["image"])
            sentences = [{"raw": caption, "tokens": caption.split()} for caption in item["captions"]]
            entries.append(
                {"filename": filename, "imgid": item["image_id"], "split": split, "sentences": sentences}
            )
    path = folder / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return path


def test_karpathy_image_whose_captions_are_all_empty_is_skipped_and_counted(
    tmp_path: Path, data_cache: Path, train_script, capsys
) -> None:
    rows = synthetic_rows(data_cache)
    rows[6]["captions"] = ["", "  ", "", "", ""]
    path = karpathy_dataset(tmp_path / "data", rows, synthetic_rows(data_cache, "validation"))
    output = tmp_path / "run"
    assert train_script.main(parquet_args(path, output, "--epochs 1 --checkpoint-steps 0")) == 0
    data_report = read_metrics(output)["data"]
    assert data_report["train_rows"] == 40 and data_report["skipped_empty_captions"] == 1
    assert data_report["empty_caption_ids"] == [rows[6]["image_id"]]
    printed = capsys.readouterr()
    assert "39 of 40 train rows usable, 1 without captions skipped" in printed.out
    assert "skipped rows: 1 without captions" in printed.out  # the closing summary counts it too


@pytest.mark.parametrize("check_images", ["200", "0"], ids=["found-up-front", "found-while-training"])
def test_mostly_bad_images_stop_with_a_clear_error(
    tmp_path: Path, data_cache: Path, train_script, capsys, check_images: str
) -> None:
    rows = synthetic_rows(data_cache) * 2
    for i, row in enumerate(rows):
        row["image_id"] = f"row-{i}"
        if i % 4:
            row["image"] = b"garbage"
    data = parquet_dataset(tmp_path / "data", rows)
    args = parquet_args(data, tmp_path / "run", "--max-val-samples 0 --check-images", check_images)
    assert train_script.main(args) == 1
    error = capsys.readouterr().err
    assert "could not be decoded" in error or "cannot be decoded" in error
    assert "Traceback" not in error


def test_mostly_empty_captions_stop_before_training(
    tmp_path: Path, data_cache: Path, train_script, capsys
) -> None:
    rows = synthetic_rows(data_cache)
    for row in rows[:30]:
        row["captions"] = []
    data = parquet_dataset(tmp_path / "data", rows)
    args = parquet_args(data, tmp_path / "run", "--max-val-samples 0")
    assert train_script.main(args) == 1
    assert "30 of 40 rows of the train split have no caption" in capsys.readouterr().err


def test_collator_leaves_out_undecodable_images(data_cache: Path) -> None:
    from show_attend_tell import ShowAttendTellImageProcessor, ShowAttendTellTokenizer

    rows = synthetic_rows(data_cache)[:3]
    rows[1]["image"] = b"not an image"
    split = Dataset.from_dict(
        {
            "image": [{"bytes": r["image"], "path": None} for r in rows],
            "captions": [r["captions"] for r in rows],
            "image_id": [r["image_id"] for r in rows],
        },
        features=Features(
            {"image": ImageFeature(), "captions": list_feature(Value("string")), "image_id": Value("string")}
        ),
    )
    tokenizer = ShowAttendTellTokenizer.train_from_captions(
        [c for r in rows for c in r["captions"]], min_freq=1
    )
    data = CaptionTrainingDataset(
        split, [0, 1, 2], tokenizer, ShowAttendTellImageProcessor(size=32), captions_per_image=3
    )
    batch = CaptionBatchCollator(tokenizer.pad_token_id, 32)([data[0], data[1], data[2]])
    assert batch["rows"].tolist() == [0, 2]
    assert batch["bad_ids"] == [rows[1]["image_id"]]
    with pytest.raises(ImageLoadError) as refused:
        load_image(rows[1]["image"])
    # The reason in the words every entry point uses (load_image's), without the name: the id is beside it.
    assert batch["bad_reasons"] == [refused.value.reason] and "not an image file" in refused.value.reason
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 2 * 3  # 3 captions of each usable picture, grouped by picture
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    ends = (batch["labels"] == tokenizer.eos_token_id).sum(dim=1)
    assert ends.tolist() == [1] * 6  # every caption row ends once; padding is -100
    # Caption choice depends on (seed, epoch, row) only.
    data.set_epoch(1)
    again = CaptionTrainingDataset(
        split, [0, 1, 2], tokenizer, ShowAttendTellImageProcessor(size=32), captions_per_image=3
    )
    again.set_epoch(1)
    assert data[2]["captions"] == again[2]["captions"]


def test_row_check_samples_images_and_counts_captions(data_cache: Path) -> None:
    rows = corrupt_rows(data_cache)
    split = Dataset.from_dict(
        {
            "image": [{"bytes": r["image"], "path": None} for r in rows],
            "captions": [r["captions"] for r in rows],
            "image_id": [r["image_id"] for r in rows],
        },
        features=Features(
            {"image": ImageFeature(), "captions": list_feature(Value("string")), "image_id": Value("string")}
        ),
    )
    check = check_training_rows(split, split="train")
    assert len(check.empty_caption_ids) == 2 and len(check.bad_image_ids) == 3
    assert len(check.kept_rows) == 35
    sampled = check_training_rows(split, split="train", image_sample=4)
    assert sampled.sampled_images == 4 and len(sampled.kept_rows) >= 35
    with pytest.raises(DataError, match="empty"):
        check_training_rows(split.select([]), split="train")


# ==================================================================================================
# Bad arguments: clear errors before any work
# ==================================================================================================


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--batch-size": "0"}, "--batch-size must be positive"),
        ({"--batch-size": "1"}, "smaller than --captions-per-image"),
        ({"--dataset": "no/such/folder"}, "no such file or folder"),
        ({"--train-split": "training-set"}, "Unknown --train-split 'training-set'"),
        ({"--val-split": "train"}, "are both 'train'"),
        ({"--resume-from-checkpoint": "/no/such/checkpoint"}, "does not exist"),
        ({"--fine-tune-stages": "some"}, "--fine-tune-stages must be"),
        ({"--dataset-option": "num_train"}, "expects KEY=VALUE"),
        ({"--epochs": "-1"}, "--epochs must be positive"),
    ],
)
def test_bad_arguments_fail_before_any_work(
    tmp_path: Path, data_cache: Path, train_script, capsys, change: dict, message: str
) -> None:
    output = tmp_path / "run"
    args = tiny_args(data_cache, output)
    for option, value in change.items():
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    assert train_script.main(args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not output.exists()  # nothing was started


def test_resume_from_a_folder_that_is_not_a_checkpoint(
    tmp_path: Path, data_cache: Path, train_script, capsys
) -> None:
    not_a_checkpoint = tmp_path / "something"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("hello")
    args = tiny_args(data_cache, tmp_path / "run", "--resume-from-checkpoint", str(not_a_checkpoint))
    assert train_script.main(args) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_cache_features_needs_a_frozen_encoder(
    tmp_path: Path, data_cache: Path, train_script, capsys
) -> None:
    args = tiny_args(data_cache, tmp_path / "run", "--cache-features --fine-tune-encoder")
    assert train_script.main(args) == 2
    assert "--cache-features needs a frozen encoder" in capsys.readouterr().err


def test_an_earlier_run_is_not_overwritten_by_accident(
    tmp_path: Path, data_cache: Path, reference_run: Path, train_script, capsys
) -> None:
    assert train_script.main(tiny_args(data_cache, reference_run, "--epochs 1")) == 2
    assert "--resume-from-checkpoint latest" in capsys.readouterr().err


def test_resume_with_different_settings_is_refused(
    tmp_path: Path, data_cache: Path, reference_run: Path, train_script, capsys
) -> None:
    checkpoint = list_checkpoints(reference_run / "checkpoints")[0]
    args = tiny_args(data_cache, tmp_path / "run", "--resume-from-checkpoint", str(checkpoint))
    args[args.index("--batch-size") + 1] = "16"
    assert train_script.main(args) == 2
    assert "--batch-size: 8 then, 16 now" in capsys.readouterr().err


def test_resolve_checkpoint(tmp_path: Path) -> None:
    assert resolve_checkpoint("latest", tmp_path / "none") is None  # a fresh start
    folder = tmp_path / "checkpoints"
    first = write_checkpoint(
        folder, 5, lambda p: (p / "model.safetensors").write_bytes(b"w"), {"global_step": 5}
    )
    (folder / ".tmp-checkpoint-00000009-dead").mkdir()  # a save that was killed
    assert resolve_checkpoint("latest", folder) == first
    with pytest.raises(CheckpointError, match="newest is"):
        resolve_checkpoint(str(folder), folder)


# ==================================================================================================
# Attention localisation (the demo's measure)
# ==================================================================================================


def test_peak_in_box_maps_grid_cells_to_pixels() -> None:
    attention = torch.zeros(64)
    attention[2 * 8 + 5] = 1.0  # row 2, column 5 of an 8 x 8 grid: centre (44, 20) in a 64 px picture
    assert peak_in_box(attention, [40, 16, 48, 24], (64, 64))
    assert not peak_in_box(attention, [0, 0, 40, 64], (64, 64))
    assert cells_in_box([0, 0, 16, 16], (64, 64), 8) == 4
    result = attention_localisation(
        [["a", "red", "circle", "and", "star", "<end>"]],
        [torch.stack([attention] * 6)],
        [[{"shape": "circle", "box": [40, 16, 48, 24]}, {"shape": "square", "box": [0, 0, 8, 8]}]],
        [(64, 64)],
        ["circle", "square", "star"],
    )
    assert (result.hits, result.words, result.unmatched_words) == (1, 1, 1)
    assert result.chance == pytest.approx(1 / 64)
