"""
The same model on a CUDA device: generate() in float32 and bf16, and a bf16 training run of scripts/train.py.

These need a GPU and are skipped without one (CI has none); `benchmarks/gpu_check.sh` runs them on a GPU
machine together with the benchmarks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bf16_and_float32_logits, load_script, sharpened_tiny_model, unit_features
from transformers.modeling_outputs import BaseModelOutput

from show_attend_tell import ShowAttendTellForConditionalGeneration
from show_attend_tell.overlapped_generation import generate_overlapped

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# A tiny run of 40 synthetic pictures, 10 steps per epoch, in bf16 mixed precision.
TRAIN_OPTIONS = (
    "--dataset synthetic --dataset-option num_train=40 --dataset-option num_validation=8 "
    "--dataset-option num_test=0 --dataset-option image_size=32 --model-size tiny --seed 7 "
    "--min-word-freq 1 --batch-size 8 --captions-per-image 2 --decoder-lr 1e-2 --num-workers 0 "
    "--report-to none --log-steps 1 --epochs 6 --max-val-samples 0 --checkpoint-steps 0 "
    "--mixed-precision bf16"
)


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round float32 products to 10 bits of mantissa; the float32 comparisons need real float32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture
def model_pair():
    """The same sharpened tiny model on the CPU and on the GPU."""
    model = sharpened_tiny_model(40, std=0.5, seed=3)
    return model, copy.deepcopy(model).cuda()


def on_gpu(features: BaseModelOutput) -> BaseModelOutput:
    return BaseModelOutput(last_hidden_state=features.last_hidden_state.cuda())


def generate(model, features: BaseModelOutput, fast: bool = True, bf16: bool = False, **kwargs):
    device_type = model.device.type
    model.decoder.fast_inference = fast
    try:
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return model.generate(encoder_outputs=copy.deepcopy(features), **kwargs)
    finally:
        model.decoder.fast_inference = True


@pytest.mark.parametrize("num_beams", [1, 5])
def test_float32_generate_on_the_gpu_equals_the_cpu(model_pair, num_beams):
    cpu_model, gpu_model = model_pair
    features = unit_features(16, cpu_model.config, seed=5)
    kwargs = {"num_beams": num_beams, "max_new_tokens": 10, "length_penalty": 0.0}
    on_cpu = generate(cpu_model, features, **kwargs)
    fast = generate(gpu_model, on_gpu(features), **kwargs)
    plain = generate(gpu_model, on_gpu(features), fast=False, **kwargs)
    assert fast.device.type == "cuda"
    assert torch.equal(fast, plain), "the fast path differs from the plain step on the GPU"
    assert torch.equal(fast.cpu(), on_cpu), "the GPU decodes other captions than the CPU"


def test_bf16_generate_on_the_gpu_keeps_most_captions(model_pair):
    _, gpu_model = model_pair
    features = on_gpu(unit_features(32, gpu_model.config, seed=8))
    kwargs = {"num_beams": 5, "max_new_tokens": 10, "length_penalty": 0.0, "return_dict_in_generate": True}
    reference = generate(gpu_model, features, **kwargs)
    bf16 = generate(gpu_model, features, bf16=True, **kwargs)
    state = bf16.get("cache") if "cache" in bf16 else bf16.get("past_key_values")
    assert state.hidden.dtype == torch.float32, "the LSTM state must stay float32 under autocast"
    same = [torch.equal(a, b) for a, b in zip(bf16.sequences, reference.sequences, strict=True)]
    assert sum(same) >= 0.8 * len(same), f"{sum(same)} of {len(same)} captions identical"


def test_bf16_on_the_gpu_computes_each_rows_likeliest_logits_in_float32(model_pair):
    _, gpu_model = model_pair
    logits, float32 = bf16_and_float32_logits(gpu_model, images=4, rows_per_image=3, device="cuda")
    assert logits.dtype == torch.float32
    top = logits.topk(6, dim=-1).indices
    torch.testing.assert_close(logits.gather(-1, top), float32.gather(-1, top), atol=1e-5, rtol=1e-6)


def test_fused_attention_scores_on_the_gpu(model_pair):
    """The attention scores compiled into one kernel (Triton on a GPU) give the plain step's ids."""
    cpu_model, gpu_model = model_pair
    features = unit_features(16, cpu_model.config, seed=6)
    kwargs = {"num_beams": 5, "max_new_tokens": 10, "length_penalty": 0.0}
    plain = generate(gpu_model, on_gpu(features), fast=False, **kwargs)
    gpu_model.decoder.fuse_attention_scores = True
    fused = generate(gpu_model, on_gpu(features), **kwargs)
    assert torch.equal(fused, plain)
    assert generate(gpu_model, on_gpu(features), bf16=True, **kwargs).shape[0] == 16


