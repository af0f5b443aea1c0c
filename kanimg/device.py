"""Which device a run trains on: the one choice fit, compare and the codec share."""
from __future__ import annotations

import torch

from .errors import KanimgError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KanimgError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if name not in DEVICES:
        raise KanimgError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)
