"""Shared fixtures: small crops of the bundled photograph, written as files in tmp dirs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():
    # Triton's interpreter runs the CUDA layer's kernels on CPU tensors (tests/test_triton_kan.py);
    # it must be on before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ASSET = Path(__file__).resolve().parent.parent / "assets" / "astronaut.png"


@pytest.fixture(autouse=True)
def _two_threads():
    """Tests run with the thread count CI has (and their timings are stable)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


def photo_crop(size: int = 32, mode: str = "RGB", box: tuple[int, int] = (96, 64)) -> np.ndarray:
    """A size×size crop of the bundled photograph (the astronaut's face region), as uint8."""
    with Image.open(ASSET) as im:
        crop = im.convert(mode).crop((box[0], box[1], box[0] + size, box[1] + size))
        return np.asarray(crop)


@pytest.fixture
def photo32(tmp_path) -> Path:
    path = tmp_path / "crop32.png"
    Image.fromarray(photo_crop(32)).save(path)
    return path
