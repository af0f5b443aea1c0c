"""Every codec behind one interface, measured by one function.

A codec turns an image into real bytes and back; :func:`measure` decodes those bytes and
computes bpp = 8 · len(bytes) / pixels and the PSNR of the decoded integer image against
the original — the same way for JPEG, WebP, AVIF and the neural codecs (CompressAI-style).
Each codec also chooses its own sweep: qualities for Pillow codecs, one fit per target bpp
for the networks.
"""
from __future__ import annotations

import io
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import KanimgError
from ..io import ImageData
from ..io import quantize as to_integers
from ..metrics import psnr

# Pillow qualities tried, ascending; a sweep stops at the first one past the largest target bpp.
QUALITIES = (1, 2, 3, 4, 5, 7, 10, 13, 16, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95)


@dataclass
class Encoded:
    """A codec's output for one setting: the bitstream and what the encoder knows about it."""

    data: bytes
    setting: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Point:
    """One measured rate–distortion point."""

    bpp: float
    psnr: float
    bytes: int
    setting: str
    encode_seconds: float
    decode_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


class Codec(ABC):
    name: str
    description: str

    def check(self, image: ImageData, bpps: Sequence[float] = ()) -> None:
        """Raise KanimgError when this codec cannot store ``image`` (at each of ``bpps``, for
        the codecs that are fitted to a target)."""

    @abstractmethod
    def sweep(self, image: ImageData, bpps: Sequence[float]) -> Iterator[Encoded]:
        """Encodings of ``image`` spanning the target bpps (the codec picks its settings)."""

    @abstractmethod
    def decode(self, data: bytes, image: ImageData) -> tuple[np.ndarray, int]:
        """(H, W, C) integers and their bit depth, from ``data`` alone (``image`` only gives the mode)."""


def measure(codec: Codec, image: ImageData, encoded: Encoded, encode_seconds: float = float("nan")) -> Point:
    """Decode ``encoded`` and score it: bpp of the real bytes, PSNR of the decoded integers."""
    started = time.perf_counter()
    ints, depth = codec.decode(encoded.data, image)
    decode_seconds = time.perf_counter() - started
    if ints.shape != image.pixels.shape:
        raise KanimgError(f"{codec.name} decoded a {ints.shape} image for a {image.pixels.shape} original")
    value = psnr(image.pixels, ints.astype(np.float64) / float(2**depth - 1))
    bpp = 8 * len(encoded.data) / (image.height * image.width)
    return Point(bpp, value, len(encoded.data), encoded.setting, encode_seconds, decode_seconds, dict(encoded.info))


def run_sweep(codec: Codec, image: ImageData, bpps: Sequence[float]) -> list[Point]:
    """Every point of ``codec``'s sweep over ``image``, in sweep order; settings that give an
    earlier one's size and PSNR (JPEG's lowest qualities of a small image) are that one point."""
    codec.check(image)
    points, seen = [], set()
    sweep = codec.sweep(image, bpps)
    while True:
        started = time.perf_counter()
        try:
            encoded = next(sweep)
        except StopIteration:
            break
        point = measure(codec, image, encoded, time.perf_counter() - started)
        if (point.bytes, point.psnr) not in seen:
            seen.add((point.bytes, point.psnr))
            points.append(point)
    return points


