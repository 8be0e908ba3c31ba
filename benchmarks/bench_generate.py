"""
Inference benchmark: how fast `generate()` captions images, measured against references in the same run.

Model: the full-size model (ResNet-101 encoder, 512-wide soft-attention LSTM decoder, vocabulary 10,000)
with random weights, on 256 x 256 images, beam 5, up to 20 new tokens. Random weights would make decoding
degenerate (a random ResNet-101's features reach 1e4 to 1e5, the LSTM saturates, and every caption has the
same length), so the model is given weights that decode like a trained one (see `build_model`): the
encoder's batch-norm statistics are calibrated on the benchmark's images, so its features are of unit
scale; the decoder's weights are scaled so that the words depend on the image and on the words before,
the chosen words have a probability typical of a trained captioner, and captions end at realistic lengths.
The run prints these properties (mean length, share of distinct captions, mean probability of the chosen
words) so that every figure can be judged against them.

What is measured (every figure is printed with its reference, the ratio, the target and PASS / FAIL):

- reference: a classic per-image beam search (`reference_beam_search.py`: batch 1, float32, features
  copied per beam, attention projection recomputed at every step), checked to return the same captions
  as `generate(num_beams=5, length_penalty=0.0)` in float32;
- decoder-only throughput (on precomputed encoder outputs): `generate()` vs the reference;
- end-to-end images/s (`--dtype`, channels_last encoder) vs the reference end to end;
- encoder-only images/s at the same batch and dtype, and end-to-end / encoder-only;
- with `--overlap-batches N` (the default on a GPU): a stream of N batches through `generate_overlapped`,
  each batch's encoder pass overlapping the decoding of the one before, against encoder-only, and its
  ids against `generate(pixel_values)`'s;
- decoder batching: decoder images/s at `--batch-size` vs one image at a time;
- peak resident memory while captioning a batch of 32 (in a fresh process);
- bf16 vs float32: share of the images whose ids are identical (end to end and decoder only);
- peer: `VisionEncoderDecoderModel` (ViT-base/16 + GPT-2 base, random weights, built from configs),
  same beam, batch, dtype, threads and number of new tokens.

Timings are noisy when other processes share the CPU: measurements are interleaved, repeated
(`--repeats`), and reported as medians of ratios taken within each repetition.

Run (CPU, 2 threads, the README's table):

    .venv/bin/python benchmarks/bench_generate.py --threads 2 --json-out bench_generate.json

Smoke test (a minute): `--quick`. On a machine with a GPU the device is picked automatically
(bfloat16, batch 256 unless given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_outputs import BaseModelOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import calibrate_batchnorm, precision, setting, synchronize
from reference_beam_search import classic_beam_search

import show_attend_tell.fast_decoding_show_attend_tell as fast_decoding
from show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration
from show_attend_tell.overlapped_generation import generate_overlapped

IMAGE_SIZE = 256
SEED = 0
REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "outputs" / "demo" / "run" / "model"  # what `make demo` trains

# Decoder weight scales (standard deviation times sqrt(fan-in)); chosen once so that decoding behaves like a
# trained captioner's (see the module docstring); the run prints the resulting statistics.
DECODER_GAINS = {
    "embedding": 1.0,  # absolute standard deviation of the word vectors
    "attention": 1.5,
    "score": 4.0,
    "init": 1.0,
    "gate": 1.0,
    "lstm_input": 1.5,
    "lstm_recurrent": 0.8,
    "output": 24.0,
}
# <end>'s logit is END_BIAS + END_WEIGHT * tanh(LENGTH_RATE * words so far): sets the caption lengths
END_BIAS, END_WEIGHT, LENGTH_RATE = -10.0, 60.0, 0.08
RESIDUAL_GAIN = 0.1  # scale of the encoder's residual branches (see build_model)


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


def make_images(count: int, seed: int = SEED, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Normalised 'images' with structure at several scales (colour fields, blobs, texture), (count, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(count, 3, 4, 4, generator=generator), size=size, mode="bicubic")
    middle = F.interpolate(torch.randn(count, 3, 16, 16, generator=generator), size=size, mode="bilinear")
    fine = torch.randn(count, 3, size, size, generator=generator)
    return (coarse + 0.5 * middle + 0.25 * fine).clamp(-2.5, 2.5)


@torch.no_grad()
def build_model(vocab_size: int, seed: int = SEED) -> ShowAttendTellForConditionalGeneration:
    """The full-size model with weights that decode like a trained one (float32, CPU, eval mode)."""
    torch.manual_seed(seed)
    config = ShowAttendTellConfig(vocab_size=vocab_size)
    model = ShowAttendTellForConditionalGeneration(config).eval()
    # Each residual branch enters its block scaled by RESIDUAL_GAIN (the weight of its last batch-norm). At
    # 1, a random ResNet-101 is chaotic: 1% of pixel noise changes its features by ~40%, and bf16 by ~35%;
    # at 0.1 these are 5% and 3%, closer to a trained network, whose captions do not flip under such noise.
    for stage in model.encoder.resnet.encoder.stages:
        for block in stage.layers:
            block.layer[-1].normalization.weight.fill_(RESIDUAL_GAIN)
    calibrate_batchnorm(model.encoder.resnet, make_images(16, seed=seed + 1000))

    features = model.encoder(make_images(16, seed=seed + 2000)).last_hidden_state
    set_decoder_weights(model, feature_statistics(features), seed=seed)
    return model


def feature_statistics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and spread of (images, num_pixels, channels) features: over all grid positions
    ('pixel_'), and of the images' mean features ('image_', how images differ from one another)."""
    image_means = features.mean(dim=1)
    return {
        "pixel_mean": features.mean(dim=(0, 1)),
        "pixel_std": features.std(dim=(0, 1)).clamp_min(1e-3),
        "image_mean": image_means.mean(dim=0),
        "image_std": image_means.std(dim=0).clamp_min(1e-3),
    }


