"""A latent-grid image (Cool-chic style): one grid of latent values per resolution H/2^k × W/2^k,
each upsampled to the image, and a tiny per-pixel synthesis network that turns the stacked
values into colour.

The file stores the grids as integers (entropy-coded: most are 0) and the synthesis weights;
training sees them through quantisation noise first, then rounding (straight-through), with a
differentiable rate: zero-mean Laplaces whose scale follows the coder's checkerboard
contexts (:meth:`LatentImage.level_bits`), the integral of each density over its integer's
unit interval. The synthesis is a ReLU MLP, which the decoder
evaluates in float64 on the CPU (:func:`synthesise`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KanimgError
from ..nn.mlp import relu_mlp
from .entropy import StreamDecoder, StreamModel, cost_bits, fit_model
from .kimg import MAX_LEVELS, ImageInfo, LatentLevel
from .quantize import QuantConfig
from .tensors import quantized_params


def level_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(rows, columns) of each latent grid, finest first: ⌈H/2^k⌉ × ⌈W/2^k⌉."""
    return [(math.ceil(height / 2**k), math.ceil(width / 2**k)) for k in range(levels)]


def upsample(grid: Tensor, height: int, width: int) -> Tensor:
    """A (1, 1, h, w) grid at the image's size: bicubic, every output pixel computed on its
    own (no reductions across pixels), so float64 results do not depend on thread count."""
    if grid.shape[-2:] == (height, width):
        return grid
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)


DENSE_LIMIT = 1024  # grids up to this side upsample as matrix products (their cost grows as side³)


def upsampling_matrix(size: int, target: int) -> Tensor:
    """(target, size): the 1-D factor of :func:`upsample` (bicubic is separable), so a grid
    upsamples as rows @ grid @ columns.T: two dense matrix products, which train 1.4–7× faster
    than the interpolation and its backward pass on a CPU (measured up to 1024×1536 images)."""
    eye = torch.eye(size, dtype=torch.float64)[None, None]  # float64: exact enough for a float64 model too
    return F.interpolate(eye, size=(target, size), mode="bicubic", align_corners=False)[0, 0]


def laplace_bits(values: Tensor, log_scale: Tensor) -> Tensor:
    """Bits of (noisy or rounded) latents under a zero-mean Laplace of scale e^log_scale,
    integrated over each value's unit interval (the rate term of training)."""
    scale = log_scale.exp()

    def cdf(x: Tensor) -> Tensor:
        return 0.5 + 0.5 * torch.sign(x) * -torch.expm1(-x.abs() / scale)

    probability = (cdf(values + 0.5) - cdf(values - 0.5)).clamp_min(1e-9)
    return -torch.log2(probability).sum()