# ----------------------------------------------------------------------------- Pillow
class PillowCodec(Codec):
    """JPEG / WebP / AVIF through Pillow at a quality sweep, 8 bits per channel, no metadata."""

    def __init__(self, name: str, pil_format: str, modes: tuple[str, ...], description: str, **options: Any) -> None:
        self.name, self.pil_format, self.modes, self.description, self.options = name, pil_format, modes, description, options

    def check(self, image: ImageData, bpps: Sequence[float] = ()) -> None:
        from PIL import features

        if image.mode not in self.modes:
            raise KanimgError(f"{self.name} cannot store a {image.mode} image (it takes {', '.join(self.modes)}); "
                              f"leave it out of --codecs (rd runs jpeg,webp,avif unless told)")
        if self.pil_format == "AVIF" and not features.check("avif"):
            raise KanimgError("this Pillow has no AVIF support; upgrade Pillow (≥ 11.2) or drop avif from --codecs")

    def encode(self, image: ImageData, quality: int) -> bytes:
        from PIL import Image

        ints = to_integers(image.pixels, 8)
        picture = Image.fromarray(ints[..., 0] if image.channels == 1 else ints)
        buffer = io.BytesIO()
        picture.save(buffer, format=self.pil_format, quality=quality, **self.options)
        return buffer.getvalue()

    def sweep(self, image: ImageData, bpps: Sequence[float]) -> Iterator[Encoded]:
        top = max(bpps)
        for quality in QUALITIES:
            data = self.encode(image, quality)
            yield Encoded(data, f"quality={quality}", {"quality": quality})
            if 8 * len(data) / (image.height * image.width) > top:
                return

    def decode(self, data: bytes, image: ImageData) -> tuple[np.ndarray, int]:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as picture:
            ints = np.asarray(picture.convert(image.mode))
        return (ints[..., None] if ints.ndim == 2 else ints), 8


# ----------------------------------------------------------------------------- networks
class NeuralCodec(Codec):
    """A network fitted per target bpp, quantised and written as a .kimg file."""

    def __init__(self, name: str, description: str, config) -> None:
        self.name, self.description, self.config = name, description, config

    def check(self, image: ImageData, bpps: Sequence[float] = ()) -> None:
        from .neural import check_budget

        for bpp in bpps:
            check_budget(image, bpp, self.config)

    def sweep(self, image: ImageData, bpps: Sequence[float]) -> Iterator[Encoded]:
        from .neural import compress_image

        for bpp in sorted(bpps):
            result = compress_image(image, bpp, self.config)
            yield Encoded(result.data, f"target {bpp:g} bpp", result.summary())

    def decode(self, data: bytes, image: ImageData) -> tuple[np.ndarray, int]:
        from .bitstream import decode_image

        decoded = decode_image(data)
        return decoded.integers, decoded.image.bit_depth


CLASSIC = ("jpeg", "webp", "avif")
NEURAL = ("kan", "siren", "latent", "latent-kan")


def get_codec(name: str, neural_options: dict[str, Any] | None = None) -> Codec:
    """A codec by name: jpeg, webp, avif, kan, siren (COIN-style: float16 weights), latent or latent-kan.

    Raises:
        KanimgError: unknown name.
    """
    if name == "jpeg":
        return PillowCodec("jpeg", "JPEG", ("L", "RGB"), "JPEG (libjpeg via Pillow), 4:2:0, optimised Huffman tables", optimize=True)
    if name == "webp":
        return PillowCodec("webp", "WEBP", ("L", "RGB", "RGBA"), "WebP lossy (libwebp via Pillow), method 6", method=6)
    if name == "avif":
        return PillowCodec("avif", "AVIF", ("L", "RGB", "RGBA"), "AVIF (libavif via Pillow), default speed, 4:2:0")
    if name in NEURAL:
        from .neural import CompressConfig

        config = CompressConfig(model=name, **(neural_options or {}))
        description = {
            "kan": "KAN, uniform n-bit weights with quantisation-aware fine-tuning, range-coded (.kimg)",
            "siren": "COIN-style SIREN (ω0 = 30), float16 weights (.kimg)",
            "latent": "latent grids + ReLU synthesis (Cool-chic style), rate–distortion trained, range-coded (.kimg v5)",
            "latent-kan": "latent grids + order-1 KAN synthesis, rate–distortion trained, range-coded (.kimg v7: a grid and a reach per layer)",
        }[name]
        return NeuralCodec(name, description, config)
    raise KanimgError(f"unknown codec {name!r}; choose from {', '.join(CLASSIC + NEURAL)}")
