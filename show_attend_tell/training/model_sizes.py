"""The model sizes that `scripts/train.py --model-size` offers.

* ``full``: the specification's model: ImageNet ResNet-101 encoder (2048 x 14 x 14 features at 256 px),
  embedding, attention and decoder sizes 512, dropout 0.5.
* ``small``: the demo model, a few minutes of training on two CPU cores: 64 px pictures, a ResNet with a
  32-channel stem and two stages of 64 and 128 channels whose native grid is 8 x 8, embedding and
  attention 64, decoder 128, dropout 0.3 (about 0.5 M parameters).
* ``tiny``: for tests: 32 px pictures, a two-stage ResNet of 8 and 16 channels with a native 4 x 4 grid.

transformers' ResNet divides the picture by 4 in its stem and by 2 in every stage after the first, so its
grid side is ``image_size / 2 ** (stages + 1)``: two stages give the 8 x 8 grid at 64 px. (Three stages
at 128 px give it too, 1.6 times slower, and each cell then sees most of the picture: measured on the
synthetic shapes, their attention localised less.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import ResNetConfig

from ..configuration_show_attend_tell import ShowAttendTellConfig

MODEL_SIZES: tuple[str, ...] = ("full", "small", "tiny")


@dataclass(frozen=True)
class ModelSize:
    """What a size means besides its configuration."""

    name: str
    image_size: int  # side of the square the image processor resizes pictures to
    has_imagenet_weights: bool  # whether torchvision publishes weights for this encoder


_SIZES = {
    "full": ModelSize("full", 256, True),
    "small": ModelSize("small", 64, False),
    "tiny": ModelSize("tiny", 32, False),
}


def model_size(name: str) -> ModelSize:
    """The `ModelSize` called `name` (one of `MODEL_SIZES`)."""
    if name not in _SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(MODEL_SIZES)}")
    return _SIZES[name]


def build_model_config(name: str, vocab_size: int, **overrides: Any) -> ShowAttendTellConfig:
    """
    The configuration of model size `name` for a word map of `vocab_size` words.

    `overrides` replace single fields (`embed_dim`, `attention_dim`, `decoder_dim`, `dropout`, `alpha_c`,
    `encoded_image_size`); `None` values are ignored so that unset command-line options keep the defaults.
    """
    model_size(name)  # validates the name
    fields: dict[str, Any] = {"vocab_size": vocab_size}
    if name == "small":
        fields.update(
            encoder_config=ResNetConfig(
                embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], layer_type="basic"
            ),
            encoded_image_size=8,
            embed_dim=64,
            attention_dim=64,
            decoder_dim=128,
            dropout=0.3,
        )
    elif name == "tiny":
        fields.update(
            encoder_config=ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
            ),
            encoded_image_size=4,
            embed_dim=16,
            attention_dim=16,
            decoder_dim=32,
            # Not zero: the resume tests must show that dropout masks are reproduced after a restart.
            dropout=0.1,
        )
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return ShowAttendTellConfig(**fields)


__all__ = ["MODEL_SIZES", "ModelSize", "build_model_config", "model_size"]
