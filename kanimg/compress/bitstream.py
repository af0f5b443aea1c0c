"""A network to .kimg bytes and back: quantise each stored tensor, transform it, entropy-code.

KAN spline coefficients are smooth along the grid axis: each such tensor is coded as
differences of order 0, 1 or 2 along that axis — whichever takes the fewest bits, header
included — with the first value (and first difference) of every row as separate streams.
Decoding dequantises exactly and evaluates the network on the CPU so that rounding to
integer pixels is the same on every run and every machine (``render_integers``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import KanimgError
from ..io import quantize as to_integers
from ..models import build_model
from ..nn.bspline import SPLINE_ORDER
from ..render import GridEvaluator
from ..sampling import chunks
from . import kimg
from .entropy import StreamDecoder, cost_bits, encode_streams, fit_model
from .latent import LatentImage, code_latents, decode_latents, synthesis_tiles
from .kimg import DECODE_LIMITS, MAX_TRANSFORM, TILE_VALUES, DecodeLimits, ImageInfo, KimgFile, TensorHeader
from .quantize import QuantConfig, QuantizedTensor, quantize_tensor, round_float16
from .tensors import grid_ranges, load_arrays, slots, stored_arrays

MODEL_BYTES = 3  # a stream's entropy model in the header (usually): centre varint + θ code


def split_streams(ints: np.ndarray, transform: int) -> list[np.ndarray]:
    """Differences of order ``transform`` along the last axis: the first value of each lower
    order per row (``transform`` streams), then the highest-order differences."""
    heads, current = [], ints
    for _ in range(transform):
        heads.append(current[..., 0])
        current = np.diff(current, axis=-1)
    return heads + [current]


def join_streams(streams: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_streams` (streams already shaped (…, 1 value per row) and (…, M-t))."""
    current = streams[-1]
    for head in reversed(streams[:-1]):
        current = np.concatenate([head[..., None], head[..., None] + np.cumsum(current, axis=-1)], axis=-1)
    return current


def stream_limits(levels: int, transform: int) -> list[int]:
    """Largest magnitude of each stream: order-k differences of values within ±levels."""
    return [levels * 2**k for k in range(transform + 1)]


@dataclass
class CodedTensor:
    """One tensor ready for the file: its header, streams (with their limits) and ideal size."""

    header: TensorHeader
    streams: list[np.ndarray]
    limits: list[int]
    bits: float  # ideal coded size of the streams and their models, in bits


def code_tensor(values: np.ndarray, quant: QuantConfig, smooth: bool, max_transform: int = MAX_TRANSFORM) -> CodedTensor:
    """Quantise one tensor and choose its cheapest transform."""
    quantized = quantize_tensor(values, quant)
    best = None
    for transform in range(max_transform + 1 if smooth else 1):
        if transform and transform >= quantized.ints.shape[-1]:
            break
        streams = split_streams(quantized.ints, transform)
        limits = stream_limits(quant.levels, transform)
        models = [fit_model(s.ravel(), limit) for s, limit in zip(streams, limits)]
        bits = sum(cost_bits(s.ravel(), m, limit) for s, m, limit in zip(streams, models, limits)) + 8 * MODEL_BYTES * len(models)
        if best is None or bits < best.bits:
            best = CodedTensor(TensorHeader(quant.bits, quantized.steps, transform, models), streams, limits, bits)
    return best


def encode_model(model: nn.Module, image: ImageInfo, quant: QuantConfig, bits: Sequence[float] | None = None,
                 max_transform: int = MAX_TRANSFORM, coded_latents: tuple | None = None) -> bytes:
    """The .kimg bytes of ``model`` (a "kan" or "siren" from the registry, or a latent-grid
    image, whose grids go first) fitted to ``image``.

    ``bits`` gives each stored tensor its own bit depth (default: ``quant.bits`` for all);
    ``max_transform`` limits the differencing of spline coefficients (0 = none; for ablations);
    ``coded_latents``: the model's grids already through :func:`code_latents` (the same grids
    written at several synthesis precisions are coded once).
    """
    spec = {k: model.spec[k] for k in ("name", "widths", "grids", "omega0", "synthesis", "reaches") if k in model.spec}
    arrays = stored_arrays(model)
    ranges = grid_ranges(model) if spec["name"] == "kan" else []
    if quant.is_float16:
        payload = b"".join(round_float16(a).astype("<f2").tobytes() for a in arrays)
        return kimg.write(KimgFile(image, spec, quant, ranges, [], payload))
    bits = list(bits) if bits is not None else [quant.bits] * len(arrays)
    if spec["name"] == "latent":
        coded_latents = coded_latents or code_latents(model.integer_latents())
        levels, streams, limits, models = (list(part) for part in coded_latents)  # copies: extended below
    else:
        levels, streams, limits, models = [], [], [], []
    headers = []
    for slot, array, n in zip(slots(spec), arrays, bits):
        coded = code_tensor(array, QuantConfig(n, quant.granularity), slot.smooth, max_transform)
        header, tensor_streams, tensor_limits = coded.header, coded.streams, coded.limits
        headers.append(header)
        streams += [s.ravel() for s in tensor_streams]
        limits += tensor_limits
        models += header.models
    payload = encode_streams(streams, limits, models)
    return kimg.write(KimgFile(image, spec, QuantConfig(max(bits), quant.granularity), ranges, headers, payload, levels))


