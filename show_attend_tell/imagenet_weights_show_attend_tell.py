"""ImageNet weights for the encoder: torchvision's ResNet checkpoints, renamed to transformers' `ResNetModel`."""

from __future__ import annotations

import re

import torch
from torch import nn

from .configuration_show_attend_tell import RESNET_DEPTHS, ShowAttendTellConfig

# torchvision's ImageNet checkpoints (the file name is what torchvision caches them under).
TORCHVISION_RESNET_URLS = {
    ("resnet50", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ("resnet50", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    ("resnet101", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    ("resnet101", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
    ("resnet152", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet152-394f9c45.pth",
    ("resnet152", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet152-f82ba261.pth",
}


def resnet_architecture_name(config: ShowAttendTellConfig) -> str:
    """The torchvision name of the encoder's ResNet ("resnet101"), or a ValueError if there is none."""
    depths = list(config.encoder_config.depths)
    for name, known_depths in RESNET_DEPTHS.items():
        if depths == known_depths and config.encoder_config.layer_type == "bottleneck":
            return name
    raise ValueError(
        f"No torchvision ImageNet checkpoint matches an encoder with depths {depths}; "
        f"supported: {', '.join(f'{name} {d}' for name, d in RESNET_DEPTHS.items())}"
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


def load_torchvision_resnet(
    resnet: nn.Module, config: ShowAttendTellConfig, variant: str = "IMAGENET1K_V1", progress: bool = True
) -> None:
    """
    Loads torchvision's ImageNet weights into the encoder's `ResNetModel` (downloaded once into
    `$TORCH_HOME/hub/checkpoints`, under torchvision's own file name).

    `IMAGENET1K_V1` is the checkpoint of `torchvision.models.resnet101(pretrained=True)`, the one the
    specification's implementation used. The file is read with `weights_only=True`.
    """
    key = (resnet_architecture_name(config), variant)
    if key not in TORCHVISION_RESNET_URLS:
        raise ValueError(f"unknown ImageNet weights {variant!r}; choose IMAGENET1K_V1 or IMAGENET1K_V2")
    state_dict = torch.hub.load_state_dict_from_url(
        TORCHVISION_RESNET_URLS[key], progress=progress, map_location="cpu", weights_only=True
    )
    resnet.load_state_dict(convert_torchvision_resnet_state_dict(state_dict), strict=True)


__all__ = ["convert_torchvision_resnet_state_dict", "load_torchvision_resnet", "resnet_architecture_name"]