@torch.no_grad()
def set_decoder_weights(
    model: ShowAttendTellForConditionalGeneration,
    statistics: dict[str, torch.Tensor],
    gains: dict[str, float] = DECODER_GAINS,
    end_bias: float = END_BIAS,
    end_weight: float = END_WEIGHT,
    length_rate: float = LENGTH_RATE,
    seed: int = SEED,
) -> None:
    """
    Gaussian decoder weights of the given gains (standard deviation x sqrt(fan-in)). The layers that read
    the features see them standardised: the attention per grid position (so that it picks out positions),
    the initial state per image (so that captions start from what distinguishes the image).
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed + 3000)
    decoder = model.decoder

    def gaussian(shape: tuple[int, ...], gain: float, fan_in: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * (gain / fan_in**0.5)

    def set_linear(layer: torch.nn.Linear, gain: float, standardise: str | None = None) -> None:
        weight = gaussian(tuple(layer.weight.shape), gain, layer.in_features)
        bias = torch.zeros(layer.out_features)
        if standardise:  # layer(f) = W (f - mean) / std
            weight = weight / statistics[standardise + "_std"]
            bias = bias - weight @ statistics[standardise + "_mean"]
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)

    decoder.embedding.weight.copy_(torch.randn(decoder.embedding.weight.shape, generator=generator))
    decoder.embedding.weight.mul_(gains["embedding"])
    set_linear(decoder.attention.encoder_projection, gains["attention"], standardise="pixel")
    set_linear(decoder.attention.decoder_projection, gains["attention"])
    set_linear(decoder.attention.score, gains["score"])
    set_linear(decoder.init_hidden, gains["init"], standardise="image")
    set_linear(decoder.init_cell, gains["init"], standardise="image")
    set_linear(decoder.gate, gains["gate"])
    lstm = decoder.lstm
    embed_dim = config.embed_dim
    weight_ih = gaussian(tuple(lstm.weight_ih.shape), gains["lstm_input"], lstm.input_size)
    weight_ih[:, embed_dim:] /= statistics["pixel_std"]  # the context is an average of features
    lstm.weight_ih.copy_(weight_ih)
    lstm.weight_hh.copy_(gaussian(tuple(lstm.weight_hh.shape), gains["lstm_recurrent"], lstm.hidden_size))
    lstm.bias_ih.zero_()
    lstm.bias_hh.zero_()
    set_linear(decoder.output_layer, gains["output"])
    decoder.output_layer.bias[config.pad_token_id] = -1e4  # never generated
    decoder.output_layer.bias[config.decoder_start_token_id] = -1e4

    # Caption length, as trained LSTMs track it: unit 0 of the LSTM counts the words (its gates open,
    # its cell grows by `length_rate` per word, its output is tanh(length_rate * words)), and only <end>
    # reads it, so <end> becomes likelier as the caption grows.
    size, counter = lstm.hidden_size, 0
    rows = [counter + gate * size for gate in range(4)]  # input, forget, cell and output gates of unit 0
    lstm.weight_ih[rows] = 0.0
    lstm.weight_hh[rows] = 0.0
    lstm.weight_hh[:, counter] = 0.0
    lstm.bias_ih[rows] = torch.tensor([20.0, 20.0, math.atanh(length_rate), 20.0])
    decoder.init_hidden.weight[counter] = 0.0
    decoder.init_hidden.bias[counter] = 0.0
    decoder.init_cell.weight[counter] = 0.0
    decoder.init_cell.bias[counter] = 0.0
    for layer in (decoder.attention.decoder_projection, decoder.gate, decoder.output_layer):
        layer.weight[:, counter] = 0.0
    decoder.output_layer.weight[config.eos_token_id] = 0.0
    decoder.output_layer.weight[config.eos_token_id, counter] = end_weight
    decoder.output_layer.bias[config.eos_token_id] = end_bias


def generated_tokens(sequence: torch.Tensor, eos: int) -> list[int]:
    """The words of one generated row: after <start>, up to and including the first <end>."""
    tokens = sequence.tolist()[1:]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# --------------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------------


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def summarise(rates: list[float], statistic: str) -> float:
    """Images/s over the repetitions: the best (least disturbed by other processes) or the median."""
    if not rates:
        return float("nan")
    return max(rates) if statistic == "best" else statistics.median(rates)


class Captioner:
    """The ways of captioning that are compared; each returns ids (one row per image)."""

    def __init__(self, model, fast_model, args, device: torch.device) -> None:
        self.model, self.fast_model, self.args, self.device = model, fast_model, args, device
        self.generate_kwargs = {
            "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
            "length_penalty": 0.0,
        }

    def _model_and_layout(
        self, dtype: str
    ) -> tuple[ShowAttendTellForConditionalGeneration, torch.memory_format]:
        """What runs the encoder at `dtype`: bf16 reads channels_last images with the channels_last model."""
        if dtype == "bf16":
            return self.fast_model, torch.channels_last
        return self.model, torch.contiguous_format

    def ours_end_to_end(self, pixel_values: torch.Tensor, dtype: str, **kwargs) -> torch.Tensor:
        model, layout = self._model_and_layout(dtype)
        pixel_values = pixel_values.contiguous(memory_format=layout)
        with torch.inference_mode(), precision(dtype, self.device):
            return model.generate(pixel_values=pixel_values, **self.generate_kwargs, **kwargs)

    def ours_overlapped(self, batches: list[torch.Tensor], dtype: str) -> list[torch.Tensor]:
        """A stream of batches, each batch's encoder pass overlapping the decoding of the one before."""
        model, layout = self._model_and_layout(dtype)
        batches = [pixels.contiguous(memory_format=layout) for pixels in batches]
        with torch.inference_mode(), precision(dtype, self.device):
            stream = ((pixels, None) for pixels in batches)
            overlapped = generate_overlapped(model, stream, overlap_streams=True, **self.generate_kwargs)
            return [ids for _, ids in overlapped]

    def ours_decoder(self, features: torch.Tensor, dtype: str, **kwargs) -> torch.Tensor:
        with torch.inference_mode(), precision(dtype, self.device):
            return self.model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=features), **self.generate_kwargs, **kwargs
            )

    def ours_encoder(self, pixel_values: torch.Tensor, dtype: str) -> torch.Tensor:
        model, layout = self._model_and_layout(dtype)
        pixel_values = pixel_values.contiguous(memory_format=layout)
        with torch.inference_mode(), precision(dtype, self.device):
            return model.encoder(pixel_values).last_hidden_state

    def reference(self, pixel_values: torch.Tensor) -> tuple[list[list[int]], float, float]:
        """Classic captioning, one image at a time, float32: ids, encoder seconds, decoder seconds."""
        encoder_time = decoder_time = 0.0
        captions = []
        for image in pixel_values:
            seconds, features = timed(
                lambda image=image: self._reference_encode(image.unsqueeze(0)), self.device
            )
            encoder_time += seconds
            seconds, caption = timed(lambda features=features: self._reference_decode(features), self.device)
            decoder_time += seconds
            captions.append(caption.tokens)
        return captions, encoder_time, decoder_time

    def reference_decoder(self, features: torch.Tensor) -> tuple[list[list[int]], list[int]]:
        """Classic decoding of each image's features: captions, and the steps each search ran."""
        captions, steps = [], []
        for one in features:
            caption = self._reference_decode(one)
            captions.append(caption.tokens)
            steps.append(caption.steps)
        return captions, steps

    def _reference_encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encoder(pixel_values).last_hidden_state

    def _reference_decode(self, features: torch.Tensor):
        return classic_beam_search(
            self.model,
            features,
            num_beams=self.args.num_beams,
            max_new_tokens=self.args.max_new_tokens,
            search=self.args.reference_search,
        )