class LatentImage(nn.Module):
    """Latent grids and a synthesis network for one image of ``height`` × ``width``.

    ``widths`` are the synthesis's layer widths, from ``levels`` inputs to the channels.
    """

    def __init__(self, height: int, width: int, widths: Sequence[int]) -> None:
        super().__init__()
        levels = widths[0]
        if not 1 <= levels <= MAX_LEVELS:
            raise KanimgError(f"latent levels must be 1 … {MAX_LEVELS}, got {levels}")
        self.height, self.width, self.widths = height, width, list(widths)
        self.latents = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, rows, cols)) for rows, cols in level_shapes(height, width, levels))
        # the rate model's (training only), per level: the anchors' log-scale, the others' at
        # zero context, and how it grows with the context (:meth:`level_bits`)
        self.rate_parameters = nn.Parameter(torch.zeros(levels, 3))
        self.synthesis = relu_mlp(widths)  # ReLU: exact to evaluate everywhere (no exp or erf)
        self.dense = [max(rows, cols) <= DENSE_LIMIT and (rows, cols) != (height, width)
                      for rows, cols in level_shapes(height, width, levels)]
        self._training_constants: dict = {}  # built on the first forward pass: the decoder never needs them

    def _constant(self, name: str, k: int, like: Tensor) -> Tensor:
        """Grid ``k``'s checkerboard ("anchors") or upsampling factors ("rows", "columns"),
        made once per dtype and device."""
        key = (name, k, like.dtype, like.device)
        if key not in self._training_constants:
            rows, cols = self.latents[k].shape[-2:]
            if name == "anchors":
                value = torch.from_numpy(_anchors((rows, cols)))
            else:
                value = upsampling_matrix(rows, self.height) if name == "rows" else upsampling_matrix(cols, self.width)
                value = value.to(like.dtype)
            self._training_constants[key] = value.to(like.device)
        return self._training_constants[key]

    @property
    def spec(self) -> dict:
        return {"name": "latent", "widths": list(self.widths)}

    def synthesis_parameters(self) -> list[nn.Parameter]:
        return list(self.synthesis.parameters())

    def quantized_synthesis(self, bits: float) -> dict[str, Tensor]:
        """The synthesis's stored tensors at ``bits`` as the file quantises them, by name,
        straight-through (quantisation-aware training)."""
        return quantized_params(self, QuantConfig(bits))

    def forward(self, mode: str = "round", weights: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(pixels (C, H·W) in [-1, 1], channels first, bits of the latents) with the latents
        quantised as ``mode``: "noise" (uniform noise), "ste" (rounded forward, identity
        backward) or "round"; ``weights`` replace the synthesis's own by name (fake-quantised
        ones, for quantisation-aware training)."""
        features, bits = self.features(mode)
        return self.synthesise_features(features, weights or {}), bits

    def features(self, mode: str) -> tuple[Tensor, Tensor]:
        """(the upsampled grids (levels, H·W), bits of the latents), latents quantised as
        ``mode`` (see :meth:`forward`)."""
        features, bits = [], torch.zeros(())
        for k, latent in enumerate(self.latents):
            if mode == "noise":
                quantised = latent + torch.rand_like(latent) - 0.5
            elif mode == "ste":
                quantised = latent + (torch.round(latent) - latent).detach()
            else:
                quantised = torch.round(latent)
            # the rate of a rounded value has no slope at 0: rounding still sees the noisy rate
            noisy = quantised if mode != "ste" else latent + torch.rand_like(latent) - 0.5
            bits = bits + self.level_bits(k, noisy)
            if self.dense[k]:
                grid = self._constant("rows", k, quantised) @ quantised[0, 0] @ self._constant("columns", k, quantised).T
            else:
                grid = upsample(quantised, self.height, self.width)
            features.append(grid.reshape(-1))
        return torch.stack(features), bits  # channels first: the synthesis's products are wide, not tall and thin

    def synthesise_features(self, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
        """The synthesis on features (levels, H·W) → (C, H·W), its parameters replaced by name
        where ``weights`` has them."""
        for index, layer in enumerate(self.synthesis):
            if isinstance(layer, nn.Linear):
                weight, bias = (weights.get(f"synthesis.{index}.{name}", getattr(layer, name)) for name in ("weight", "bias"))
                x = torch.addmm(bias[:, None], weight, x)
            else:
                x = layer(x)
        return x

    def level_bits(self, k: int, quantised: Tensor) -> Tensor:
        """Bits of grid ``k`` (noisy or rounded values, (1, 1, h, w)) under the training rate
        model, which sees the coder's checkerboard contexts smoothly: anchors under one
        Laplace, every other value under a Laplace whose log-scale grows with log(1 + the sum
        of its four anchor neighbours' magnitudes). Differentiable in the neighbours too, so
        training learns to leave zeros among zeros: +0.56 and +0.29 dB against WebP at 0.3 bpp
        on the two tuning photos, over one Laplace per grid (the coder's own buckets: −0.52
        and −0.04)."""
        anchors = self._constant("anchors", k, quantised)
        padded = F.pad(quantised.abs() * anchors, (1, 1, 1, 1))[0, 0]
        total = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        anchor_scale, context_scale, slope = self.rate_parameters[k]
        log_scale = torch.where(anchors, anchor_scale, context_scale + slope * torch.log1p(total))
        return laplace_bits(quantised[0, 0], log_scale)

    def integer_latents(self) -> list[np.ndarray]:
        """The grids as the file stores them: (rows, columns) int64 each."""
        return [torch.round(latent.detach())[0, 0].cpu().to(torch.int64).numpy() for latent in self.latents]


@torch.no_grad()
def synthesise(latents: Sequence[np.ndarray], weights: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """The decoder: (H, W, C) values in [-1, 1] (unclipped), float64, from integer
    latents and dequantised synthesis weights (weight, bias per layer). Each output is a sum
    accumulated in a fixed order, so it is the same number for any thread count."""
    features = []
    for grid in latents:
        full = upsample(torch.from_numpy(np.asarray(grid, dtype=np.float64))[None, None], height, width)
        features.append(full[0, 0])
    x = torch.stack(features, -1)
    count = len(weights) // 2
    for index in range(count):
        weight, bias = torch.from_numpy(np.asarray(weights[2 * index])), torch.from_numpy(np.asarray(weights[2 * index + 1]))
        out = bias.to(torch.float64).expand(*x.shape[:-1], bias.shape[0]).clone()
        for k in range(weight.shape[1]):
            out += x[..., k : k + 1] * weight[:, k].to(torch.float64)
        x = torch.relu(out) if index < count - 1 else out
    return x.numpy()


# ----------------------------------------------------------------------------- grid coding
# A grid is coded in two halves, like a checkerboard: the "anchors" (row + column even) in
# raster order under one model, then the other half, each value under the model of its
# context: how large its four anchor neighbours are (the sum of their magnitudes, bucketed by
# CONTEXT_EDGES; the last bucket used takes everything above). The decoder knows every
# anchor before it needs a context. A level may also be one stream under one model (no
# contexts), whichever the encoder finds cheaper, models included.
CONTEXT_EDGES = (0, 1, 2, 3, 5, 9)
MODEL_BITS = 24  # a model in the header: its centre varint (usually 1 byte) and θ's 2-byte code


def _anchors(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows + cols) % 2 == 0


def _contexts(grid: np.ndarray, anchors: np.ndarray, buckets: int) -> np.ndarray:
    """Context bucket of every non-anchor value, from the anchors alone."""
    padded = np.pad(np.abs(np.where(anchors, grid, 0)), 1)
    total = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return np.minimum(np.searchsorted(CONTEXT_EDGES, total[~anchors], side="right") - 1, buckets - 1)


def _split(grid: np.ndarray, buckets: int) -> list[np.ndarray]:
    """The streams of one grid: all of it (buckets = 0), or the anchors then one stream per context."""
    if buckets == 0:
        return [grid.ravel()]
    anchors = _anchors(grid.shape)
    context, rest = _contexts(grid, anchors, buckets), grid[~anchors]
    return [grid[anchors]] + [rest[context == b] for b in range(buckets)]


def code_latents(latents: Sequence[np.ndarray]) -> tuple[list[LatentLevel], list[np.ndarray], list[int], list[StreamModel]]:
    """Each grid with the cheapest number of contexts (none, 2 … len(CONTEXT_EDGES)):
    (level headers, streams, limits, models), in file order."""
    levels, streams, limits, models = [], [], [], []
    for grid in latents:
        grid = np.asarray(grid, dtype=np.int64)
        limit = max(1, int(np.abs(grid).max(initial=0)))
        best = None
        for buckets in (0, *range(2, len(CONTEXT_EDGES) + 1)):
            parts = _split(grid, buckets)
            fitted = [fit_model(part, limit) for part in parts]
            bits = sum(cost_bits(part, m, limit) + MODEL_BITS for part, m in zip(parts, fitted))
            if best is None or bits < best[0]:
                best = (bits, parts, fitted)
        _, parts, fitted = best
        levels.append(LatentLevel(limit, fitted))
        streams += parts
        limits += [limit] * len(parts)
        models += fitted
    return levels, streams, limits, models


def decode_latents(decoder: StreamDecoder, image: ImageInfo, levels: Sequence[LatentLevel]
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[StreamModel]]:
    """Inverse of :func:`code_latents`: (grids, and the streams, limits and models decoded, to
    check the payload codes them exactly)."""
    grids, streams, limits, models = [], [], [], []
    for level, shape in zip(levels, level_shapes(image.height, image.width, len(levels))):
        models += level.models
        if len(level.models) == 1:
            parts = [decoder.decode(shape[0] * shape[1], level.limit, level.models[0])]
            grid = parts[0].reshape(shape)
        else:
            anchors = _anchors(shape)
            grid = np.zeros(shape, dtype=np.int64)
            parts = [decoder.decode(int(anchors.sum()), level.limit, level.models[0])]
            grid[anchors] = parts[0]
            context, rest = _contexts(grid, anchors, len(level.models) - 1), np.zeros(int((~anchors).sum()), dtype=np.int64)
            for bucket, model in enumerate(level.models[1:]):
                parts.append(decoder.decode(int((context == bucket).sum()), level.limit, model))
                rest[context == bucket] = parts[-1]
            grid[~anchors] = rest
        grids.append(grid)
        streams += parts
        limits += [level.limit] * len(parts)
    return grids, streams, limits, models
