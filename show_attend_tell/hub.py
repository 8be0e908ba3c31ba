"""Sharing a trained model: safe loading, the repository folder, its model card, a load check, the upload.

`scripts/push_to_hub.py` is a thin command line over these functions:

1. `load_model_and_processor` reads a model folder or Hub repository with safetensors weights only.
2. `assemble_repository` writes the complete repository folder: everything `save_model_folder` writes
   (weights, configs, tokenizer, processors, code files, pipeline declaration), the model card as
   README.md (`render_model_card`: Hub metadata, and the model-index and results table when evaluation
   results are given), the evaluation results, and an example attention figure.
3. `check_folder_loads` loads that folder in a fresh Python process in which this package cannot be
   imported, the way a Hub user would (Auto classes and `pipeline("image-to-text")`, `trust_remote_code`),
   and captions a picture with it.
4. `upload_folder` creates the repository and uploads the folder with `huggingface_hub`; the token comes
   from where huggingface_hub keeps it (`HF_TOKEN`, or `hf auth login`) and is never written to the folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
from .pipeline_show_attend_tell import words_and_attention
from .processing_show_attend_tell import ShowAttendTellProcessor
from .saving import save_model_folder

#: Files a model folder may hold that `from_pretrained` would unpickle; never loaded, never uploaded.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
EXAMPLE_FIGURE_NAME = "attention_example.png"
EVAL_RESULTS_NAME = "eval_results.json"
FIGURE_MAX_NEW_TOKENS = 25
#: Written in the card's code snippets where the repository id goes; replaced when the card is rendered.
REPO_ID_PLACEHOLDER = "<user>/show-attend-tell"

# The paper's Flickr30K soft-attention results (Xu et al., 2015, table 1), in percent.
PAPER_FLICKR30K_SOFT_ATTENTION = {
    "BLEU-1": 66.7,
    "BLEU-2": 43.4,
    "BLEU-3": 28.8,
    "BLEU-4": 19.1,
    "METEOR": 18.49,
}

# Metric name (any common spelling, compared without case and punctuation) -> (shown name, model-index type).
_METRICS = {
    "bleu1": ("BLEU-1", "bleu"),
    "bleu2": ("BLEU-2", "bleu"),
    "bleu3": ("BLEU-3", "bleu"),
    "bleu4": ("BLEU-4", "bleu"),
    "meteor": ("METEOR", "meteor"),
    "rougel": ("ROUGE-L", "rouge"),
    "cider": ("CIDEr", "cider"),
}
_METRIC_ORDER = [shown for shown, _ in _METRICS.values()]


class UnsafeWeightsError(OSError):
    """A model folder without safetensors weights: pickle-based weights are refused, not loaded."""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_model_and_processor(
    model_path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[ShowAttendTellForConditionalGeneration, ShowAttendTellProcessor]:
    """
    Loads a model folder or Hub repository with this package's own classes (no code from the folder runs)
    and safetensors weights only (`use_safetensors=True`): a folder holding only `pytorch_model.bin` or
    another pickle is refused with `UnsafeWeightsError`, never unpickled. Returns the model in eval mode.
    """
    location = os.fspath(model_path)
    try:
        model = ShowAttendTellForConditionalGeneration.from_pretrained(
            location, use_safetensors=True, revision=revision, **({"dtype": dtype} if dtype else {})
        )
    except OSError as error:
        local = Path(location)
        pickles = sorted(p.name for p in local.glob("*") if p.suffix in PICKLE_WEIGHT_SUFFIXES)
        if local.is_dir() and not any(local.glob("*.safetensors")):
            found = f" (found {', '.join(pickles)})" if pickles else ""
            raise UnsafeWeightsError(
                f"{location}: no safetensors weights{found}; only .safetensors files are loaded, because "
                "pickle-based weight files can run code when read. Convert them with a tool you trust."
            ) from error
        raise
    processor = ShowAttendTellProcessor.from_pretrained(location, revision=revision)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def set_decoding_options(
    model: Any, *, fuse_attention_scores: bool = False, capture_steps: bool = False
) -> None:
    """
    Turns on the decoder's speed options (see `ShowAttendTellDecoder`: `fuse_attention_scores` compiles the
    attention scores, `capture_steps` replays each decoding step from a CUDA graph) on a loaded model. A
    model loaded with its folder's own code may predate an option: `ValueError` names it.
    """
    decoder = model.get_decoder()
    options = {"fuse_attention_scores": fuse_attention_scores, "capture_steps": capture_steps}
    wanted = [name for name, on in options.items() if on]
    missing = [name for name in wanted if not hasattr(decoder, name)]
    if missing:  # checked before setting anything, so that nothing is half set
        names = " and ".join(f"`{name}`" for name in missing)
        raise ValueError(f"this model's code predates {names} (save the model again with this package)")
    for name in wanted:
        setattr(decoder, name, True)


# --------------------------------------------------------------------------------------------------
# Evaluation results and the model card
# --------------------------------------------------------------------------------------------------


def _metric_key(name: str) -> str | None:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = {"rouge": "rougel", "ciderd": "cider"}.get(key, key)
    return key if key in _METRICS else None


def _beam_of(name: Any) -> int | None:
    found = re.fullmatch(r"(?:beam(?:_?size)?[_\-\s]?)?(\d+)", str(name).strip().lower())
    return int(found.group(1)) if found else None


def normalize_eval_results(raw: Mapping[str, Any]) -> dict[str, Any]:
    """
    Reads evaluation results in any of the shapes below and returns
    `{"dataset": str, "split": str, "results": [{"num_beams": int | None, "metrics": {"BLEU-4": 19.1, ...}}]}`
    with metric values in percent (coco-caption's fractions are multiplied by 100).

    Accepted: the report of `scripts/evaluate.py --output` (`{"results": {"beam_1": {...}, "beam_3": {...}},
    ...}`), `{"results": [{"num_beams": 3, "metrics": {...}}, ...]}`, `{"beam_3": {...}, "beam_5": {...}}`,
    `{"metrics": {...}, "num_beams": 3}`, or a flat `{"BLEU-4": 0.191, "METEOR": 0.185, ...}`; metric names
    in any usual spelling (`Bleu_4`, `bleu-4`, `BLEU4`, `ROUGE_L`, `CIDEr`). Optional top-level `dataset`
    and `split`. Unknown metric names and other keys (predictions, settings, timings) are ignored.
    """
    dataset = str(raw.get("dataset") or "Flickr30K")
    if "flickr30k" in dataset.lower():
        dataset = "Flickr30K"  # the hub name, a local copy's path and the source name all mean this
    split = str(raw.get("split") or "test")
    entries: list[tuple[int | None, Mapping[str, Any]]] = []
    if isinstance(raw.get("results"), Mapping):  # scripts/evaluate.py: one entry per beam size
        entries.extend((_beam_of(label), metrics) for label, metrics in raw["results"].items())
    elif isinstance(raw.get("results"), list):
        for entry in raw["results"]:
            beams = entry.get("num_beams", entry.get("beam_size", entry.get("beam")))
            entries.append((int(beams) if beams is not None else None, entry.get("metrics", entry)))
    elif isinstance(raw.get("metrics"), Mapping):
        beams = raw.get("num_beams", raw.get("beam_size"))
        entries.append((int(beams) if beams is not None else None, raw["metrics"]))
    else:
        nested = {k: v for k, v in raw.items() if isinstance(v, Mapping) and _beam_of(k) is not None}
        if nested:
            entries.extend(
                (_beam_of(k), v) for k, v in sorted(nested.items(), key=lambda kv: _beam_of(kv[0]))
            )
        else:
            beams = raw.get("num_beams", raw.get("beam_size"))
            entries.append((int(beams) if isinstance(beams, (int, float, str)) else None, raw))

    results = []
    for beams, metrics in entries:
        if not isinstance(metrics, Mapping):
            continue
        values = {}
        for name, value in metrics.items():
            key = _metric_key(str(name))
            if key is not None and isinstance(value, (int, float)) and math.isfinite(value):
                values[_METRICS[key][0]] = float(value)
        if values:
            results.append({"num_beams": beams, "metrics": values})
    if not results:
        raise ValueError("the evaluation results name none of BLEU-1..4, METEOR, ROUGE-L, CIDEr")
    # coco-caption reports fractions; the card (and the paper) use percent. Decide once for the whole file
    # from the metrics that cannot exceed 1 as fractions (CIDEr can).
    bounded = [v for r in results for k, v in r["metrics"].items() if k != "CIDEr"]
    if bounded and max(bounded) <= 1.0:
        for result in results:
            result["metrics"] = {k: v * 100.0 for k, v in result["metrics"].items()}
    for result in results:
        result["metrics"] = {k: round(v, 2) for k, v in result["metrics"].items()}
    return {"dataset": dataset, "split": split, "results": results}


def _results_table(results: dict[str, Any] | None) -> str:
    """Markdown table: this model's scores (one row per beam size) next to the paper's."""
    metrics = [m for m in _METRIC_ORDER if m in PAPER_FLICKR30K_SOFT_ATTENTION]
    if results:
        extra = {m for r in results["results"] for m in r["metrics"]} - set(metrics)
        metrics += [m for m in _METRIC_ORDER if m in extra]
    header = "| Model | Decoding | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    if results:
        where = f"{results['dataset']} {results['split']}"
        for result in results["results"]:
            beams = result["num_beams"]
            decoding = f"beam {beams}" if beams else "default"
            cells = [f"{result['metrics'][m]:.2f}" if m in result["metrics"] else "–" for m in metrics]
            lines.append(f"| This model ({where}) | {decoding} | " + " | ".join(cells) + " |")
    else:
        lines.append(
            "| This model | | "
            + " | ".join("not evaluated yet" if i == 0 else "" for i in range(len(metrics)))
            + " |"
        )
    paper = [
        f"{PAPER_FLICKR30K_SOFT_ATTENTION[m]:g}" if m in PAPER_FLICKR30K_SOFT_ATTENTION else "–"
        for m in metrics
    ]
    lines.append(
        "| Xu et al. 2015, soft attention (Flickr30K test) | beam search | " + " | ".join(paper) + " |"
    )
    return "\n".join(lines)


def _checkpoint_details(config: Any, num_parameters: int | None, generation: Mapping[str, Any]) -> str:
    """A short table describing the checkpoint actually pushed (which may differ from the card's defaults)."""
    encoder = config.encoder_config
    try:
        from .modeling_show_attend_tell import resnet_architecture_name

        encoder_name = resnet_architecture_name(config).replace("resnet", "ResNet-")
    except ValueError:
        encoder_name = f"ResNet, depths {list(encoder.depths)}, widths {list(encoder.hidden_sizes)}"
    rows = [
        (
            "Encoder",
            f"{encoder_name}, {config.encoder_dim} channels pooled to {config.encoded_image_size} x "
            f"{config.encoded_image_size}",
        ),
        (
            "Embedding / attention / decoder sizes",
            f"{config.embed_dim} / {config.attention_dim} / {config.decoder_dim}",
        ),
        ("Dropout", f"{config.dropout}"),
        ("Doubly-stochastic weight (alpha_c)", f"{config.alpha_c}"),
        ("Vocabulary", f"{config.vocab_size} words (special tokens included)"),
    ]
    if num_parameters is not None:
        rows.append(("Parameters", f"{num_parameters / 1e6:.1f} M"))
    if generation:
        rows.append(
            (
                "Default decoding",
                f"beam {generation.get('num_beams', 1)}, up to {generation.get('max_new_tokens', '?')} tokens",
            )
        )
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def _replace_section(text: str, name: str, content: str) -> str:
    """Replaces what lies between `<!-- name -->` and `<!-- /name -->` (markers kept, so rendering is idempotent)."""
    pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(\n<!-- /{re.escape(name)} -->)", re.DOTALL)
    if not pattern.search(text):
        return text
    return pattern.sub(lambda m: m.group(1) + content + m.group(2), text)


def render_model_card(
    template: str,
    *,
    repo_id: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    config: Any = None,
    num_parameters: int | None = None,
    generation: Mapping[str, Any] | None = None,
    figure: str | None = None,
) -> str:
    """
    Fills the model card template (model_card.md): the results table and, when evaluation results are
    given, the `model-index` metadata that the Hub shows as an evaluation widget; the checkpoint's own
    sizes from its `config`; the example attention figure; the repository id in the code snippets.

    The template's sections between `<!-- results-table -->`, `<!-- checkpoint-details -->` and
    `<!-- attention-figure -->` markers and their `<!-- /... -->` ends are replaced; the rest is kept.
    """
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard(template)
    results = normalize_eval_results(eval_results) if eval_results else None
    if results:
        model_name = (repo_id or "show-attend-tell").split("/")[-1]
        card.data.model_name = model_name
        card.data.eval_results = [
            EvalResult(
                task_type="image-to-text",
                task_name="Image Captioning",
                dataset_type="nlphuji/flickr30k"
                if "flickr30k" in results["dataset"].lower()
                else results["dataset"],
                dataset_name=results["dataset"],
                dataset_split=results["split"],
                metric_type=_METRICS[_metric_key(name)][1],
                metric_name=name,
                metric_value=value,
                metric_args={"num_beams": result["num_beams"]} if result["num_beams"] else None,
            )
            for result in results["results"]
            for name, value in result["metrics"].items()
        ]
    text = str(card)
    text = _replace_section(text, "results-table", _results_table(results))
    if config is not None:
        text = _replace_section(
            text, "checkpoint-details", _checkpoint_details(config, num_parameters, generation or {})
        )
    if figure:
        section = (
            f"![Where the model looked for each word of its caption]({figure})\n\n"
            "The first panel shows the picture and the caption; each following panel shows where the decoder "
            "attended while it wrote that word (bright: attended)."
        )
        text = _replace_section(text, "attention-figure", section)
    if repo_id:
        text = text.replace(REPO_ID_PLACEHOLDER, repo_id)
    return text


# --------------------------------------------------------------------------------------------------
# The repository folder
# --------------------------------------------------------------------------------------------------


def example_image(size: int = 256) -> Image.Image:
    """A deterministic picture for the card's figure: coloured shapes on a light background."""
    image = Image.new("RGB", (size, size), (232, 228, 220))
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.ellipse([6 * s, 8 * s, 26 * s, 28 * s], fill=(220, 40, 40))
    draw.rectangle([36 * s, 30 * s, 58 * s, 52 * s], fill=(40, 80, 220))
    draw.polygon([(10 * s, 58 * s), (20 * s, 38 * s), (30 * s, 58 * s)], fill=(235, 195, 30))
    return image


def attention_figure_png(
    model: ShowAttendTellForConditionalGeneration,
    processor: ShowAttendTellProcessor,
    image: Image.Image,
    **generate_kwargs: Any,
) -> tuple[bytes, str]:
    """Captions `image` and draws the attention figure; returns the PNG bytes and the caption."""
    from .visualization import plot_attention

    inputs = processor(images=image, return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model.generate(
            pixel_values=inputs["pixel_values"].to(model.dtype),
            output_attentions=True,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
    words, maps = words_and_attention(outputs.sequences[0], outputs.attention_maps[0], processor.tokenizer)
    figure = plot_attention(image, words, maps if len(words) else np.zeros((0, maps.shape[-1]), np.float32))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    figure.clear()
    return buffer.getvalue(), " ".join(words)


def assemble_repository(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    card_template: str,
    repo_id: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    figure_image: Image.Image | None = None,
    with_figure: bool = True,
) -> Path:
    """
    Writes the complete repository folder for `model_dir` into `output_dir` (atomically, replacing it):
    weights (safetensors), config.json with `auto_map` and the image-to-text pipeline declaration,
    generation_config.json, tokenizer, image processor, processor, the `*_show_attend_tell.py` code files,
    README.md (the rendered model card), eval_results.json (when given) and attention_example.png (when
    matplotlib is installed and `with_figure`). Only these files are written: logs, checkpoints or
    credentials lying in `model_dir` are never copied.
    """
    model, processor = load_model_and_processor(model_dir)
    extra_files: dict[str, str | bytes] = {}
    figure_name = None
    if with_figure:
        try:
            # A caption of a sentence or two; an untrained model would otherwise fill 51 panels.
            png, _ = attention_figure_png(
                model, processor, figure_image or example_image(), max_new_tokens=FIGURE_MAX_NEW_TOKENS
            )
        except ImportError as error:  # matplotlib is the optional `vis` extra
            print(f"warning: no example attention figure ({error})", file=sys.stderr)
        else:
            extra_files[EXAMPLE_FIGURE_NAME] = png
            figure_name = EXAMPLE_FIGURE_NAME
    if eval_results:
        # The scores only: an evaluation report also holds local paths and settings that are nobody's business.
        extra_files[EVAL_RESULTS_NAME] = json.dumps(normalize_eval_results(eval_results), indent=2) + "\n"
    extra_files["README.md"] = render_model_card(
        card_template,
        repo_id=repo_id,
        eval_results=eval_results,
        config=model.config,
        num_parameters=model.num_parameters(),
        generation=model.generation_config.to_dict(),
        figure=figure_name,
    )
    return save_model_folder(output_dir, model, processor, extra_files=extra_files)


# --------------------------------------------------------------------------------------------------
# Checking that a folder loads where this package is not installed
# --------------------------------------------------------------------------------------------------

_LOAD_CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["show_attend_tell"] = None  # everything must come from the folder's own code files
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.new("RGB", (80, 60), (200, 40, 40))
    ids = model.generate(**processor(images=image, return_tensors="pt"), num_beams=2, max_new_tokens=6)
    captioner = pipeline(
        "image-to-text", model=folder, trust_remote_code=True, model_kwargs={"use_safetensors": True}
    )
    piped = captioner(image, max_new_tokens=6, num_beams=2)
    print(json.dumps({
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "pipeline_class": type(captioner).__name__,
        "caption": processor.batch_decode(ids)[0],
        "pipeline_caption": piped[0]["generated_text"],
    }))
    """
)


def check_folder_loads(folder: str | os.PathLike, *, timeout: float = 300.0) -> dict[str, Any]:
    """
    Loads `folder` in a fresh Python process that cannot import this package (as a Hub user with only
    transformers would): AutoModel and AutoProcessor with `trust_remote_code=True`, a caption with
    `generate()`, and `pipeline("image-to-text")`, which must give the same caption.

    Returns what the process reported; raises `RuntimeError` with the end of its error output when the
    folder does not load.
    """
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="sat-load-check-") as scratch:
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"  # a local folder: nothing to download
        env["HF_MODULES_CACHE"] = str(Path(scratch) / "modules")  # fresh copies of the folder's code
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            completed = subprocess.run(
                [sys.executable, "-c", _LOAD_CHECK_SCRIPT, str(folder)],
                cwd=scratch,  # not the repository, whose package would be importable from the working folder
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"{folder}: loading it did not finish within {timeout:.0f} s") from error
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{folder} does not load in a fresh process:\n{tail}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    if report["caption"] != report["pipeline_caption"]:
        raise RuntimeError(
            f"{folder}: the pipeline's caption {report['pipeline_caption']!r} differs from generate()'s "
            f"{report['caption']!r}"
        )
    if not report["model_module"].startswith("transformers_modules"):
        raise RuntimeError(f"{folder}: the model class did not come from the folder's code files")
    return report


# --------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    api: Any = None,
    commit_message: str = "Upload Show, Attend and Tell model",
) -> str:
    """
    Creates `repo_id` (if needed) and uploads `folder` to it with huggingface_hub; returns the commit URL.

    `api` defaults to `huggingface_hub.HfApi()`, which finds the token where huggingface_hub keeps it
    (`HF_TOKEN`, or the file `hf auth login` writes). Pickle weight files are never uploaded.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        ignore_patterns=[f"*{suffix}" for suffix in PICKLE_WEIGHT_SUFFIXES],
    )
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "EXAMPLE_FIGURE_NAME",
    "PAPER_FLICKR30K_SOFT_ATTENTION",
    "UnsafeWeightsError",
    "assemble_repository",
    "attention_figure_png",
    "check_folder_loads",
    "example_image",
    "load_model_and_processor",
    "normalize_eval_results",
    "render_model_card",
    "upload_folder",
]
