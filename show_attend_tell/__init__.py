"""Show, Attend and Tell image captioning as a Hugging Face transformers model."""

from .captioning import CaptionedImage, caption_images
from .configuration_show_attend_tell import ShowAttendTellConfig
from .image_processing_show_attend_tell import ShowAttendTellImageProcessor
from .modeling_show_attend_tell import (
    ShowAttendTellCache,
    ShowAttendTellForConditionalGeneration,
    convert_torchvision_resnet_state_dict,
)
from .overlapped_generation import generate_overlapped
from .processing_show_attend_tell import ShowAttendTellProcessor
from .registration import register_auto_classes
from .tokenization_show_attend_tell import ShowAttendTellTokenizer

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "CaptionedImage",
    "ShowAttendTellCache",
    "ShowAttendTellConfig",
    "ShowAttendTellForConditionalGeneration",
    "ShowAttendTellImageProcessor",
    "ShowAttendTellProcessor",
    "ShowAttendTellTokenizer",
    "caption_images",
    "convert_torchvision_resnet_state_dict",
    "generate_overlapped",
    "register_auto_classes",
]