def test_end_to_end_bf16_channels_last_on_the_gpu(model_pair):
    cpu_model, gpu_model = model_pair
    pixel_values = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = cpu_model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=6)
    assert torch.equal(
        gpu_model.generate(pixel_values=pixel_values.cuda(), num_beams=3, max_new_tokens=6).cpu(), reference
    )
    fast_model = gpu_model.to(memory_format=torch.channels_last)
    pixels = pixel_values.cuda().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast_model.generate(
            pixel_values=pixels,
            num_beams=3,
            max_new_tokens=6,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape[0] == 4 and out.sequences.device.type == "cuda"
    maps = out.attention_maps
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_overlapped_generation_on_the_gpu(model_pair, monkeypatch, bf16):
    """Encoder on a stream of its own, decoding on a more urgent one: each batch's ids are generate()'s."""
    _, gpu_model = model_pair
    if bf16:
        gpu_model = gpu_model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(4)
    layout = torch.channels_last if bf16 else torch.contiguous_format
    batches = [
        torch.randn(size, 3, 64, 64, generator=generator).contiguous(memory_format=layout).pin_memory()
        for size in (4, 3, 5)
    ]
    kwargs = {"num_beams": 3, "max_new_tokens": 8}
    streams = {"encoder": [], "generate": []}
    encoder_forward, generate_ = gpu_model.encoder.forward, gpu_model.generate

    def record(name, function):
        def recorded(*args, **kw):
            streams[name].append(torch.cuda.current_stream())
            return function(*args, **kw)

        return recorded

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        expected = [gpu_model.generate(pixel_values=pixels.cuda(), **kwargs) for pixels in batches]
        monkeypatch.setattr(gpu_model.encoder, "forward", record("encoder", encoder_forward))
        monkeypatch.setattr(gpu_model, "generate", record("generate", generate_))
        stream = ((p, i) for i, p in enumerate(batches))
        results = list(generate_overlapped(gpu_model, stream, overlap_streams=True, **kwargs))
    for (index, ids), want in zip(results, expected, strict=True):
        assert ids.device.type == "cuda"
        assert torch.equal(ids, want), f"batch {index}"
    caller = torch.cuda.current_stream()
    (encoding,), (decoding,) = set(streams["encoder"]), set(streams["generate"])
    assert len({caller, encoding, decoding}) == 3
    assert decoding.priority < encoding.priority  # lower is more urgent


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_captured_steps_on_the_gpu_replay_cuda_graphs_with_the_same_ids(model_pair, bf16):
    """
    `capture_steps`: the steps after the first run the inference step compiled with
    `torch.compile(mode="reduce-overhead")`, which torch records as a CUDA graph once per shape and replays. The
    same captions as without it, on two sets of pictures of one shape (one recording, replayed for both), every
    step's attention its own (a replay rewrites the previous replay's outputs unless they are copied out), no
    step left out of CUDA graphs, and only the step's 5 inputs copied into the graph (the weights stay where
    they are).
    """
    from torch._dynamo.utils import counters

    _, gpu_model = model_pair
    pictures = [on_gpu(unit_features(12, gpu_model.config, seed=seed)) for seed in (6, 7)]
    kwargs = {
        "num_beams": 4,
        "max_new_tokens": 10,
        "return_dict_in_generate": True,
        "output_scores": True,
        "output_attentions": True,
    }
    plain = [generate(gpu_model, features, bf16=bf16, **kwargs) for features in pictures]
    skipped = counters["inductor"]["cudagraph_skips"]
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    gpu_model.decoder.capture_steps = True
    try:
        captured = [generate(gpu_model, features, bf16=bf16, **kwargs) for features in pictures]
    finally:
        gpu_model.decoder.capture_steps = False
    assert gpu_model.decoder.inference_memo.compiled_step is not None
    assert counters["inductor"]["cudagraph_skips"] == skipped, "torch ran the step without a CUDA graph"
    # one recording for the shape, replayed for both sets of pictures, whose inputs copied at each replay are
    # the words, keys, features, hidden and cell: the weights, marked static, are read where they are
    copied = counters["inductor"]["cudagraph_recorded_non_static_inputs"] - recorded
    assert copied == 5, f"{copied} inputs copied into the recorded graphs (5 in one recording expected)"
    assert not torch.equal(captured[0].sequences, captured[1].sequences)
    for got, want in zip(captured, plain, strict=True):
        if bf16:  # inductor fuses the step's bf16 operations, which can round a near tie the other way
            same = [torch.equal(a, b) for a, b in zip(got.sequences, want.sequences, strict=True)]
            assert sum(same) >= 0.9 * len(same), f"{sum(same)} of {len(same)} captions identical"
            continue
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.attention_maps, want.attention_maps, atol=1e-5, rtol=0)
        assert not torch.equal(got.attention_maps[:, 1], got.attention_maps[:, 2])


