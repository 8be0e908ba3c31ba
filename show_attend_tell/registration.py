"""Makes the model known to the Auto classes, in this process and in every folder it is saved to."""

from __future__ import annotations

import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_show_attend_tell import ShowAttendTellConfig
from .image_processing_show_attend_tell import ShowAttendTellImageProcessor
from .modeling_show_attend_tell import ShowAttendTellForConditionalGeneration
from .processing_show_attend_tell import ShowAttendTellProcessor
from .saving_show_attend_tell import IMAGE_TO_TEXT_AUTO_CLASSES
from .tokenization_show_attend_tell import ShowAttendTellTokenizer


def register_auto_classes() -> None:
    """Registers every class with its Auto class, in this process and for `save_pretrained`."""
    model_type = ShowAttendTellConfig.model_type
    AutoConfig.register(model_type, ShowAttendTellConfig, exist_ok=True)
    AutoModel.register(ShowAttendTellConfig, ShowAttendTellForConditionalGeneration, exist_ok=True)
    for name in IMAGE_TO_TEXT_AUTO_CLASSES:
        getattr(transformers, name).register(
            ShowAttendTellConfig, ShowAttendTellForConditionalGeneration, exist_ok=True
        )
    AutoTokenizer.register(ShowAttendTellConfig, fast_tokenizer_class=ShowAttendTellTokenizer, exist_ok=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        # One implementation (Pillow and numpy, through transformers' image transforms) serves both backends:
        # 5.x asks for the "torchvision" class whenever torchvision is installed, and with only a "pil" class
        # registered it warns on every load that the torchvision backend is not available.
        AutoImageProcessor.register(
            ShowAttendTellConfig,
            image_processor_classes={
                "pil": ShowAttendTellImageProcessor,
                "torchvision": ShowAttendTellImageProcessor,
            },
            exist_ok=True,
        )
    else:
        AutoImageProcessor.register(
            ShowAttendTellConfig, slow_image_processor_class=ShowAttendTellImageProcessor, exist_ok=True
        )
    AutoProcessor.register(ShowAttendTellConfig, ShowAttendTellProcessor, exist_ok=True)

    # save_pretrained copies the code files next to the weights and writes auto_map for these.
    ShowAttendTellConfig.register_for_auto_class("AutoConfig")
    ShowAttendTellForConditionalGeneration.register_for_auto_class("AutoModel")
    ShowAttendTellTokenizer.register_for_auto_class("AutoTokenizer")
    ShowAttendTellImageProcessor.register_for_auto_class("AutoImageProcessor")
    ShowAttendTellProcessor.register_for_auto_class("AutoProcessor")