def describe(quant: QuantConfig, bits: Sequence[float]) -> str:
    """'float16', '7-bit per tensor' or '5–9.5-bit per tensor'."""
    if quant.is_float16 or not bits or min(bits) == max(bits):
        return str(quant if quant.is_float16 or not bits else QuantConfig(bits[0], quant.granularity))
    return f"{min(bits):g}–{max(bits):g}-bit per {quant.granularity}"


@dataclass
class DecodedModel:
    model: nn.Module  # float64, CPU, eval mode
    image: ImageInfo
    quant: QuantConfig
    bits: list[float] = field(default_factory=list)  # per stored tensor (integer modes)

    def describe(self) -> str:
        return describe(self.quant, self.bits)


def decode_model(data: bytes, limits: DecodeLimits = DECODE_LIMITS) -> DecodedModel:
    """Parse .kimg bytes and rebuild the network in float64 with its exact dequantised weights.

    Raises:
        KanimgError: anything :func:`kimg.read` refuses; a payload with bytes after its coded
            data, or weights that are not finite.
    """
    parsed = kimg.read(data, limits)
    spec, quant = parsed.spec, parsed.quant
    arrays: list[np.ndarray] = []
    grids: list[np.ndarray] = []
    if quant.is_float16:
        values = np.frombuffer(parsed.payload, dtype="<f2").astype(np.float64)
        offset = 0
        for slot in slots(spec):
            arrays.append(values[offset : offset + slot.size].reshape(slot.shape))
            offset += slot.size
    else:
        decoder = StreamDecoder(parsed.payload)
        grids, decoded, ranges, models = decode_latents(decoder, parsed.image, parsed.levels)
        first_tensor_stream = len(decoded)
        for slot, header in zip(slots(spec), parsed.tensors):
            rows = slot.size // slot.shape[-1]
            lengths = [rows] * header.transform + [rows * (slot.shape[-1] - header.transform)]
            tensor_ranges = stream_limits(QuantConfig(header.bits).levels, header.transform)
            decoded += [decoder.decode(n, limit, model) for n, limit, model in zip(lengths, tensor_ranges, header.models)]
            ranges += tensor_ranges
            models += header.models
        if encode_streams(decoded, ranges, models) != parsed.payload:  # the coder is deterministic: one payload per content
            raise KanimgError("malformed .kimg payload: bytes beyond the coded data, or not as this format codes it")
        flat = iter(decoded[first_tensor_stream:])
        for slot, header in zip(slots(spec), parsed.tensors):
            lead = slot.shape[:-1]
            streams = [next(flat).reshape(lead) for _ in range(header.transform)]
            streams.append(next(flat).reshape(lead + (slot.shape[-1] - header.transform,)))
            ints = join_streams(streams)
            if np.abs(ints).max(initial=0) > QuantConfig(header.bits).levels:
                raise KanimgError("malformed .kimg payload: a value outside the quantisation range")
            arrays.append(QuantizedTensor(ints, header.steps).dequantize())
    if not all(np.isfinite(a).all() for a in arrays):
        raise KanimgError("malformed .kimg file: weights that are not finite numbers")
    if spec["name"] == "latent":
        model = LatentImage(parsed.image.height, parsed.image.width, spec["widths"], spec.get("synthesis", "mlp"),
                            spec.get("grids"), spec.get("reaches")).to(torch.float64)
        load_arrays(model, arrays)
        with torch.no_grad():
            for latent, grid in zip(model.latents, grids):
                latent.copy_(torch.from_numpy(grid.astype(np.float64))[None, None])
        return DecodedModel(model.eval(), parsed.image, quant, [t.bits for t in parsed.tensors])
    options = {k: v for k, v in spec.items() if k != "name"}
    model = build_model(spec["name"], **options).to(torch.float64)
    load_arrays(model, arrays, [r if r is not None else np.array([[-1.0, 1.0]] * w, dtype=np.float32)
                                for r, w in zip(parsed.grid_ranges, spec["widths"][:-1])])
    return DecodedModel(model.eval(), parsed.image, quant, [t.bits for t in parsed.tensors])


