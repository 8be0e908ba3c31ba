"""Processor: the image processor and the word-map tokenizer behind one object."""

from __future__ import annotations

import transformers
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class ShowAttendTellProcessor(ProcessorMixin):
    r"""
    Wraps a [`ShowAttendTellImageProcessor`] and a [`ShowAttendTellTokenizer`].

    `processor(images=..., text=...)` returns `pixel_values` `(images, 3, height, width)` (the image processor's
    options, e.g. `do_resize=False` or `size={"height": 128, "width": 128}`, may be given too) and, for text,
    `input_ids` / `attention_mask` (`<start> words <end>`, padded to the longest caption and truncated to
    `max_length` tokens). `batch_decode` turns generated ids into captions without special tokens.
    """

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x looks the sub-processors up by these names; 5.x infers them from __init__ and warns if set.
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("pass images, text, or both")
        # The image processor's own options (do_resize, size, ...) go to it; the rest to the tokenizer.
        image_options = {
            name: kwargs.pop(name)
            for name in getattr(self.image_processor, "call_options", ())
            if name in kwargs
        }
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **image_options))
        if text is not None:
            data.update(
                self.tokenizer(
                    text,
                    return_tensors=return_tensors,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    **kwargs,
                )
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["ShowAttendTellProcessor"]