# --------------------------------------------------------------------------------------------------
# What each piece of the fast path buys (with and without it, same run)
# --------------------------------------------------------------------------------------------------


def _attention_scores_into_fresh_memory(attention_scores_into, scratch, *args):
    """`attention_scores_into` given no buffer to reuse: the intermediate is allocated at every step."""
    return attention_scores_into(None, *args)


def fast_path_pieces(
    model, device: torch.device, compiled: bool = True
) -> dict[str, tuple[str, contextlib.AbstractContextManager]]:
    """
    Each piece of `fast_decoding_show_attend_tell`, as what turns it off: {name: (what it is, a context
    factory in which generate() runs without it)}. Pieces that are off by default are turned on instead,
    and their ratio reads the other way (see `measure_pieces`).
    """
    decoder = model.decoder
    pieces = {
        "fast path (all of it)": (
            "the plain step instead",
            lambda: setting(decoder, "fast_inference", False),
        ),
        "prepacked bf16 weights": (
            "oneDNN-prepacked weights (CPU, bf16)",
            lambda: setting(fast_decoding, "PACKED_BF16_PRODUCTS", False),
        ),
        "attention scores in a reused buffer": (
            "fresh memory for the (rows, num_pixels, attention_dim) intermediate at every step",
            lambda: setting(
                fast_decoding,
                "attention_scores_into",
                functools.partial(_attention_scores_into_fresh_memory, fast_decoding.attention_scores_into),
            ),
        ),
        "float32 logits of the likeliest words": (
            "bf16 exactness, a cost (ratio < 1 means it costs)",
            lambda: setting(fast_decoding, "exact_top_logits", lambda logits, *args: logits.float()),
        ),
    }
    if compiled:  # the first call compiles (tens of seconds on a CPU)
        pieces["fused attention scores (torch.compile, off by default)"] = (
            "on instead of off",
            lambda: setting(decoder, "fuse_attention_scores", True),
        )
    if device.type == "cuda":  # the step compiled with torch.compile(mode="reduce-overhead"): CUDA graphs
        pieces["captured steps (CUDA graphs, off by default)"] = (
            "on instead of off",
            lambda: setting(decoder, "capture_steps", True),
        )
    return pieces


def measure_pieces(captioner: Captioner, features, pixel_values, args, device: torch.device) -> dict:
    """
    For each piece, decoder-only `generate()` with and without it, interleaved (the order alternating from one
    repetition to the next), plus the encoder alone: the ratio is time without / time with (above 1: the
    piece pays). End to end, a decoder piece saves the same seconds on top of the encoder's time, so its
    end-to-end ratio is (encoder + decoder without) / (encoder + decoder with), from the same repetitions.
    """
    model = captioner.model
    pieces = fast_path_pieces(model, device, compiled=args.fused_attention)
    batch = features.shape[0]
    for _, turn_off in pieces.values():  # warm-up: weights prepared, kernels compiled, in both settings
        with turn_off():
            captioner.ours_decoder(features, args.dtype)
    captioner.ours_decoder(features, args.dtype)
    times = {name: {"with": [], "without": [], "encoder": []} for name in pieces}
    for repeat in range(args.repeats):
        for name, (_, turn_off) in pieces.items():
            order = ("with", "without") if repeat % 2 == 0 else ("without", "with")
            for which in order:
                if which == "with":
                    seconds, _ = timed(lambda: captioner.ours_decoder(features, args.dtype), device)
                else:
                    with turn_off():
                        seconds, _ = timed(lambda: captioner.ours_decoder(features, args.dtype), device)
                times[name][which].append(seconds)
            seconds, _ = timed(lambda: captioner.ours_encoder(pixel_values, args.dtype), device)
            times[name]["encoder"].append(seconds)
        print(f"  pieces: repeat {repeat + 1}/{args.repeats} done", flush=True)
    results = {}
    print(
        f"\nWhat each piece buys: time without / time with (> 1: it pays), batch {batch}, {args.dtype}, beam "
        f"{args.num_beams}, {args.threads} thread(s); median [min, max] of {args.repeats} interleaved pairs"
    )
    print(f"  {'piece':<56} {'decoder-only':>24} {'end to end':>24}")
    for name, (what, _) in pieces.items():
        entry = times[name]
        decoder_ratios = [w / o for o, w in zip(entry["with"], entry["without"], strict=True)]
        e2e_ratios = [
            (e + w) / (e + o)
            for o, w, e in zip(entry["with"], entry["without"], entry["encoder"], strict=True)
        ]
        if "instead of off" in what:  # off by default: the ratio is time off / time on, read the same way
            decoder_ratios = [1 / r for r in decoder_ratios]
            e2e_ratios = [1 / r for r in e2e_ratios]
        results[name] = {
            "switch": what,
            "decoder_ratio": statistics.median(decoder_ratios),
            "end_to_end_ratio": statistics.median(e2e_ratios),
            "decoder_ratios": decoder_ratios,
            "end_to_end_ratios": e2e_ratios,
            "seconds": entry,
        }

        def cell(ratios: list[float]) -> str:
            return f"{statistics.median(ratios):.3f} [{min(ratios):.2f}, {max(ratios):.2f}]"

        print(f"  {name:<56} {cell(decoder_ratios):>24} {cell(e2e_ratios):>24}   ({what})")
    return results


def rows_to_captions(ids: torch.Tensor, eos: int) -> list[list[int]]:
    return [generated_tokens(row, eos) for row in ids.cpu()]


def fmt_gaps(gaps: list[float]) -> str:
    if not gaps:
        return "(none)"
    return f"median {statistics.median(gaps):.3f} / max {max(gaps):.3f} nats"


def spread(values: list[float]) -> str:
    """The range of a figure over the repetitions, e.g. '0.79 to 0.84'."""
    return f"{min(values):.2f} to {max(values):.2f}"


