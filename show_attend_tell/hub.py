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

import argparse
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

from .configuration_show_attend_tell import ShowAttendTellConfig
from .errors import one_line
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
#: Written in the card's usage snippets where the checkpoint's attention grid and its size go (from its config).
GRID_PLACEHOLDER = "<grid h x w>"
PIXELS_PLACEHOLDER = "<grid positions>"
#: Files training writes into the model folder; the card's training section is read from them.
TRAINING_ARGS_NAME = "training_args.json"
TRAINING_METRICS_NAME = "metrics.json"

# The paper's Flickr30K soft-attention results (Xu et al., 2015, table 1), in percent.
PAPER_FLICKR30K_SOFT_ATTENTION = {
    "BLEU-1": 66.7,
    "BLEU-2": 43.4,
    "BLEU-3": 28.8,
    "BLEU-4": 19.1,
    "METEOR": 18.49,
}

# Score key of an evaluation report (`compute_caption_metrics`) -> (name shown on the card, model-index type).
_METRICS = {
    "bleu_1": ("BLEU-1", "bleu"),
    "bleu_2": ("BLEU-2", "bleu"),
    "bleu_3": ("BLEU-3", "bleu"),
    "bleu_4": ("BLEU-4", "bleu"),
    "meteor": ("METEOR", "meteor"),
    "rouge_l": ("ROUGE-L", "rouge"),
    "cider": ("CIDEr", "cider"),
}
_METRIC_ORDER = [shown for shown, _ in _METRICS.values()]
_METRIC_TYPES = dict(_METRICS.values())


class ModelLoadError(OSError):
    """A model folder or repository that cannot be used; the message names the file and the problem, on one line."""


class UnsafeWeightsError(ModelLoadError):
    """A model folder without safetensors weights: pickle-based weights are refused, not loaded."""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

