"""Chunked full-grid inference: a fitted model evaluated at any resolution in flat memory."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .sampling import chunks, pixel_coords, to_pixels

EVAL_CHUNK = 1 << 16  # pixels per forward pass (CPU: larger chunks were no faster)
GPU_EVAL_CHUNK = 1 << 18  # on CUDA: fewer, fuller launches; a few hundred MB of activations


def eval_chunk(device: torch.device | str) -> int:
    """Pixels per forward pass of an evaluation or render on ``device``."""
    return GPU_EVAL_CHUNK if torch.device(device).type == "cuda" else EVAL_CHUNK


@torch.no_grad()
def predict(model: nn.Module, coords: Tensor, chunk: int | None = None, forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Model outputs (N, C) for coordinates (N, 2), evaluated ``chunk`` rows at a time
    (default: :func:`eval_chunk` of their device), in eval mode; ``forward`` (default: the
    model itself) is what runs on each chunk, e.g. the model with transformed weights."""
    chunk = chunk or eval_chunk(coords.device)
    forward = forward or model
    was_training = model.training
    model.eval()
    try:
        return torch.cat([forward(coords[rows]) for rows in chunks(coords.shape[0], chunk)])
    finally:
        model.train(was_training)


@torch.no_grad()
def render(model: nn.Module, height: int, width: int, convention: str = "centers",
           device: torch.device | str = "cpu", chunk: int | None = None) -> np.ndarray:
    """(H, W, C) float pixels in [0, 1] (unclipped) of the model on an H×W pixel grid.

    Coordinates are generated a band of rows at a time, so memory stays flat however large
    the render; only the output image itself is held.
    """
    chunk = chunk or eval_chunk(device)
    bands = [
        predict(model, pixel_coords(height, width, convention, device, rows), chunk).cpu()
        for rows in chunks(height, max(1, chunk // width))
    ]
    return to_pixels(torch.cat(bands), height, width)