def tile_pixels(spec: dict) -> int:
    """Pixels per tile of a decoder evaluating ``spec``: TILE_VALUES // (the widest layer's
    activations or spline features), so memory stays flat (128 MB of float64) whatever the
    image size or network width a file declares."""
    widths = spec["widths"]
    features = [i * (g + SPLINE_ORDER + 1) for i, g in zip(widths[1:-1], spec["grids"][1:])] if spec["name"] == "kan" else []
    return max(1, TILE_VALUES // max(widths + features))


# A pixel is rounded from the float32 evaluation only when it lies at least this far (in
# integer levels) from a rounding boundary: float32 errors are at most ~0.012 levels at 8 bits
# (measured against float64 on every rd file: docs/compression.md), so such pixels round the
# same everywhere; the rest (4 % per channel, ~12 % of RGB pixels) are recomputed in float64,
# whose differences (~1e-13 levels) only matter exactly at a boundary.
ROUNDING_GUARD = 0.02


def evaluators(decoded: DecodedModel) -> tuple[GridEvaluator, GridEvaluator]:
    """(fast, exact): the decoded network on its image's pixel grid in float32 (8-bit images;
    16-bit ones: the float64 evaluator itself) and in float64, as :func:`render_integers`
    evaluates it. The coordinates are the float64 ones, rounded to float32 for the fast one;
    first-layer tables are built TILE_VALUES spline features at a time."""
    img, model = decoded.image, decoded.model
    exact = GridEvaluator(model, img.height, img.width, img.coords, "cpu", torch.float64, TILE_VALUES)
    if img.bit_depth > 8:
        return exact, exact
    fast = GridEvaluator(copy.deepcopy(model).to(torch.float32), img.height, img.width, img.coords, "cpu", torch.float64, TILE_VALUES)
    return fast, exact


@torch.no_grad()
def render_integers(decoded: DecodedModel) -> np.ndarray:
    """(H, W, C) integer pixels of a decoded model, the same on every run and machine, computed
    tile by tile (only the integers of the whole image are held).

    8-bit images: float32 everywhere (2–3× faster), float64 for pixels near a rounding
    boundary. 16-bit images: float64 everywhere.

    Raises:
        KanimgError: the network's output is not finite (a crafted or damaged file).
    """
    img, model = decoded.image, decoded.model
    if model.spec["name"] == "latent":  # float64 throughout: cheap for a synthesis this small
        out = np.empty((img.pixels, img.channels), dtype=np.uint8 if img.bit_depth <= 8 else np.uint16)
        for pixels, values in synthesis_tiles(model.integer_latents(), stored_arrays(model), img.height, img.width,
                                              model.spec.get("grids"), model.spec.get("reaches")):
            if not np.isfinite(values).all():
                raise KanimgError("malformed .kimg file: the network's output is not finite")
            out[pixels] = to_integers((np.clip(values, -1, 1) + 1) / 2, img.bit_depth)
        return out.reshape(img.height, img.width, img.channels)
    fast, exact = evaluators(decoded)
    top = float(2**img.bit_depth - 1)
    out = np.empty((img.pixels, img.channels), dtype=np.uint8 if img.bit_depth <= 8 else np.uint16)
    for part in chunks(img.pixels, tile_pixels(model.spec)):
        index = torch.arange(part.start, part.stop)
        values = fast(index, torch.float64).numpy()
        if fast is not exact:
            scaled = np.clip(values, 0.0, 1.0) * top
            near = (np.abs(scaled - np.floor(scaled) - 0.5) < ROUNDING_GUARD).any(axis=1)
            if near.any():
                values[near] = exact(index[torch.from_numpy(near)], torch.float64).numpy()
        if not np.isfinite(values).all():
            raise KanimgError("malformed .kimg file: the network's output is not finite")
        out[part] = to_integers(values, img.bit_depth)
    return out.reshape(img.height, img.width, img.channels)


@dataclass
class DecodedImage:
    integers: np.ndarray  # (H, W, C) uint8 / uint16: what the PNG holds
    image: ImageInfo
    quant: str  # e.g. "7-bit per tensor", "float16"
    spec: dict

    @property
    def pixels(self) -> np.ndarray:
        """The integers as float64 in [0, 1]."""
        return self.integers.astype(np.float64) / float(2**self.image.bit_depth - 1)


def decode_image(data: bytes, limits: DecodeLimits = DECODE_LIMITS) -> DecodedImage:
    """The image a .kimg file holds, identical on every decode, within ``limits``."""
    decoded = decode_model(data, limits)
    return DecodedImage(render_integers(decoded), decoded.image, decoded.describe(), decoded.model.spec)