def test_training_gradients_on_the_gpu_equal_the_cpu(model_pair):
    """The training forward (captions of different lengths, blocked attention scores) and its backward pass."""
    cpu_model, gpu_model = model_pair
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 0, 0, 0], [1, 4, 4, 6, 0, 0], [1, 7, 0, 0, 0, 0]])
    labels = torch.cat([input_ids[:, 1:], torch.zeros(4, 1, dtype=torch.long)], dim=1)
    labels[labels == 0] = -100
    labels[torch.arange(4), (labels != -100).sum(1)] = cpu_model.config.eos_token_id
    features = unit_features(2, cpu_model.config, seed=4).last_hidden_state

    def gradients(model, device):
        model.train().zero_grad()
        loss = model(
            encoder_outputs=(features.to(device),), input_ids=input_ids.to(device), labels=labels.to(device)
        ).loss
        loss.backward()
        return loss.detach().cpu(), [p.grad.cpu() for p in model.decoder.parameters()]

    cpu_loss, cpu_grads = gradients(cpu_model, "cpu")
    gpu_loss, gpu_grads = gradients(gpu_model, "cuda")
    torch.testing.assert_close(gpu_loss, cpu_loss, atol=1e-5, rtol=1e-5)
    for gpu_grad, cpu_grad in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(gpu_grad, cpu_grad, atol=1e-4, rtol=1e-4)


def test_bf16_training_run_on_the_gpu(tmp_path: Path):
    """scripts/train.py with Accelerate's bf16 mixed precision on the GPU: the loss falls, the model loads."""
    train = load_script("train")
    options = TRAIN_OPTIONS.split()
    output = tmp_path / "run"
    data = tmp_path / "data"
    torch.cuda.reset_peak_memory_stats()
    assert train.main([*options, "--dataset-cache-dir", str(data), "--output-dir", str(output)]) == 0
    assert torch.cuda.max_memory_allocated() > 0, "the run did not use the GPU"
    metrics = json.loads((output / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["log"]]
    start, end = np.mean(losses[:5]), np.mean(losses[-5:])
    assert end < 0.6 * start, f"loss went from {start:.3f} to {end:.3f}"
    model = ShowAttendTellForConditionalGeneration.from_pretrained(output / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
