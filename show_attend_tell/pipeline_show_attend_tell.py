"""`pipeline("image-to-text")` for Show, Attend and Tell, shipped next to the weights.

transformers 5 removed its own image-to-text pipeline and redirects the task name to image-text-to-text,
which a captioning model without a text prompt does not fit. A model folder whose config.json declares
`custom_pipelines: {"image-to-text": ...}` and holds this file is given this class instead, on 5.x and on
4.x alike (both look at the folder's declaration before their own task table):

```python
>>> from transformers import pipeline
>>> captioner = pipeline("image-to-text", model="path/or/repo", trust_remote_code=True)
>>> captioner("photo.jpg")
[{'generated_text': 'a dog runs on the grass'}]
>>> captioner(["a.jpg", "https://example.com/b.png"], batch_size=8, generate_kwargs={"num_beams": 5})
[[{'generated_text': ...}], [{'generated_text': ...}]]
>>> captioner("photo.jpg", return_attention=True)[0]["attention"].shape  # (words, grid positions)
(6, 196)
```

Like every file saved with the weights, this one imports only torch, transformers, PIL, numpy and its
sibling `*_show_attend_tell.py` files, so a user needs neither this package nor torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Pipeline

from .configuration_show_attend_tell import PIPELINE_DECLARATION, PIPELINE_TASK
from .image_processing_show_attend_tell import load_image


def words_and_attention(
    sequence: Sequence[int] | torch.Tensor,
    attention: torch.Tensor | np.ndarray | None,
    tokenizer: Any,
) -> tuple[list[str], np.ndarray | None]:
    """
    The generated words of one sequence and, when `attention` is given, the attention map of each word.

    `sequence` is one row of `generate()`'s output (it starts with the decoder start token, so token `t + 1`
    was produced at step `t`); `attention` is the matching row of `outputs.attention_maps`,
    `(steps, num_pixels)`. Decoding stops at the first `<end>` or `<pad>`; `<start>` is skipped and an
    unknown word stays as `<unk>` (it was generated and has a map). The result lines up one map per word,
    which is what the `plot_attention` of the package's visualization module takes.
    """
    ids = [int(token) for token in (sequence.tolist() if hasattr(sequence, "tolist") else sequence)]
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    skip = {tokenizer.bos_token_id}
    words: list[str] = []
    steps: list[int] = []
    for step, token in enumerate(ids[1:]):
        if token in stop:
            break
        if token in skip:
            continue
        words.append(tokenizer.convert_ids_to_tokens(token))
        steps.append(step)
    if attention is None:
        return words, None
    maps = attention.detach().float().cpu().numpy() if hasattr(attention, "detach") else np.asarray(attention)
    return words, maps[steps].astype(np.float32)


class ShowAttendTellImageToTextPipeline(Pipeline):
    """
    Captions images with a Show, Attend and Tell model.

    Inputs: a file path, an http(s) URL, a PIL image or an array, or a list of them. Call arguments:

    - `max_new_tokens`, `num_beams`, `num_return_sequences`, or any `generate()` argument in
      `generate_kwargs` (defaults come from the model's generation_config.json);
    - `return_attention=True` adds, to every caption, `words` (the generated words) and `attention`, a
      float32 array `(len(words), num_pixels)` with the map over the encoder's grid for each word;
    - `timeout`: seconds allowed to download a URL;
    - `batch_size` / `num_workers` (handled by `Pipeline`).

    Returns, for one image, a list with one dict per returned sequence (`{"generated_text": ...}`); for a list
    of images, one such list per image. A file that is not a usable image raises `ValueError` whose message
    names the file and the reason.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        num_return_sequences: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        return_attention: bool | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        generate = dict(generate_kwargs or {})
        # The usual decoding arguments may also be passed directly, as with other captioning pipelines.
        direct = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "num_return_sequences": num_return_sequences,
        }
        for name, value in direct.items():
            if value is None:
                continue
            if name in generate:
                raise ValueError(f"`{name}` is given both directly and in `generate_kwargs`; give it once")
            generate[name] = value
        if generate:
            forward_params["generate_kwargs"] = generate
        if return_attention is not None:
            forward_params["return_attention"] = bool(return_attention)
            postprocess_params["return_attention"] = bool(return_attention)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        if isinstance(image, (str, bytes, os.PathLike)) or hasattr(image, "read"):
            image = load_image(image, timeout=timeout)
        elif isinstance(image, Image.Image):
            image = load_image(image)  # upright RGB, with a one-line error for truncated data
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values}

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        generate_kwargs: dict[str, Any] | None = None,
        return_attention: bool = False,
    ) -> dict[str, torch.Tensor]:
        pixel_values = model_inputs["pixel_values"].to(self.model.dtype)
        images = pixel_values.shape[0]
        generate_kwargs = dict(generate_kwargs or {})
        if return_attention:
            outputs = self.model.generate(
                pixel_values=pixel_values,
                output_attentions=True,
                return_dict_in_generate=True,
                **generate_kwargs,
            )
            sequences, maps = outputs.sequences, outputs.attention_maps
        else:
            sequences, maps = self.model.generate(pixel_values=pixel_values, **generate_kwargs), None
        # generate() returns num_return_sequences rows per image, image by image. Group them per image, so
        # that the batching machinery hands each image its own rows.
        per_image = sequences.shape[0] // images
        result = {"sequences": sequences.reshape(images, per_image, -1)}
        if maps is not None:
            result["attention"] = maps.reshape(images, per_image, *maps.shape[1:])
        return result

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], return_attention: bool = False
    ) -> list[dict[str, Any]]:
        sequences = model_outputs["sequences"][0]
        maps = model_outputs.get("attention") if return_attention else None
        records = []
        for row, sequence in enumerate(sequences):
            record: dict[str, Any] = {
                "generated_text": self.tokenizer.decode(sequence, skip_special_tokens=True)
            }
            if maps is not None:
                words, attention = words_and_attention(sequence, maps[0, row], self.tokenizer)
                record["words"] = words
                record["attention"] = attention
            records.append(record)
        return records


# What `PIPELINE_REGISTRY.register_pipeline` would record, set on the class only: registering globally
# would replace transformers 4.x's own image-to-text pipeline for every other model in the process.
# With it, `captioner.save_pretrained(dir)` / `captioner.push_to_hub(repo)` write the declaration and
# copy this file, as transformers does for registered custom pipelines.
ShowAttendTellImageToTextPipeline._registered_impl = {
    PIPELINE_TASK: {
        "impl": ShowAttendTellImageToTextPipeline,
        "pt": (AutoModel,),
        "tf": (),
        "type": "multimodal",
    }
}

__all__ = [
    "PIPELINE_DECLARATION",
    "PIPELINE_TASK",
    "ShowAttendTellImageToTextPipeline",
    "words_and_attention",
]