def share_identical(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


@torch.no_grad()
def caption_log_likelihood(model, features: torch.Tensor, tokens: list[int]) -> float:
    """log p(tokens | image) under the float32 model, teacher-forced; features (1, num_pixels, encoder_dim)."""
    start = model.config.decoder_start_token_id
    input_ids = torch.tensor([[start, *tokens[:-1]]], device=features.device)
    with torch.autocast(features.device.type, enabled=False):
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=features), input_ids=input_ids
        ).logits
    log_probs = logits.float()[0].log_softmax(-1)
    return sum(log_probs[t, token].item() for t, token in enumerate(tokens))


def likelihood_gaps(
    model, features: torch.Tensor, expected: list[list[int]], other: list[list[int]]
) -> list[float]:
    """For each image whose captions differ: how much less likely (float32, in nats) `other`'s caption is."""
    return [
        caption_log_likelihood(model, features[i : i + 1], a)
        - caption_log_likelihood(model, features[i : i + 1], b)
        for i, (a, b) in enumerate(zip(expected, other, strict=True))
        if a != b
    ]


@torch.no_grad()
def chosen_word_probability(model, features: torch.Tensor, captions: list[list[int]]) -> float:
    """Mean probability the model gives each word of its own captions (teacher-forced, float32)."""
    start = model.config.decoder_start_token_id
    probabilities = []
    for image, tokens in enumerate(captions):
        input_ids = torch.tensor([[start, *tokens[:-1]]], device=features.device)
        one = BaseModelOutput(last_hidden_state=features[image : image + 1])
        logits = model(encoder_outputs=one, input_ids=input_ids).logits.float()[0]
        positions = torch.arange(len(tokens), device=logits.device)
        probs = logits.softmax(-1)[positions, torch.tensor(tokens, device=logits.device)]
        probabilities.extend(probs.tolist())
    return sum(probabilities) / len(probabilities)


# --------------------------------------------------------------------------------------------------
# Peak resident memory (a fresh process, so earlier measurements do not count)
# --------------------------------------------------------------------------------------------------


def _read_status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_child(args) -> None:
    """Loads the benchmark model, captions one batch and prints its resident memory as JSON."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = ShowAttendTellConfig(vocab_size=args.vocab_size)
    with torch.device("meta"):  # no random initialisation: the weights come from the file
        model = ShowAttendTellForConditionalGeneration(config)
    model.load_state_dict(torch.load(args.rss_child, weights_only=True, map_location="cpu"), assign=True)
    model = model.eval().to(device)
    model.decoder.fuse_attention_scores = args.fused_attention
    model.decoder.capture_steps = args.capture_steps
    if args.dtype == "bf16":
        model = model.to(memory_format=torch.channels_last)
    pixel_values = make_images(args.rss_batch_size, seed=SEED + 1).to(device)
    if args.dtype == "bf16":
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    generate_kwargs = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "length_penalty": 0.0,
    }
    if args.fused_attention:  # compiled once per process, before the measured batch
        with torch.inference_mode(), precision(args.dtype, device):
            model.generate(pixel_values=pixel_values[:2], **generate_kwargs)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so that 'before' is what is in use
    before = _read_status_kib("VmRSS")
    reset = False
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak (VmHWM) to the current resident size
        reset = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), precision(args.dtype, device):
        model.generate(pixel_values=pixel_values, **generate_kwargs)
    peak = _read_status_kib("VmHWM") if reset else None
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the whole run's peak
    result = {"rss_before_mib": (before or 0) / 1024, "peak_rss_mib": peak / 1024, "peak_reset": reset}
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("RSS_RESULT " + json.dumps(result))


def measure_peak_rss(model, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "weights.pt"
        torch.save(model.state_dict(), weights)
        command = [
            sys.executable,
            __file__,
            "--rss-child",
            str(weights),
            "--rss-batch-size",
            str(args.rss_batch_size),
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
            "--device",
            args.device,
            "--vocab-size",
            str(args.vocab_size),
            "--num-beams",
            str(args.num_beams),
            "--max-new-tokens",
            str(args.max_new_tokens),
            *([] if args.fused_attention else ["--no-fused-attention"]),
            *(["--capture-steps"] if args.capture_steps else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith("RSS_RESULT "):
            return json.loads(line[len("RSS_RESULT ") :])
    raise RuntimeError(f"memory measurement failed:\n{completed.stdout}\n{completed.stderr}")


# --------------------------------------------------------------------------------------------------
# Peer: ViT-base/16 + GPT-2 base
# --------------------------------------------------------------------------------------------------


def build_peer(device: torch.device):
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    torch.manual_seed(SEED)
    encoder = ViTConfig()  # ViT-base/16, 224 x 224
    decoder = GPT2Config(is_decoder=True, add_cross_attention=True)  # GPT-2 base
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    peer = VisionEncoderDecoderModel(config=config).eval().to(device)
    special = decoder.eos_token_id
    peer.config.decoder_start_token_id = peer.config.pad_token_id = peer.config.eos_token_id = special
    return peer, encoder.image_size


def peer_generate(peer, pixel_values: torch.Tensor, dtype: str, args, device: torch.device) -> torch.Tensor:
    special = peer.config.eos_token_id
    with torch.inference_mode(), precision(dtype, device):
        return peer.generate(
            pixel_values=pixel_values,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            decoder_start_token_id=special,
            pad_token_id=special,
            eos_token_id=special,
        )


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def captions_with_rounded_decoder_weights(
    model, features: torch.Tensor, generate_kwargs: dict
) -> list[list[int]]:
    """float32 decoding by a copy of the model whose decoder weights are rounded to bf16: what any bf16
    computation starts from, so its agreement with float32 bounds that of every bf16 implementation."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.decoder.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    with torch.inference_mode():
        ids = rounded.generate(encoder_outputs=BaseModelOutput(last_hidden_state=features), **generate_kwargs)
    return rows_to_captions(ids, model.config.eos_token_id)


