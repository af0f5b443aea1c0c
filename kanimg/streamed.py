"""A fit's outputs for an image too large to hold (kanimg.mapped): the reconstruction, the error
map and the scores, made band by band of rows so that no whole image is ever in memory.

One render pass writes reconstruction.png and keeps its integers in an unnamed temporary map
(the size of the source's samples; deleted by the OS whatever happens); the error map and SSIM
then read those integers back beside the source's rows. PSNR is of the unclipped render, as
for in-memory images; SSIM is of the exported PNG (its rounding moves SSIM by ~1e-6); LPIPS
needs the whole image and is not computed.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import quantize, save_png_rows
from .mapped import MappedImage, scratch_image
from .metrics import psnr_from_mse, ssim_in_bands
from .plots import error_map
from .render import render_bands
from .sampling import BAND_PIXELS

SSIM_BAND_PIXELS = 1 << 17  # SSIM's temporaries take ~120 bytes a pixel
LPIPS_NOTE = "not computed for streamed images (LPIPS needs the whole image in memory)"


def stream_outputs(model: nn.Module, image: MappedImage, convention: str, device: torch.device,
                   folder: Path | None = None) -> dict:
    """The scores of ``model`` on ``image`` (reconstruction_metrics' keys); with ``folder``, also
    write reconstruction.png and error.png into it."""
    height, width, channels, depth = image.height, image.width, image.channels, image.bit_depth
    exported = scratch_image((height, width, channels), depth, "reconstruction", folder, purpose="the reconstruction's samples")
    squared = {"render": 0.0, "png": 0.0}

    def rendered():
        for start, band in render_bands(model, height, width, convention, device):
            reference = image.rows(start, start + band.shape[0]).astype(np.float64)
            ints = quantize(band, depth)
            exported.write_rows(start, ints)
            squared["render"] += float(np.square(band - reference).sum())
            squared["png"] += float(np.square(ints / float(2**depth - 1) - reference).sum())
            yield ints

    if folder is not None:
        save_png_rows(folder / "reconstruction.png", height, width, channels, depth, rendered())
        rows = max(1, BAND_PIXELS // width)
        errors = (error_map(image.rows(start, start + rows), exported.rows(start, start + rows)) for start in range(0, height, rows))
        save_png_rows(folder / "error.png", height, width, 3, 8, errors)
    else:
        for _ in rendered():
            pass
    count = height * width * channels
    return {
        "psnr": psnr_from_mse(squared["render"] / count),
        "psnr_png": psnr_from_mse(squared["png"] / count),
        "ssim": ssim_in_bands(image.rows, exported.rows, height, max(32, SSIM_BAND_PIXELS // width)),
        "lpips": None,
        "lpips_note": LPIPS_NOTE,
    }


def render_png(model: nn.Module, height: int, width: int, convention: str, device: torch.device, path: Path,
               bit_depth: int = 8) -> int:
    """Render the model on an H×W grid straight into a PNG, band by band (any size up to
    MAX_STREAM_PIXELS, in flat memory); returns its channel count."""
    bands = render_bands(model, height, width, convention, device)
    _, first = next(bands)
    save_png_rows(path, height, width, first.shape[2], bit_depth,
                  (quantize(band, bit_depth) for band in itertools.chain([first], (band for _, band in bands))))
    return first.shape[2]
