"""ImageNet weights for the encoder: torchvision's ResNet checkpoints, renamed to transformers' `ResNetModel`."""

from __future__ import annotations

import re

import torch
from torch import nn

from .configuration_show_attend_tell import RESNET101, ShowAttendTellConfig

# torchvision's `ResNet101_Weights.IMAGENET1K_V1`: the checkpoint of `torchvision.models.resnet101(pretrained=True)`,
# which the specification's implementation used (the file name is what torchvision caches it under).
RESNET101_IMAGENET_URL = "https://download.pytorch.org/models/resnet101-63fe2227.pth"


def _listed(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value  # a config built in Python may hold tuples


def resnet_architecture_name(config: ShowAttendTellConfig) -> str:
    """ "resnet101" when the encoder is torchvision's ResNet-101 (the only one with ImageNet weights here), else
    a one-line ValueError."""
    encoder = config.encoder_config
    if all(_listed(getattr(encoder, key)) == value for key, value in RESNET101.items()):
        return "resnet101"
    raise ValueError(
        f"No torchvision ImageNet checkpoint matches an encoder with depths {list(encoder.depths)} and widths "
        f"{list(encoder.hidden_sizes)}: ImageNet weights are loaded for ResNet-101 only "
        f"(depths {RESNET101['depths']}, widths {RESNET101['hidden_sizes']})"
    )


def convert_torchvision_resnet_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Renames a torchvision ResNet state dict to the parameter names of transformers' `ResNetModel`.

    Both networks are the same ResNet v1.5 (stride in the 3 x 3 convolution of a bottleneck), so the
    mapping is a pure renaming; the classification layer `fc` is dropped.
    """
    renamed = {}
    for name, tensor in state_dict.items():
        if name.startswith("fc."):
            continue
        new_name = re.sub(r"^conv1\.", "embedder.embedder.convolution.", name)
        new_name = re.sub(r"^bn1\.", "embedder.embedder.normalization.", new_name)
        match = re.match(r"^layer(\d+)\.(\d+)\.(.+)$", new_name)
        if match:
            stage, block, rest = int(match.group(1)) - 1, match.group(2), match.group(3)
            rest = re.sub(r"^conv(\d)\.", lambda m: f"layer.{int(m.group(1)) - 1}.convolution.", rest)
            rest = re.sub(r"^bn(\d)\.", lambda m: f"layer.{int(m.group(1)) - 1}.normalization.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.convolution.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.normalization.", rest)
            new_name = f"encoder.stages.{stage}.layers.{block}.{rest}"
        if new_name == name:
            raise KeyError(f"unexpected parameter in a torchvision ResNet state dict: {name}")
        renamed[new_name] = tensor
    return renamed


def load_torchvision_resnet(resnet: nn.Module, config: ShowAttendTellConfig, progress: bool = True) -> None:
    """
    Loads torchvision's ImageNet weights of ResNet-101 into the encoder's `ResNetModel` (downloaded once into
    `$TORCH_HOME/hub/checkpoints`, under torchvision's own file name, and read with `weights_only=True`).
    """
    resnet_architecture_name(config)  # a one-line error before any download for another encoder
    state_dict = torch.hub.load_state_dict_from_url(
        RESNET101_IMAGENET_URL, progress=progress, map_location="cpu", weights_only=True
    )
    resnet.load_state_dict(convert_torchvision_resnet_state_dict(state_dict), strict=True)


__all__ = ["convert_torchvision_resnet_state_dict", "load_torchvision_resnet", "resnet_architecture_name"]