def trained_model_agreement(path: Path, args, device: torch.device) -> dict:
    """
    bf16 against float32 on a trained model: the model `make demo` trains (or `--trained-model`), this
    repository's code, on the synthetic test pictures it never saw in training (`--trained-images`, at
    `--trained-image-size`). Same generate() settings as the rest of the benchmark.
    """
    from show_attend_tell import ShowAttendTellProcessor
    from show_attend_tell.data import make_synthetic_dataset

    model = ShowAttendTellForConditionalGeneration.from_pretrained(path).eval().to(device)
    processor = ShowAttendTellProcessor.from_pretrained(path)
    test = make_synthetic_dataset(
        0, 0, args.trained_images, image_size=args.trained_image_size, seed=0, use_cache=False
    )["test"]
    pixel_values = processor(images=list(test["image"]), return_tensors="pt")["pixel_values"].to(device)
    generate_kwargs = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "length_penalty": 0.0,
    }
    eos = model.config.eos_token_id
    fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    captions = {}
    with torch.inference_mode():
        features = model.encoder(pixel_values).last_hidden_state
        for dtype in ("fp32", "bf16"):
            with precision(dtype, device):
                ids = fast_model.generate(
                    pixel_values=pixel_values.contiguous(memory_format=torch.channels_last), **generate_kwargs
                )
                captions[f"{dtype}_e2e"] = rows_to_captions(ids, eos)
                ids = model.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=features), **generate_kwargs
                )
                captions[f"{dtype}_decoder"] = rows_to_captions(ids, eos)
    return {
        "model": str(path),
        "config": {key: getattr(model.config, key) for key in ("vocab_size", "encoder_dim", "decoder_dim")},
        "images": len(test),
        "image_size": args.trained_image_size,
        "bf16_vs_fp32_end_to_end": share_identical(captions["bf16_e2e"], captions["fp32_e2e"]),
        "bf16_vs_fp32_decoder": share_identical(captions["bf16_decoder"], captions["fp32_decoder"]),
        "fp32_decoder_with_bf16_rounded_weights": share_identical(
            captions_with_rounded_decoder_weights(model, features, generate_kwargs), captions["fp32_decoder"]
        ),
        "mean_length": statistics.mean(len(c) for c in captions["fp32_e2e"]),
    }


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = next((f for f in cpuinfo if f.startswith("flags")), "")
                return name + (" (AVX-512 BF16)" if "avx512_bf16" in flags else "")
    return platform.processor() or "CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per generate() call (32 on CPU, 256 on GPU)"
    )
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="precision of 'ours'")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of every measurement")
    parser.add_argument(
        "--statistic",
        choices=["best", "median"],
        default="best",
        help="how repetitions are summarised: the best images/s (the default: other processes only ever "
        "slow a measurement down) or the median",
    )
    parser.add_argument("--reference-images", type=int, default=16, help="images captioned by the reference")
    parser.add_argument("--single-images", type=int, default=8, help="images for the one-at-a-time figure")
    parser.add_argument("--reference-search", choices=["fixed", "shrinking"], default="fixed")
    parser.add_argument(
        "--small-batch-size",
        type=int,
        default=None,
        help="end-to-end / encoder-only also at this batch (16 on a CPU; 0: not measured)",
    )
    parser.add_argument(
        "--overlap-batches",
        type=int,
        default=None,
        help="also caption a stream of this many batches with `generate_overlapped` (the encoder of the next "
        "batch runs while this one is decoded), against encoder-only (8 on a GPU; 0: not measured, the default "
        "on a CPU, where the two run one after the other anyway)",
    )
    parser.add_argument("--rss-batch-size", type=int, default=32)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--no-fused-attention",
        dest="fused_attention",
        action="store_false",
        help="ours without `model.decoder.fuse_attention_scores` (the attention scores compiled into one kernel)",
    )
    parser.add_argument(
        "--capture-steps",
        action="store_true",
        help="ours with `model.decoder.capture_steps` (the decoding step compiled with torch.compile(mode="
        "'reduce-overhead'): on a GPU each step shape recorded once as a CUDA graph and replayed; "
        "checked against the plain step like the other fast paths)",
    )
    parser.add_argument(
        "--trained-model",
        type=Path,
        default=None,
        help="a trained model folder for the bf16 agreement on trained weights (default: the one `make demo` "
        "writes, outputs/demo/run/model, when it exists)",
    )
    parser.add_argument("--trained-images", type=int, default=250, help="synthetic test pictures for it")
    parser.add_argument("--trained-image-size", type=int, default=64, help="their size (the demo's: 64)")
    parser.add_argument(
        "--pieces",
        action="store_true",
        help="also measure what each piece of the fast path buys (with and without it, interleaved)",
    )
    parser.add_argument(
        "--pieces-only",
        action="store_true",
        help="only that (a minute or two on a CPU): build the model, measure each piece, print the ratios",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: small batch, one repetition")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size is None:
        args.batch_size = 256 if args.device == "cuda" else 32
    if args.small_batch_size is None:
        args.small_batch_size = 16 if args.device == "cpu" else 0
    if args.overlap_batches is None:
        args.overlap_batches = 8 if args.device == "cuda" else 0
    if args.trained_model is None and DEMO_MODEL.is_dir():
        args.trained_model = DEMO_MODEL
    if args.quick:
        args.trained_images = min(args.trained_images, 16)
        args.batch_size = min(args.batch_size, 8)
        args.repeats, args.reference_images, args.single_images = 1, 2, 2
        args.rss_batch_size = min(args.rss_batch_size, 8)
    args.reference_images = min(args.reference_images, args.batch_size)
    args.single_images = min(args.single_images, args.batch_size)
    return args


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name: str, value: float, unit: str, reference: str = "", ratio: float | None = None,
            target: str = "", passed: bool | None = None) -> None:  # fmt: skip
        self.rows.append(
            {"name": name, "value": value, "unit": unit, "reference": reference, "ratio": ratio,
             "target": target, "passed": passed}
        )  # fmt: skip
        verdict = "" if passed is None else ("PASS" if passed else "FAIL")
        ratio_text = "" if ratio is None else f"{ratio:7.2f}x"
        print(f"  {name:<44} {value:10.2f} {unit:<9} {ratio_text:>9}  {target:<9} {verdict:<4}  {reference}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return {}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # float32 means float32: with TF32 (on by default for cuDNN's convolutions) the float32 reference and
    # the float32 exactness checks would depend on the batch size
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    batch = args.batch_size
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    settings = {
        "device": device.type,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "batch_size": batch,
        "dtype": args.dtype,
        "channels_last": args.dtype == "bf16",
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "vocab_size": args.vocab_size,
        "image_size": IMAGE_SIZE,
        "repeats": args.repeats,
        "statistic": args.statistic,
        "reference_images": args.reference_images,
        "reference_search": args.reference_search,
        "fused_attention": args.fused_attention,
        "overlap_batches": args.overlap_batches,
        "capture_steps": args.capture_steps,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print("bench_generate: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} (other processes on the machine slow every figure)")
    model = build_model(args.vocab_size).to(device)
    model.decoder.fuse_attention_scores = args.fused_attention
    model.decoder.capture_steps = args.capture_steps
    if args.capture_steps:
        # the captured step is compiled once per step shape and dtype, and this run decodes more of them (batch,
        # small batch, one image, float32 and bf16) than torch compiles one function for by default (8)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    fast_model = copy.deepcopy(model)
    if args.dtype == "bf16":
        fast_model = fast_model.to(memory_format=torch.channels_last)
    eos = model.config.eos_token_id
    captioner = Captioner(model, fast_model, args, device)
    pixel_values = make_images(batch, seed=SEED + 1).to(device)
    with torch.inference_mode():
        features = torch.cat([model.encoder(chunk).last_hidden_state for chunk in pixel_values.split(8)])
    print(f"model built and images encoded in {time.perf_counter() - started:.0f} s", flush=True)

    def pieces() -> dict:
        # at the library's defaults (fused scores off), each piece with and without
        with setting(model.decoder, "fuse_attention_scores", False):
            return measure_pieces(captioner, features, pixel_values, args, device)

    if args.pieces_only:
        result = {"settings": settings, "pieces": pieces(), "load_average": [load_start, os.getloadavg()]}
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1))
        return result

    # ---- correctness first: the reference and generate() agree in float32 -------------------------
    reference_pixels = pixel_values[: args.reference_images]
    fp32_ids = captioner.ours_end_to_end(pixel_values, "fp32")
    fp32_captions = rows_to_captions(fp32_ids, eos)
    lengths = [len(c) for c in fp32_captions]
    distinct = len({tuple(c) for c in fp32_captions}) / len(fp32_captions)
    confidence = chosen_word_probability(model, features[:8], fp32_captions[:8])
    ended = sum(c[-1] == eos for c in fp32_captions) / len(fp32_captions)
    print(
        f"decoding: mean length {statistics.mean(lengths):.1f} words (min {min(lengths)}, max {max(lengths)}), "
        f"{ended:.0%} ended by <end>, distinct captions {distinct:.0%}, "
        f"mean probability of the chosen words {confidence:.2f}",
        flush=True,
    )

    # warm-up (weights cast and laid out once, allocator, oneDNN kernels, the fused attention compiled)
    captioner.ours_end_to_end(pixel_values, args.dtype)
    captioner.ours_decoder(features, args.dtype)
    captioner.ours_decoder(features[:1], args.dtype)
    overlapped_batches = [pixel_values] * args.overlap_batches
    if overlapped_batches:
        captioner.ours_overlapped(overlapped_batches[:2], args.dtype)
    captioner.reference(reference_pixels[:1])

    # ---- interleaved timing -------------------------------------------------------------------
    keys = (
        "e2e", "encoder", "decoder", "single", "ref_e2e", "ref_decoder", "e2e_small", "encoder_small", "overlapped"
    )  # fmt: skip
    results = {key: [] for key in keys}
    small = args.small_batch_size if 0 < args.small_batch_size < batch else 0
    ratio_keys = (
        "decoder",
        "e2e",
        "e2e_over_encoder",
        "e2e_over_encoder_small",
        "batching",
        "overlapped_over_encoder",
    )
    ratios = {key: [] for key in ratio_keys}
    reference_captions = None
    for repeat in range(args.repeats):
        seconds, _ = timed(lambda: captioner.ours_end_to_end(pixel_values, args.dtype), device)
        e2e = batch / seconds
        seconds, _ = timed(lambda: captioner.ours_encoder(pixel_values, args.dtype), device)
        encoder = batch / seconds
        seconds, _ = timed(lambda: captioner.ours_decoder(features, args.dtype), device)
        decoder = batch / seconds
        single_seconds = 0.0
        for image in range(args.single_images):
            seconds, _ = timed(
                lambda image=image: captioner.ours_decoder(features[image : image + 1], args.dtype), device
            )
            single_seconds += seconds
        single = args.single_images / single_seconds
        reference_captions, ref_encoder_time, ref_decoder_time = captioner.reference(reference_pixels)
        ref_e2e = args.reference_images / (ref_encoder_time + ref_decoder_time)
        ref_decoder = args.reference_images / ref_decoder_time
        for key, value in zip(keys, (e2e, encoder, decoder, single, ref_e2e, ref_decoder), strict=False):
            results[key].append(value)
        ratios["decoder"].append(decoder / ref_decoder)
        ratios["e2e"].append(e2e / ref_e2e)
        ratios["e2e_over_encoder"].append(e2e / encoder)
        ratios["batching"].append(decoder / single)
        if small:  # the same at a smaller batch (a batch's longest caption sets how long generate() runs)
            seconds, _ = timed(lambda: captioner.ours_end_to_end(pixel_values[:small], args.dtype), device)
            results["e2e_small"].append(small / seconds)
            seconds, _ = timed(lambda: captioner.ours_encoder(pixel_values[:small], args.dtype), device)
            results["encoder_small"].append(small / seconds)
            ratios["e2e_over_encoder_small"].append(results["e2e_small"][-1] / results["encoder_small"][-1])
        if (
            overlapped_batches
        ):  # a stream of batches, each batch's encoder pass overlapping the decoding before it
            seconds, _ = timed(lambda: captioner.ours_overlapped(overlapped_batches, args.dtype), device)
            results["overlapped"].append(batch * len(overlapped_batches) / seconds)
            ratios["overlapped_over_encoder"].append(results["overlapped"][-1] / encoder)
        print(
            f"  repeat {repeat + 1}/{args.repeats}: end-to-end {e2e:.1f} img/s, encoder {encoder:.1f}, "
            f"decoder {decoder:.1f}, decoder one at a time {single:.1f}, reference end-to-end {ref_e2e:.2f}, "
            f"reference decoder {ref_decoder:.2f}",
            flush=True,
        )

    # ---- exactness ------------------------------------------------------------------------------
    fp32_decoder_ids = captioner.ours_decoder(features, "fp32")
    fp32_decoder_captions = rows_to_captions(fp32_decoder_ids, eos)
    reference_decoder_captions, search_steps = captioner.reference_decoder(features)
    reference_agreement = share_identical(reference_decoder_captions, fp32_decoder_captions)
    # generate() runs until the last image's search ends, decoding every image to the end
    batch_steps = fp32_decoder_ids.shape[1] - 1
    idle_share = 1 - statistics.mean(search_steps) / batch_steps
    reference_e2e_agreement = share_identical(reference_captions, fp32_captions[: args.reference_images])
    bf16_e2e_captions = rows_to_captions(captioner.ours_end_to_end(pixel_values, "bf16"), eos)
    bf16_decoder_captions = rows_to_captions(captioner.ours_decoder(features, "bf16"), eos)
    bf16_e2e_agreement = share_identical(bf16_e2e_captions, fp32_captions)
    bf16_decoder_agreement = share_identical(bf16_decoder_captions, fp32_decoder_captions)
    model.decoder.fast_inference = False
    plain_captions = rows_to_captions(captioner.ours_decoder(features, "fp32"), eos)
    plain_bf16_captions = rows_to_captions(captioner.ours_decoder(features, "bf16"), eos)
    model.decoder.fast_inference = True
    plain_agreement = share_identical(plain_captions, fp32_decoder_captions)
    overlapped_agreement = None
    if overlapped_batches:
        # the same images in every batch of the stream: each must get generate(pixel_values)'s ids
        plain_ids = captioner.ours_end_to_end(pixel_values, args.dtype)
        overlapped_ids = captioner.ours_overlapped(overlapped_batches, args.dtype)
        overlapped_agreement = statistics.mean(
            share_identical(rows_to_captions(ids, eos), rows_to_captions(plain_ids, eos))
            for ids in overlapped_ids
        )
    # Controls: how much of the bf16 disagreement is the model's sensitivity rather than the arithmetic.
    # bf16 autocast of the plain step; and a float32 decoder given features merely rounded to bf16.
    plain_bf16_agreement = share_identical(plain_bf16_captions, fp32_decoder_captions)
    bf16_encoder_features = captioner.ours_encoder(pixel_values, "bf16").float()
    bf16_encoder_agreement = share_identical(
        rows_to_captions(captioner.ours_decoder(bf16_encoder_features, "fp32"), eos), fp32_captions
    )
    rounded_features = features.to(torch.bfloat16).float()
    rounded_agreement = share_identical(
        rows_to_captions(captioner.ours_decoder(rounded_features, "fp32"), eos), fp32_decoder_captions
    )
    rounded_weights_agreement = share_identical(
        captions_with_rounded_decoder_weights(model, features, captioner.generate_kwargs),
        fp32_decoder_captions,
    )
    # For the captions that differ: how much less likely the bf16 caption is under the float32 model.
    decoder_gaps = likelihood_gaps(model, features, fp32_decoder_captions, bf16_decoder_captions)
    e2e_gaps = likelihood_gaps(model, features, fp32_captions, bf16_e2e_captions)
    exactness = {
        "reference_vs_generate_fp32": reference_agreement,
        "reference_vs_generate_fp32_end_to_end": reference_e2e_agreement,
        "fast_vs_plain_fp32": plain_agreement,
        "overlapped_vs_generate": overlapped_agreement,
        "bf16_vs_fp32_end_to_end": bf16_e2e_agreement,
        "bf16_vs_fp32_decoder": bf16_decoder_agreement,
        "plain_step_bf16_autocast_vs_fp32_decoder": plain_bf16_agreement,
        "fp32_decoder_on_bf16_rounded_features": rounded_agreement,
        "fp32_decoder_with_bf16_rounded_weights": rounded_weights_agreement,
        "fp32_decoder_on_bf16_encoder_features": bf16_encoder_agreement,
        "decoder_gaps_nats": decoder_gaps,
        "search_steps_per_image": search_steps,
        "batch_steps": batch_steps,
        "decoding_after_search_ended_share": idle_share,
        "end_to_end_gaps_nats": e2e_gaps,
    }
    print(
        f"generate() ran {batch_steps} steps for the batch; each image's search needed "
        f"{statistics.mean(search_steps):.1f} on average (the classic search's count), so {idle_share:.0%} of "
        "the batch's row-steps come after an image's search has ended",
        flush=True,
    )
    print(
        f"bf16 vs float32: decoder {bf16_decoder_agreement:.0%} identical "
        f"(bf16 autocast of the plain step: {plain_bf16_agreement:.0%}; a float32 decoder on features rounded "
        f"to bf16: {rounded_agreement:.0%}; a float32 decoder with its weights rounded to bf16: "
        f"{rounded_weights_agreement:.0%}); differing captions are {fmt_gaps(decoder_gaps)} less likely "
        f"under float32; end to end {bf16_e2e_agreement:.0%} identical (a float32 decoder on the bf16 "
        f"encoder's features: {bf16_encoder_agreement:.0%}), gaps {fmt_gaps(e2e_gaps)}",
        flush=True,
    )

    trained = None
    if args.trained_model is not None:
        trained = trained_model_agreement(args.trained_model, args, device)
        print(
            f"trained model {trained['model']} (vocabulary {trained['config']['vocab_size']}), "
            f"{trained['images']} synthetic test pictures: bf16 ids identical to float32 "
            f"{trained['bf16_vs_fp32_end_to_end']:.1%} end to end, {trained['bf16_vs_fp32_decoder']:.1%} decoder "
            f"only (a float32 decoder with its weights rounded to bf16: "
            f"{trained['fp32_decoder_with_bf16_rounded_weights']:.1%})",
            flush=True,
        )
    else:
        print(
            "no trained model for the bf16 agreement on trained weights: run `make demo` or give --trained-model"
        )

    # ---- memory -------------------------------------------------------------------------------
    memory = (
        None if args.skip_memory else measure_peak_rss(model.cpu() if device.type == "cpu" else model, args)
    )

    # ---- peer -----------------------------------------------------------------------------------
    peer_results = None
    if not args.skip_peer:
        transformers.logging.set_verbosity_error()  # GPT-2's pad = eos makes generate() warn at every call
        peer, peer_size = build_peer(device)
        peer_pixels = make_images(batch, seed=SEED + 1, size=peer_size).to(device)
        peer_generate(peer, peer_pixels[:2], args.dtype, args, device)  # warm-up
        fixed = {"min_new_tokens": args.max_new_tokens}
        captioner.ours_end_to_end(pixel_values[:2], args.dtype, **fixed)
        peer_rates, ours_rates = [], []
        for _ in range(args.repeats):
            seconds, _ = timed(lambda: peer_generate(peer, peer_pixels, args.dtype, args, device), device)
            peer_rates.append(batch / seconds)
            seconds, _ = timed(lambda: captioner.ours_end_to_end(pixel_values, args.dtype, **fixed), device)
            ours_rates.append(batch / seconds)
        peer_results = {
            "peer_images_per_s": summarise(peer_rates, args.statistic),
            "ours_images_per_s": summarise(ours_rates, args.statistic),
            "peer_rates": peer_rates,
            "ours_rates": ours_rates,
            "peer_image_size": peer_size,
        }
        peer_results["ratio"] = peer_results["ours_images_per_s"] / peer_results["peer_images_per_s"]
        del peer

    # ---- report ---------------------------------------------------------------------------------
    dtype_name = {"bf16": "bf16 autocast + channels_last", "fp32": "float32"}[args.dtype]
    print()
    print(f"Results ({device_name}, {device.type}, threads {args.threads}, batch {batch}, {dtype_name}, "
          f"beam {args.num_beams}, {args.max_new_tokens} new tokens, vocabulary {args.vocab_size}):")  # fmt: skip
    report = Report()
    figure = {key: summarise(values, args.statistic) for key, values in results.items()}
    ratio = figure["decoder"] / figure["ref_decoder"]
    report.add("decoder-only, generate()", figure["decoder"], "img/s",
               f"reference decoder {figure['ref_decoder']:.2f} img/s", ratio, ">= 5x", ratio >= 5)  # fmt: skip
    ratio = figure["e2e"] / figure["ref_e2e"]
    report.add("end-to-end, generate()", figure["e2e"], "img/s",
               f"reference end-to-end {figure['ref_e2e']:.2f} img/s", ratio, ">= 5x", ratio >= 5)  # fmt: skip
    ratio = figure["e2e"] / figure["encoder"]
    target = 0.8
    report.add("end-to-end / encoder-only", figure["e2e"], "img/s",
               f"encoder-only {figure['encoder']:.1f} img/s; repetitions {spread(ratios['e2e_over_encoder'])}",
               ratio, f">= {target}", ratio >= target)  # fmt: skip
    if small:
        ratio = figure["e2e_small"] / figure["encoder_small"]
        report.add(f"end-to-end / encoder-only, batch {small}", figure["e2e_small"], "img/s",
                   f"encoder-only {figure['encoder_small']:.1f} img/s; repetitions "
                   f"{spread(ratios['e2e_over_encoder_small'])}", ratio, f">= {target}",
                   ratio >= target)  # fmt: skip
    if overlapped_batches:
        ratio = figure["overlapped"] / figure["encoder"]
        report.add(f"stream of {len(overlapped_batches)} batches, overlapped / encoder", figure["overlapped"],
                   "img/s", f"encoder-only {figure['encoder']:.1f} img/s; repetitions "
                   f"{spread(ratios['overlapped_over_encoder'])}", ratio, f">= {target}",
                   ratio >= target)  # fmt: skip
    ratio = figure["decoder"] / figure["single"]
    batching_target = 2.5 if device.type == "cpu" else None
    report.add(f"decoder batching ({batch} vs 1 image)", figure["decoder"], "img/s",
               f"one at a time {figure['single']:.2f} img/s", ratio,
               ">= 2.5x" if batching_target else "", (ratio >= 2.5) if batching_target else None)  # fmt: skip
    if memory is not None:
        peak_gib = memory["peak_rss_mib"] / 1024
        report.add(f"peak resident memory, batch {args.rss_batch_size}", memory["peak_rss_mib"], "MiB",
                   f"{memory['rss_before_mib']:.0f} MiB before captioning", None, "<= 2 GiB",
                   peak_gib <= 2)  # fmt: skip
    report.add("bf16 ids identical to float32, end-to-end", 100 * bf16_e2e_agreement, "% images",
               f"{batch} images", None, ">= 95%", bf16_e2e_agreement >= 0.95)  # fmt: skip
    report.add("bf16 ids identical to float32, decoder", 100 * bf16_decoder_agreement, "% images",
               f"{batch} images, same float32 features", None, ">= 95%",
               bf16_decoder_agreement >= 0.95)  # fmt: skip
    if trained is not None:
        for where, key in (("end-to-end", "bf16_vs_fp32_end_to_end"), ("decoder", "bf16_vs_fp32_decoder")):
            report.add(f"bf16 ids = float32, trained model, {where}", 100 * trained[key], "% images",
                       f"{trained['images']} synthetic test pictures, demo model", None, ">= 95%",
                       trained[key] >= 0.95)  # fmt: skip
    report.add("reference = generate() (float32)", 100 * reference_agreement, "% images",
               f"{batch} images, decoder only; end to end, {args.reference_images} images: "
               f"{100 * reference_e2e_agreement:.0f}%", None, "100%",
               reference_agreement == 1.0)  # fmt: skip
    fast_path = "fast inference" + "".join(
        f" ({name})"
        for name, on in (("fused attention", args.fused_attention), ("captured", args.capture_steps))
        if on
    )
    report.add(f"{fast_path} = plain step (float32)", 100 * plain_agreement, "% images",
               f"{batch} images", None, "100%", plain_agreement == 1.0)  # fmt: skip
    if overlapped_agreement is not None:
        report.add(f"overlapped = generate() ({args.dtype})", 100 * overlapped_agreement, "% images",
                   f"{len(overlapped_batches)} batches of {batch}", None, "100%",
                   overlapped_agreement == 1.0)  # fmt: skip
    if peer_results is not None:
        ratio = peer_results["ratio"]
        report.add("peer: ours vs ViT-B/16 + GPT-2", peer_results["ours_images_per_s"], "img/s",
                   f"peer {peer_results['peer_images_per_s']:.2f} img/s ({args.max_new_tokens} tokens each)",
                   ratio, ">= 3x", ratio >= 3)  # fmt: skip
    output = {
        "settings": settings,
        "decoding": {
            "mean_length": statistics.mean(lengths),
            "min_length": min(lengths),
            "max_length": max(lengths),
            "ended_share": ended,
            "distinct_share": distinct,
            "chosen_word_probability": confidence,
        },
        "measurements": {key: values for key, values in results.items()},
        "ratios": {key: values for key, values in ratios.items()},
        "exactness": exactness,
        "trained_model": trained,
        "memory": memory,
        "peer": peer_results,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "table": report.rows,
        "seconds": time.perf_counter() - started,
    }
    if args.pieces:
        output["pieces"] = pieces()
    print(f"\ntotal {output['seconds']:.0f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps(output, indent=2))
        print(f"wrote {args.json_out}")
    return output


if __name__ == "__main__":
    main()
