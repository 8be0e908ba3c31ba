"""What the benchmarks share: device synchronisation, the precision context, batch-norm calibration, a setting
changed for the length of a measurement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def synchronize(device: torch.device) -> None:
    """Waits for the GPU's queued work, so that a timer measures it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def setting(owner: object, name: str, value: object) -> Iterator[None]:
    """`owner.name = value` for the length of the block (a piece of speed machinery turned on or off)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def precision(dtype: str, device: torch.device):
    """bf16 autocast (weights stay float32, as `--mixed-precision bf16`) or plain float32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def calibrate_batchnorm(resnet: torch.nn.Module, images: torch.Tensor, chunk: int = 8) -> None:
    """
    Sets every batch-norm's running statistics to those of `images`, so activations stay of unit scale: a
    random ResNet-101's features otherwise reach 1e4 to 1e5 (saturating the LSTM, overflowing float16).
    """
    norms = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    resnet.train()
    for start in range(0, images.shape[0], chunk):
        resnet(images[start : start + chunk])
    for norm in norms:
        norm.momentum = 0.1
    resnet.eval()
