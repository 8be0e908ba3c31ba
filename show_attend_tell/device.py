"""The device a model runs on: one meaning of `--device` for every script and the HTTP service."""

from __future__ import annotations

import argparse

import torch

#: What `--device` accepts, for help texts and error messages.
DEVICE_CHOICES = "auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps"
#: `--device`'s help in every command line. search_images.py and app.py write it out to answer --help without
#: importing torch; tests/test_device.py checks that every script's --help says it.
DEVICE_HELP = f"{DEVICE_CHOICES} (default: auto)"


def add_device_argument(parser: argparse._ActionsContainer) -> None:
    """Declares `--device` on a parser or argument group; :func:`pick_device` reads what it holds."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """
    The torch device `name` stands for ("cpu", "cuda", "cuda:1", "mps"), checked to exist on this machine; `None`
    or "auto" picks the fastest one here: CUDA, then Apple's MPS, then the CPU.

    Raises ValueError with one line, starting with `name`, for a name torch does not know or a device this machine
    lacks, instead of the error torch would give only later, at the first tensor moved there (a script puts its
    option in front: "--device cuda: CUDA is not available here").
    """
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's own message lists every backend it was built with
        raise ValueError(f"{name}: not a device; use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: CUDA is not available here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: this machine has {count} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: Apple's MPS is not available here")
    return device


__all__ = ["DEVICE_CHOICES", "DEVICE_HELP", "add_device_argument", "pick_device"]
