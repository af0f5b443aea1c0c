"""Choose a network for a bit budget: bytes = 8 · bpp / pixels, minus the header, divided by
the bits each stored number is expected to take.

KAN: widths [2, 2w, w, w, C] with grids [G1, 4, 4, 4]. The first layer sees the
coordinates and needs a fine grid, proportional to the image's longer side; it is wide
because it is cheap to decode (it is a function of x plus one of y, evaluated once per row
and column). Small grids suffice deeper, where quantisation also costs least. The width w
is the largest that fits. (Measured against deeper and narrower shapes: docs/compression.md.) SIREN (COIN): the depth COIN used at the nearest bpp
(5, 10 or 13 sine layers), the widest layers that fit at 16 bits per weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import KanimgError
from . import kimg
from .entropy import StreamModel
from .kimg import ImageInfo, KimgFile, TensorHeader
from .quantize import QuantConfig
from .tensors import parameter_count, slots

# Entropy coding stores a fitted network's n-bit integers in about n - 1.6 bits each
# (measured on KANs at 6 to 8 bits: docs/compression.md); rate control then picks the bits
# that actually fit. Automatic sizing designs for 7 bits, the best trade-off measured.
CODING_GAIN_BITS = 1.6
DESIGN_BITS = 7
KAN_HIDDEN_GRID = 4
KAN_FIRST_GRID_PER_PIXEL = 1 / 6  # G1 = this × the longer image side …
KAN_FIRST_GRID_RANGE = (16, 256)  # … within these bounds
# COIN (Dupont et al. 2021, appendix A): (sine layers, width) of its networks on Kodak, from
# 0.07 to 1.2 bpp.
COIN_SHAPES = ((5, 20), (5, 30), (10, 28), (10, 40), (13, 49))
MAX_WIDTH = 1024


@dataclass
class Sizing:
    """A chosen model: its spec, stored numbers, and the byte budget it was sized for."""

    spec: dict
    params: int
    budget_bytes: float
    header_bytes: int
    estimated_bytes: float
    capped: bool = False  # the decoder's limits, not the budget, set the size: the file lands well under it


def header_bytes(spec: dict, image: ImageInfo, quant: QuantConfig) -> int:
    """Size of a .kimg file for ``spec`` with an empty payload (worst case: every smooth tensor
    coded with first differences, two streams)."""
    tensors = []
    if not quant.is_float16:
        for slot in slots(spec):
            rows = slot.shape[0] if quant.granularity == "channel" and len(slot.shape) > 1 else 1
            transform = 1 if slot.smooth else 0
            tensors.append(TensorHeader(quant.bits, [0.0] * rows, transform, [StreamModel(0, 0, 0)] * (transform + 1)))
    ranges = [None] * (len(spec["widths"]) - 1) if spec["name"] == "kan" else []
    return len(kimg.write(KimgFile(image, spec, quant, ranges, tensors, b"")))


def kan_spec(width: int, image: ImageInfo) -> dict:
    low, high = KAN_FIRST_GRID_RANGE
    first = int(min(high, max(low, round(KAN_FIRST_GRID_PER_PIXEL * max(image.height, image.width)))))
    return {"name": "kan", "widths": [2, 2 * width, width, width, image.channels], "grids": [first] + [KAN_HIDDEN_GRID] * 3,
            "grid_kind": "uniform", "directions": 0, "levels": 0}  # .kimg stores a grid as its range, and KANs on x and y


def coin_depth(params: float, channels: int = 3) -> int:
    """Sine layers of the COIN network whose size is nearest (in log) to ``params`` numbers."""
    def size(depth: int, width: int) -> int:
        return 3 * width + (depth - 1) * (width * width + width) + (width + 1) * channels

    return min(COIN_SHAPES, key=lambda shape: abs(math.log(size(*shape) / params)))[0]


def siren_spec(width: int, image: ImageInfo, depth: int) -> dict:
    return {"name": "siren", "widths": [2] + [width] * depth + [image.channels], "omega0": 30.0}


def budget_error(codec: str, image: ImageInfo, bpp: float, smallest: float) -> KanimgError:
    """The one-line refusal of a budget under ``codec``'s smallest file of ``image`` (``smallest``
    bytes), with the bpp to ask for, or, where that is more than the image's own bits per pixel
    (a few pixels), that no file of it pays."""
    least, raw = math.ceil(8000 * smallest / image.pixels - 1e-9) / 1000, image.channels * image.bit_depth  # rounded up: enough
    if least <= raw:
        return KanimgError(f"{bpp:g} bpp is {bpp * image.pixels / 8:.0f} bytes for this {image.width}x{image.height} image, "
                           f"less than the smallest {codec} file ({smallest:.0f} bytes); ask for at least {least:.3f} bpp")
    return KanimgError(f"the smallest {codec} file of this {image.width}x{image.height} image ({smallest:.0f} bytes) is {least:g} bpp, "
                       f"more than the image's own {raw} bits per pixel: too few pixels for a {codec} file")


def size_model(family: str, image: ImageInfo, bpp: float, quant: QuantConfig) -> Sizing:
    """The largest model of ``family`` whose estimated file fits ``bpp`` and whose decode
    stays within kimg.DECODE_LIMITS (on a large image a budget can buy a network no decoder
    would run: its file would be refused after the training).

    Raises:
        KanimgError: even the smallest model of the family does not fit.
    """
    if not bpp > 0:
        raise KanimgError(f"bpp must be positive, got {bpp}")
    budget = bpp * image.pixels / 8
    per_param = 16.0 if quant.is_float16 else quant.bits - CODING_GAIN_BITS

    depth = coin_depth(budget * 8 / per_param, image.channels)

    def build(width: int) -> dict:
        return kan_spec(width, image) if family == "kan" else siren_spec(width, image, depth)

    def estimate(spec: dict) -> float:
        return header_bytes(spec, image, quant) + parameter_count(spec) * per_param / 8

    if family not in ("kan", "siren"):
        raise KanimgError(f"no sizing rule for model {family!r}; choose kan or siren")
    def decodable(spec: dict) -> bool:
        return kimg.DECODE_LIMITS.admits(*kimg.decode_cost(spec, image.height, image.width, image.channels))

    if estimate(build(1)) > budget:
        raise budget_error(family, image, bpp, estimate(build(1)))
    if not decodable(build(1)):
        raise KanimgError(f"{image.width}x{image.height} is too large for a {family} file: even its smallest network "
                          f"would cost more to decode than the decoder's limits; crop or downscale the image")
    lo, hi = 1, MAX_WIDTH  # largest width that fits: binary search (estimate and decode cost grow with width)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        spec = build(mid)
        lo, hi = (mid, hi) if estimate(spec) <= budget and decodable(spec) else (lo, mid - 1)
    spec = build(lo)
    capped = lo < MAX_WIDTH and estimate(build(lo + 1)) <= budget
    return Sizing(spec, parameter_count(spec), budget, header_bytes(spec, image, quant), estimate(spec), capped)