#: What is fetched from a Hub repository: configuration, tokenizer, safetensors weights and code files.
#: Pickle weight files are never downloaded.
_HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt"]
_WEIGHTS_NAME = "model.safetensors"
_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: JSON files a model folder may hold: each must parse, or loading would stop with a bare JSONDecodeError.
_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)
#: Config fields that size the model's layers: a positive integer each (JSON `true` is not one).
_SIZE_FIELDS = ("vocab_size", "embed_dim", "attention_dim", "decoder_dim", "encoded_image_size")
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def resolve_model_folder(model_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """
    The local folder of `model_path`: the folder itself, or the Hub repository of that id downloaded into
    huggingface_hub's cache (JSON, safetensors and code files only: pickles are never fetched).
    Raises `ModelLoadError` naming what is missing.
    """
    location = os.fspath(model_path)
    local = Path(location).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"{location}: a file, not a model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(location, revision=revision, allow_patterns=_HUB_FILE_PATTERNS))
    except HFValidationError:
        raise ModelLoadError(f"{location}: no such model folder") from None
    except Exception as error:  # offline and not cached, no such repository or revision, network failure
        raise ModelLoadError(
            f"{location}: no such folder, and the Hub repository could not be fetched ({one_line(error)})"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({one_line(error)})") from None


def _weight_files(folder: Path) -> list[Path]:
    """
    The safetensors files `from_pretrained(use_safetensors=True)` reads: model.safetensors, else those a
    sharded index names. An index naming any other file is refused here, before transformers could
    `torch.load` it; so is a folder with pickles only.
    """
    single = folder / _WEIGHTS_NAME
    if single.is_file():
        return [single]  # transformers prefers it to an index
    index_path = folder / _WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: no `weight_map` of tensor names to file names")
        names = sorted({str(name) for name in weight_map.values()})
        unsafe = [name for name in names if not name.endswith(".safetensors")]
        if unsafe:
            raise UnsafeWeightsError(
                f"{index_path}: names {', '.join(unsafe)}, not a safetensors file; only .safetensors files are "
                "loaded, because pickle-based weight files can run code when read"
            )
        files = [folder / name for name in names]
        for path in files:
            if path.resolve().parent != folder.resolve():
                raise UnsafeWeightsError(f"{index_path}: names {path.name!r} outside the model folder")
            if not path.is_file():
                raise ModelLoadError(f"{path}: missing (named in {_WEIGHTS_INDEX_NAME})")
        return files
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    found = f" (found {', '.join(pickles)})" if pickles else ""
    raise UnsafeWeightsError(
        f"{folder}: no safetensors weights{found}; only .safetensors files are loaded, because "
        "pickle-based weight files can run code when read. Convert them with a tool you trust."
    )


def _stored_shapes(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (file name, shape), read from the safetensors headers (the data is not read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a mapping
                    shapes[key] = (path.name, tuple(handle.get_slice(key).get_shape()))
        except Exception as error:  # SafetensorError: truncated, not safetensors at all, bad header
            raise ModelLoadError(
                f"{path}: not a readable safetensors file ({one_line(error)}); it may be truncated or "
                "corrupt: download or save it again"
            ) from None
    return shapes


def _check_tokenizer_file(folder: Path) -> None:
    """tokenizer.json must be a `tokenizers` file whose vocabulary holds words and the special tokens."""
    from tokenizers import Tokenizer

    from .tokenization_show_attend_tell import SPECIAL_TOKENS

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (the model's vocabulary)")
    data = _read_json(path)
    # transformers indexes these two keys without checking them (a KeyError otherwise)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelLoadError(f"{path}: not a tokenizer file (no `model` object)")
    if not isinstance(data.get("added_tokens"), list):
        raise ModelLoadError(f"{path}: not a tokenizer file (no `added_tokens` list)")
    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as error:  # tokenizers' parser: wrong types, unknown model type
        raise ModelLoadError(
            f"{path}: not a tokenizer file this package can read ({one_line(error)})"
        ) from None
    vocab = backend.get_vocab(with_added_tokens=True)
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ModelLoadError(f"{path}: the vocabulary lacks the special tokens {', '.join(missing)}")
    if not set(vocab) - set(SPECIAL_TOKENS):
        raise ModelLoadError(
            f"{path}: the vocabulary holds no words, only the special tokens (every caption would be empty)"
        )


def check_model_folder(folder: str | os.PathLike) -> list[Path]:
    """
    Checks the files of a model folder before anything is loaded from it: its JSON files parse, tokenizer.json
    is a tokenizer with words in its vocabulary, and the weights are readable safetensors (a sharded index
    must name safetensors files only). Returns the weight files. Raises `ModelLoadError` (`UnsafeWeightsError`
    for pickles) naming the file and the problem.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a model folder)")
    for name in _JSON_FILES:
        if (folder / name).is_file():
            _read_json(folder / name)
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'}: not a JSON object")
    files = _weight_files(folder)
    _stored_shapes(files)
    _check_tokenizer_file(folder)
    return files


def _check_config(config: Any, path: Path) -> None:
    """
    The fields that size the model have usable types and values: what a hand-edited config.json breaks. (A
    folder's own configuration class, with `trust_remote_code`, may lack some: those are not checked.)
    """
    present = [
        name for name in (*_SIZE_FIELDS, *_TOKEN_ID_FIELDS, "dropout", "alpha_c") if hasattr(config, name)
    ]
    for name in _SIZE_FIELDS:
        value = getattr(config, name, None)
        if name in present and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelLoadError(f"{path}: {name} must be a positive integer, not {value!r}")
    for name in _TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        limit = getattr(config, "vocab_size", math.inf)
        in_range = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit
        if name in present and not in_range:
            raise ModelLoadError(f"{path}: {name} must be a token id below vocab_size, not {value!r}")
    for name in ("dropout", "alpha_c"):
        value = getattr(config, name, None)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if name in present and not number:
            raise ModelLoadError(f"{path}: {name} must be a number, not {value!r}")


def _check_shapes(model_class: Any, config: Any, folder: Path, files: list[Path]) -> None:
    """The weights' shapes are the ones config.json describes (built on the meta device: no memory, no time)."""
    path = folder / "config.json"
    try:
        with torch.device("meta"):
            skeleton = model_class(config)
    except Exception as error:  # e.g. an encoder_config field of the wrong type
        raise ModelLoadError(f"{path}: does not describe a model ({one_line(error)})") from None
    stored = _stored_shapes(files)
    for key, tensor in skeleton.state_dict().items():
        if key in stored and stored[key][1] != tuple(tensor.shape):
            file_name, shape = stored[key]
            raise ModelLoadError(
                f"{path}: gives {key} the shape {list(tensor.shape)} but {file_name} holds {list(shape)} (the "
                "config and the weights come from different models)"
            )


def _check_loaded(
    model: Any, processor: Any, info: Mapping[str, Any], folder: Path, files: list[Path]
) -> None:
    """What only the loaded objects tell: every weight was in the files, all finite; the vocabulary fits."""
    weights = files[0] if len(files) == 1 else folder / _WEIGHTS_INDEX_NAME
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"{weights}: lacks weights of the model ({shown})")
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ModelLoadError(f"{weights}: {name} holds NaN or infinite values (a corrupt file?)")
    tokenizer = processor.tokenizer
    vocab_path = folder / "tokenizer.json"
    if len(tokenizer) != model.config.vocab_size:
        raise ModelLoadError(
            f"{vocab_path}: {len(tokenizer)} tokens, but the model (config.json) predicts "
            f"{model.config.vocab_size}: they come from different models"
        )
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name) != getattr(model.config, name):
            raise ModelLoadError(
                f"{vocab_path}: {name} is {getattr(tokenizer, name)}, config.json says "
                f"{getattr(model.config, name)}: they come from different models"
            )


def _folder_classes(folder: Path) -> tuple[Any, tuple[Any, Any, Any]]:
    """
    The classes the folder's code files define, imported from them (`trust_remote_code`): the model, and the
    processor, image processor and tokenizer. Looked up here rather than through the Auto classes, which in a
    process that imported this package would pick the package's registered classes over the folder's code.
    A part whose JSON file names no code file is this package's own class.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from .image_processing_show_attend_tell import ShowAttendTellImageProcessor
    from .tokenization_show_attend_tell import ShowAttendTellTokenizer

    def from_folder(file_name: str, auto_class: str, default: Any) -> Any:
        path = folder / file_name
        auto_map = _read_json(path).get("auto_map", {}) if path.is_file() else {}
        reference = auto_map.get(auto_class) if isinstance(auto_map, dict) else None
        if isinstance(reference, list):  # tokenizers: [slow class, fast class]
            reference = next((name for name in reversed(reference) if name), None)
        if reference is None:
            if default is None:
                raise ModelLoadError(
                    f"{path}: no `auto_map` entry for {auto_class}: the folder has no code to trust"
                )
            return default
        return get_class_from_dynamic_module(reference, str(folder))

    return from_folder("config.json", "AutoModel", None), (
        from_folder("processor_config.json", "AutoProcessor", ShowAttendTellProcessor),
        from_folder("preprocessor_config.json", "AutoImageProcessor", ShowAttendTellImageProcessor),
        from_folder("tokenizer_config.json", "AutoTokenizer", ShowAttendTellTokenizer),
    )


#: `--trust-remote-code`'s help in every command line that loads a model (search_images.py and app.py write it
#: out to answer --help without importing torch; tests/test_device.py checks that every script's --help says it).
TRUST_REMOTE_CODE_HELP = (
    "run the model folder's own code files (*_show_attend_tell.py) instead of this package's classes: only for "
    "folders you trust (default: never)"
)


def add_trust_remote_code_argument(parser: argparse._ActionsContainer) -> None:
    """Declares `--trust-remote-code` on a parser or argument group, for `load_model_and_processor`."""
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def load_model_and_processor(
    model_path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """
    Loads a model folder or Hub repository: the one way every script loads a model. Returns the model, in eval
    mode, and its processor.

    By default the classes are this package's own, and no code file of the folder runs. With
    `trust_remote_code=True` the folder's `*_show_attend_tell.py` files are imported and run instead (what
    `AutoModel.from_pretrained(..., trust_remote_code=True)` does): only for folders whose code you trust.

    Either way only safetensors weights are read (`use_safetensors=True`; a Hub repository is fetched without
    its pickle files), and the folder is checked before and after loading. Every problem raises
    `ModelLoadError` (an `OSError`) with one line naming the file: a missing, truncated or corrupt weight file,
    a config.json whose types or shapes do not fit the weights, a tokenizer.json of the wrong structure or an
    empty vocabulary, weights missing from the files or not finite. `UnsafeWeightsError` (a `ModelLoadError`)
    refuses pickle-only folders and sharded indexes that name pickle files, before anything is unpickled.
    """
    folder = resolve_model_folder(model_path, revision=revision)
    files = check_model_folder(folder)
    dtype_kwargs = {"dtype": dtype} if dtype else {}
    config_path = folder / "config.json"
    try:
        if trust_remote_code:
            model_class, (processor_class, image_processor_class, tokenizer_class) = _folder_classes(folder)
        else:
            model_type = _read_json(config_path).get("model_type")
            if model_type != ShowAttendTellConfig.model_type:
                raise ModelLoadError(
                    f"{config_path}: model_type is {model_type!r}, not {ShowAttendTellConfig.model_type!r}"
                )
            model_class = ShowAttendTellForConditionalGeneration
        try:
            config = model_class.config_class.from_pretrained(folder)
        except Exception as error:  # a field of the wrong type or value
            raise ModelLoadError(f"{config_path}: {one_line(error)}") from None
        _check_config(config, config_path)
        _check_shapes(model_class, config, folder, files)
        model, info = model_class.from_pretrained(
            folder, config=config, use_safetensors=True, output_loading_info=True, **dtype_kwargs
        )
        if trust_remote_code:
            processor = processor_class(
                image_processor_class.from_pretrained(folder), tokenizer_class.from_pretrained(folder)
            )
        else:
            processor = ShowAttendTellProcessor.from_pretrained(folder)
    except ModelLoadError:
        raise
    except Exception as error:  # anything else the files trigger in transformers: one line, not a traceback
        raise ModelLoadError(f"{folder}: cannot load the model ({one_line(error)})") from None
    _check_loaded(model, processor, info, folder, files)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def add_decoding_option_arguments(parser: argparse._ActionsContainer) -> None:
    """Declares `--fuse-attention` and `--capture-steps`, the options `set_decoding_options` turns on."""
    parser.add_argument(
        "--fuse-attention",
        action="store_true",
        help="compile the attention scores into one kernel (torch.compile: about 10 s once, then faster)",
    )
    parser.add_argument(
        "--capture-steps",
        action="store_true",
        help="on a GPU, compile the decoding step with torch.compile(mode='reduce-overhead'): each step shape "
        "recorded once as a CUDA graph and replayed (same captions; the first batch of each shape compiles)",
    )


def set_decoding_options(
    model: Any, *, fuse_attention_scores: bool = False, capture_steps: bool = False
) -> None:
    """
    Turns on the decoder's speed options (see `ShowAttendTellDecoder`: `fuse_attention_scores` compiles the
    attention scores, `capture_steps` compiles the decoding step with `torch.compile(mode="reduce-overhead")`,
    replayed from CUDA graphs on a GPU) on a loaded model. A model loaded with its folder's own code may
    predate an option: `ValueError` names it.
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


#: How the evaluation script's reports named their tokenisation before it always used the official one: the
#: Java PTB tokeniser when METEOR ran, else the Python imitation.
_LEGACY_TOKENIZATION = "coco-caption PTB (Java with METEOR, else the pure-Python equivalent)"


def normalize_eval_results(report: Mapping[str, Any]) -> dict[str, Any]:
    """
    Reads the report of `scripts/evaluate_captions.py --output` (`show_attend_tell.evaluation.build_report`,
    or its `card_results`) and returns what the model card shows:
    `{"dataset": str, "split": str, "tokenization": "ptb" | "approximate",
    "results": [{"num_beams": int | None, "metrics": {"BLEU-4": 19.1, ...}}]}`, with the scores in percent.

    The report's `results` map an entry (`beam_N`, or `predictions` for captions read from a file) to its scores
    (`bleu_1`..`bleu_4`, `meteor`, `rouge_l`, `cider`, fractions); its other keys (captions, settings, timings)
    are not shown. The dataset is named by its source name or file name (never a local path), a report of the
    first N images of a split (`settings.max_samples`) names its split "test (first N)", and approximate scores
    (`"tokenization": "approximate"`) stay labelled so.

    Raises:
        ValueError: not such a report, or one without any of these scores.
    """
    entries = report.get("results")
    if not isinstance(entries, Mapping):
        raise ValueError(
            'not an evaluation report of scripts/evaluate_captions.py --output (no "results" object of scores '
            "per beam size)"
        )
    results = []
    for label, scores in entries.items():
        beams = str(label).removeprefix("beam_")
        values = {
            _METRICS[key][0]: round(100.0 * float(value), 2)
            for key, value in (scores.items() if isinstance(scores, Mapping) else ())
            if key in _METRICS and isinstance(value, (int, float)) and math.isfinite(value)
        }
        if values:
            results.append({"num_beams": int(beams) if beams.isdigit() else None, "metrics": values})
    if not results:
        raise ValueError("the evaluation results name none of BLEU-1..4, METEOR, ROUGE-L, CIDEr")

    dataset = str(report.get("dataset") or "Flickr30K")
    if "/" in dataset or os.sep in dataset:
        dataset = Path(dataset).name  # a local copy's path: its name only, a card is public
    if "flickr30k" in dataset.lower():
        dataset = "Flickr30K"  # the hub name, a local copy and the source name all mean this
    split = str(report.get("split") or "test")
    settings = report.get("settings") if isinstance(report.get("settings"), Mapping) else {}
    if settings.get("max_samples") is not None:
        split = f"{split} (first {report.get('num_images', settings['max_samples'])})"
    tokenization = "approximate" if str(report.get("tokenization", "")).lower() == "approximate" else "ptb"
    if _LEGACY_TOKENIZATION in str(settings.get("tokenization", "")) and not any(
        "METEOR" in result["metrics"] for result in results
    ):
        # A report from before every score used the official tokenisation: without METEOR it was tokenised in Python.
        tokenization = "approximate"
    return {"dataset": dataset, "split": split, "tokenization": tokenization, "results": results}


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
        if results.get("tokenization") == "approximate":
            where += ", approximate tokenisation"
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
    if results and results.get("tokenization") == "approximate":
        lines.append(f"\n**{_APPROXIMATE_NOTE}**")
    return "\n".join(lines)


def _encoder_name(config: Any) -> str:
    """ "ResNet-101" for the standard depths, else the stage depths and widths of the checkpoint's ResNet."""
    encoder = config.encoder_config
    try:
        from .imagenet_weights_show_attend_tell import resnet_architecture_name

        return resnet_architecture_name(config).replace("resnet", "ResNet-")
    except ValueError:
        return f"ResNet (depths {list(encoder.depths)}, widths {list(encoder.hidden_sizes)})"


def _image_size_text(image_size: Mapping[str, int] | None) -> str:
    return f"{image_size['height']} x {image_size['width']}" if image_size else "the processor's size"


def _checkpoint_details(
    config: Any,
    num_parameters: int | None,
    generation: Mapping[str, Any],
    image_size: Mapping[str, int] | None,
) -> str:
    """A short table describing the checkpoint actually pushed, from its own config."""
    grid = config.encoded_image_size
    rows = [
        ("Input", f"RGB, resized to {_image_size_text(image_size)} pixels"),
        (
            "Encoder",
            f"{_encoder_name(config)}, {config.encoder_dim} channels pooled to {grid} x {grid} "
            f"({config.num_pixels} positions attended over)",
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
        rows.append(("Parameters", f"{num_parameters:,} ({num_parameters / 1e6:.1f} M)"))
    if generation:
        rows.append(
            (
                "Default decoding",
                f"beam {generation.get('num_beams', 1)}, up to {generation.get('max_new_tokens', '?')} tokens",
            )
        )
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


#: Written under a results table whose scores were tokenised by the Python imitation.
_APPROXIMATE_NOTE = (
    "APPROXIMATE scores: tokenised by a pure-Python imitation of coco-caption's PTB tokeniser (no Java was "
    "used), so they are not comparable with published ones."
)


def _summary(
    config: Any, training_args: Mapping[str, Any] | None, image_size: Mapping[str, int] | None
) -> str:
    """The card's opening paragraph: the architecture as this checkpoint has it."""
    grid = config.encoded_image_size
    if training_args is None:
        weights = ""
    elif training_args.get("no_pretrained_encoder"):
        weights = "randomly initialised "
    else:
        weights = "ImageNet-pretrained "
    return (
        f"A {weights}{_encoder_name(config)} turns the picture (resized to {_image_size_text(image_size)}) into a "
        f"grid of feature vectors ({config.encoder_dim} channels, pooled to {grid} x {grid}); an LSTM decoder "
        "writes the caption word by word, and before each word it computes a soft attention over the "
        f"{config.num_pixels} grid positions, so every word comes with a map of where the model looked. Captions "
        "are generated with beam search through the standard transformers `generate()`."
    )


def _training_section(
    training_args: Mapping[str, Any] | None, training_metrics: Mapping[str, Any] | None, config: Any
) -> str:
    """What the checkpoint was trained on and how, from the `training_args.json` training wrote beside it."""
    if not training_args:
        return (
            "This model folder holds no `training_args.json`, so how this checkpoint was trained is not recorded "
            "here."
        )
    args, metrics = training_args, training_metrics or {}
    data = metrics.get("data") or {}
    options = args.get("dataset_options") or {}
    source = str(args.get("dataset"))
    if options:
        source += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    if args.get("data_dir"):
        source += f", from a local copy ({Path(str(args['data_dir'])).name})"
    rows_text = ""
    if data.get("train_rows") is not None:
        rows_text = f" {data['train_rows']:,} training images"
        if data.get("val_rows") is not None:
            rows_text += f" and {data['val_rows']:,} validation images"
        rows_text += ";"
    sample_limits = [
        f"at most {args[key]:,} {what}"
        for key, what in (("max_train_samples", "training images"), ("max_val_samples", "validation images"))
        if args.get(key)
    ]
    data_text = (
        f"**Data.** {source}: splits `{args.get('train_split')}` (training) and `{args.get('val_split')}` "
        f"(validation);{rows_text} {args.get('captions_per_image')} captions per image"
        + (f", {', '.join(sample_limits)}" if sample_limits else "")
        + f". Captions are lower-cased, stripped of punctuation and truncated to {args.get('max_caption_words')} "
        f"words; the word map keeps words that occur at least {args.get('min_word_freq')} times in the training "
        f"captions ({config.vocab_size} entries with `<pad>`, `<start>`, `<end>`, `<unk>`)."
    )
    encoder = "randomly initialised" if args.get("no_pretrained_encoder") else "ImageNet weights"
    if args.get("fine_tune_encoder"):
        encoder += (
            f", stages {args.get('fine_tune_stages')} fine-tuned (learning rate {args.get('encoder_lr')})"
        )
    else:
        encoder += ", frozen"
    batch = f"{args.get('batch_size')}"
    if args.get("gradient_accumulation_steps", 1) != 1 or args.get("num_processes", 1) != 1:
        batch += (
            f" per process x {args.get('num_processes', 1)} processes x {args.get('gradient_accumulation_steps', 1)} "
            "accumulation steps"
        )
    best = metrics.get("best") or {}
    selection = "best validation BLEU-4 (approximate tokenisation)"
    if best.get("epoch") is not None:
        selection += f": epoch {best['epoch']}"
    table = [
        ("Model size preset", args.get("model_size")),
        ("Encoder", f"{_encoder_name(config)}, {encoder}"),
        (
            "Word embedding / attention / LSTM sizes",
            f"{config.embed_dim} / {config.attention_dim} / {config.decoder_dim}",
        ),
        ("Dropout", config.dropout),
        (
            "Loss",
            f"cross-entropy + doubly-stochastic attention regularisation, alpha_c = {config.alpha_c}",
        ),
        (
            "Optimiser",
            f"Adam, decoder learning rate {args.get('decoder_lr')}, gradient clipping {args.get('grad_clip')}",
        ),
        ("Batch size", batch),
        (
            "Epochs",
            f"{args.get('epochs')}"
            + (f" (at most {args['max_steps']} steps)" if args.get("max_steps") else ""),
        ),
        ("Mixed precision", args.get("mixed_precision")),
        ("Seed", args.get("seed")),
        ("Model selection", selection),
    ]
    if metrics.get("stopped_because"):
        table.append(("Stopped because", metrics["stopped_because"]))
    lines = ["| Hyperparameter | Value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in table if value is not None]
    return f"{data_text}\n\n**Procedure.**\n\n" + "\n".join(lines)


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
    training_args: Mapping[str, Any] | None = None,
    training_metrics: Mapping[str, Any] | None = None,
    image_size: Mapping[str, int] | None = None,
) -> str:
    """
    Fills the model card template (model_card.md): the results table and, when evaluation results are
    given, the `model-index` metadata that the Hub shows as an evaluation widget (both labelled when the scores
    are approximate); with the checkpoint's `config`, its description (opening summary, sizes, the shapes in the
    usage snippets) and, with the `training_args.json` (and `metrics.json`) that training wrote into the model
    folder, its training data and hyperparameters; the example attention figure; the repository id.

    The template's sections between `<!-- name -->` and `<!-- /name -->` markers (results-table,
    checkpoint-details, model-summary, training, attention-figure) are replaced; the rest is kept.
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
                metric_type=_METRIC_TYPES[name],
                metric_name=f"{name} (approximate tokenisation)"
                if results["tokenization"] == "approximate"
                else name,
                metric_value=value,
                metric_args={"num_beams": result["num_beams"]} if result["num_beams"] else None,
            )
            for result in results["results"]
            for name, value in result["metrics"].items()
        ]
    if training_args:
        # The Hub lists the model under the datasets its metadata names: the one it was trained on, if on the Hub.
        trained_on = str(training_args.get("dataset", "")).lower()
        card.data.datasets = ["nlphuji/flickr30k"] if "flickr30k" in trained_on else None
    text = str(card)
    text = _replace_section(text, "results-table", _results_table(results))
    if config is not None:
        text = _replace_section(
            text,
            "checkpoint-details",
            _checkpoint_details(config, num_parameters, generation or {}, image_size),
        )
        text = _replace_section(text, "model-summary", _summary(config, training_args, image_size))
        text = _replace_section(text, "training", _training_section(training_args, training_metrics, config))
        grid = config.encoded_image_size
        text = text.replace(GRID_PLACEHOLDER, f"{grid} x {grid}").replace(
            PIXELS_PLACEHOLDER, str(config.num_pixels)
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
    from .visualization import plot_attention, write_png

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
    write_png(figure, buffer)
    return buffer.getvalue(), " ".join(words)


def _training_record(path: Path) -> dict[str, Any] | None:
    """A JSON object training wrote into the model folder; None (and the card says it is not recorded) when
    the folder has none, or one that is not a JSON object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        print(f"warning: {path.name} not used for the model card ({one_line(error)})", file=sys.stderr)
        return None
    return record if isinstance(record, dict) else None


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
        training_args=_training_record(Path(model_dir) / TRAINING_ARGS_NAME),
        training_metrics=_training_record(Path(model_dir) / TRAINING_METRICS_NAME),
        image_size=processor.image_processor.size,
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
    "TRUST_REMOTE_CODE_HELP",
    "ModelLoadError",
    "UnsafeWeightsError",
    "add_trust_remote_code_argument",
    "assemble_repository",
    "attention_figure_png",
    "check_folder_loads",
    "check_model_folder",
    "example_image",
    "load_model_and_processor",
    "normalize_eval_results",
    "render_model_card",
    "resolve_model_folder",
    "upload_folder",
]
