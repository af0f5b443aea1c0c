"""A latent-grid image (Cool-chic style): one grid of latent values per resolution H/2^k × W/2^k,
each upsampled to the image, and a tiny per-pixel synthesis network that turns the stacked
values into colour.

The file stores the grids as integers (entropy-coded: most are 0) and the synthesis weights;
training sees them through quantisation noise first, then rounding (straight-through), with a
differentiable rate: zero-mean Laplaces whose scale follows the coder's nested
contexts (:meth:`LatentImage.level_bits`, :func:`code_grid`), the integral of each density over its integer's
unit interval. The synthesis is a ReLU MLP or an order-1 KAN (:class:`HatKANLayer`), which
the decoder evaluates in float64 on the CPU (:func:`synthesise`).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KanimgError
from ..nn.mlp import relu_mlp
from .entropy import StreamDecoder, StreamModel, cost_bits, fit_model
from .kimg import (LATENT_TILE_PIXELS, MAX_BUCKETS, MAX_DEPTH, MAX_KAN_GRID, MAX_LEVELS, PREDICTION_CODES, ImageInfo, LatentLevel,
                   level_shapes, reach_units)
from .quantize import QuantConfig
from .tensors import quantized_params


def upsample(grid: Tensor, height: int, width: int) -> Tensor:
    """A (1, 1, h, w) grid at the image's size: bicubic, every output pixel computed on its
    own (no reductions across pixels), so float64 results do not depend on thread count."""
    if grid.shape[-2:] == (height, width):
        return grid
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)


RATE_BASE_VALUES = 256  # the training rate model stops nesting at grids this small (the coder's depths are mostly 0 … 4)
DENSE_LIMIT = 1024  # grids up to this side upsample as matrix products (their cost grows as side³)


def upsampling_matrix(size: int, target: int) -> Tensor:
    """(target, size): the 1-D factor of :func:`upsample` (bicubic is separable), so a grid
    upsamples as rows @ grid @ columns.T: two dense matrix products, which train 1.4–7× faster
    than the interpolation and its backward pass on a CPU (measured up to 1024×1536 images)."""
    eye = torch.eye(size, dtype=torch.float64)[None, None]  # float64: exact enough for a float64 model too
    return F.interpolate(eye, size=(target, size), mode="bicubic", align_corners=False)[0, 0]


BITS_FLOOR = 1e-9  # the smallest probability the rate counts: at most 29.9 bits a value, no slope beyond


def _laplace_bits_closed_form(values: Tensor, log_scale: Tensor, derivatives: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(bits summed, their derivative in each value and in each value's log-scale, or None):
    with a = |v| and u = 1/scale, the mass of [v − ½, v + ½] is ½(e^(−|a − ½|u) − e^(−(a + ½)u))
    for a ≥ ½ and 1 − ½(e^(−(½ − a)u) + e^(−(a + ½)u)) inside. One expression, so no difference
    of two CDFs near 1 (no cancellation in float32), and the derivatives in the same pass."""
    u = torch.exp(-log_scale).expand_as(values)
    a = values.abs()
    off = a - 0.5
    side, distance = torch.sign(off), off.abs()  # side: +1 in the tails, −1 inside, 0 on the edge
    near, far = torch.exp(-distance * u), torch.exp(-(a + 0.5) * u)
    mass = 0.5 * (1 - side) + 0.5 * (side * near - far)
    counted = mass.clamp_min(BITS_FLOOR)
    bits = -torch.log2(counted).sum()
    if not derivatives:
        return bits, None, None
    slope = torch.ops.aten.threshold_backward(-1 / (counted * math.log(2)), mass, BITS_FLOOR)  # d bits / d mass; 0 below the floor
    grad_values = slope * 0.5 * u * (far - near) * torch.sign(values)
    grad_log_scale = slope * 0.5 * (side * -distance * near + (a + 0.5) * far) * -u
    return bits, grad_values, grad_log_scale


class _LaplaceBits(torch.autograd.Function):
    """:func:`laplace_bits` with its derivatives taken in the forward pass: no autograd graph of
    a dozen elementwise steps per CDF (the rate was a quarter to a third of a full-size training step on a CPU)."""

    @staticmethod
    def forward(ctx, values: Tensor, log_scale: Tensor) -> Tensor:
        bits, grad_values, grad_log_scale = _laplace_bits_closed_form(values, log_scale, derivatives=True)
        ctx.save_for_backward(grad_values, grad_log_scale)
        ctx.log_scale_shape = log_scale.shape
        return bits

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        grad_values, grad_log_scale = ctx.saved_tensors
        return grad * grad_values, (grad * grad_log_scale).sum_to_size(ctx.log_scale_shape)


def laplace_bits(values: Tensor, log_scale: Tensor) -> Tensor:
    """Bits of (noisy or rounded) latents under a zero-mean Laplace of scale e^log_scale,
    integrated over each value's unit interval (the rate term of training), each at most
    −log₂ BITS_FLOOR."""
    if torch.is_grad_enabled() and (values.requires_grad or log_scale.requires_grad):
        return _LaplaceBits.apply(values, log_scale)
    return _laplace_bits_closed_form(values, log_scale, derivatives=False)[0]


class _TrainingHats(torch.autograd.Function):
    """(I, N) inputs → (I, grid + 1, N): each input's order-1 B-splines ("hats") on ``grid``
    equal intervals of [−reach, reach], the input clamped to it (constant beyond). Each input's
    two nonzero hats are written in place (1 - t at its interval's left knot, t at the right
    one) and the gradient read back from those two (the difference of their gradients over the
    knot spacing, 0 beyond the reach), not traced through clamp, abs and relu over every knot
    (docs/compression.md, "Encoding time")."""

    @staticmethod
    def forward(ctx, x: Tensor, grid: int, reach: float) -> Tensor:
        step = 2 * reach / grid
        position = (x.clamp(-reach, reach) + reach) / step  # in knot spacings from the first knot
        left = position.floor().clamp_(max=grid - 1)
        t = (position - left)[:, None, :]
        left = left.long()[:, None, :]
        hats = x.new_zeros(x.shape[0], grid + 1, x.shape[1])
        hats.scatter_(1, left, 1 - t).scatter_(1, left + 1, t)
        ctx.save_for_backward(left, (x > -reach) & (x < reach))
        ctx.step = step
        return hats

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        left, inside = ctx.saved_tensors
        slope = (grad.gather(1, left + 1) - grad.gather(1, left))[:, 0, :]
        return slope * inside / ctx.step, None, None


def training_hats(x: Tensor, grid: int, reach: float) -> Tensor:
    """Order-1 B-splines of ``x`` for a :class:`HatKANLayer` in training (:class:`_TrainingHats`)."""
    return _TrainingHats.apply(x, grid, reach)


def kan_pieces(weight: Tensor, values: Tensor, grid: int, reach: float) -> tuple[Tensor, Tensor]:
    """An order-1 KAN layer's edges as linear pieces, (slopes, intercepts) of shape
    (fan_out, fan_in, grid + 2): piece 0 below −reach, 1 … grid the intervals, grid + 1 above
    reach. Each edge is then slope · x + intercept after a lookup by :func:`kan_piece`: one
    multiply and two adds with its sum, where the hats take three multiply-adds (the decode
    cost docs/compression.md counts)."""
    step = 2 * reach / grid
    knots = torch.tensor([-reach + g * step for g in range(grid)], dtype=values.dtype, device=values.device)
    rise = (values[..., 1:] - values[..., :-1]) / step
    outer = weight[..., None]
    slopes = torch.cat([outer, outer + rise, outer], -1)
    intercepts = torch.cat([values[..., :1], values[..., :-1] - rise * knots, values[..., -1:]], -1)
    return slopes, intercepts


def kan_piece(x: Tensor, grid: int, reach: float) -> Tensor:
    """The piece of :func:`kan_pieces` each input falls in (int64, the shape of ``x``)."""
    return torch.floor((x + reach) * (grid / (2 * reach))).clamp(-1, grid).to(torch.int64) + 1


class HatKANLayer(nn.Module):
    """A KAN layer of order-1 splines, channels first: each edge w·x plus a piecewise-linear
    function on ``grid`` equal intervals of [−reach, reach], constant beyond them (so only w·x
    extrapolates). Two hats are nonzero per edge; decoded as the linear piece its input falls in
    (:func:`kan_pieces`) an edge costs a multiply-add and an add, where a cubic KAN layer's costs
    5 multiply-adds: it spends parameters (values at the knots), not arithmetic."""

    def __init__(self, fan_in: int, fan_out: int, grid: int, reach: float) -> None:
        super().__init__()
        self.grid, self.reach = grid, reach
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in ** 0.5)
        self.values = nn.Parameter(torch.randn(fan_out, fan_in, grid + 1) * (0.5 / fan_in ** 0.5))  # each edge's value at each knot
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: Tensor, weight: Tensor | None = None, values: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """(fan_in, N) → (fan_out, N); ``weight``, ``values``, ``bias`` replace the layer's own."""
        weight, values, bias = (own if given is None else given for own, given in
                                ((self.weight, weight), (self.values, values), (self.bias, bias)))
        hats = training_hats(x, self.grid, self.reach).reshape(-1, x.shape[1])
        return torch.addmm(bias[:, None], values.reshape(len(values), -1), hats) + weight @ x


SLICE_PIXELS = 16384  # pixels per slice of the synthesis in training (its activations stay in the CPU's cache)


class _SlicedSynthesis(torch.autograd.Function):
    """The synthesis ``run(x, tensors)`` on SLICE_PIXELS pixels at a time, forward and backward,
    its activations recomputed slice by slice in the backward pass instead of kept: on a
    CPU the whole image's hidden activations (48 values a pixel) go through memory several
    times a step, a slice's stay in the cache (the same gradients to float rounding)."""

    @staticmethod
    def forward(ctx, run, x: Tensor, *tensors: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(x, *tensors)
        return torch.cat([run(x[:, s : s + SLICE_PIXELS], tensors) for s in range(0, x.shape[1], SLICE_PIXELS)], 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x, *tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        wanted = [t for t in leaves if t.requires_grad]
        grad_x, totals = torch.empty_like(x), [torch.zeros_like(t) for t in wanted]
        for s in range(0, x.shape[1], SLICE_PIXELS):
            part = x[:, s : s + SLICE_PIXELS].detach().requires_grad_()
            with torch.enable_grad():
                found = torch.autograd.grad(ctx.run(part, leaves), [part, *wanted], grad[:, s : s + SLICE_PIXELS])
            grad_x[:, s : s + SLICE_PIXELS] = found[0]
            for total, g in zip(totals, found[1:]):
                total += g
        by_leaf = iter(totals)
        return None, grad_x, *(next(by_leaf) if t.requires_grad else None for t in leaves)


class _SlicedMLP(torch.autograd.Function):
    """A ReLU MLP (weights and biases alternating, channels first) slice by slice as
    :class:`_SlicedSynthesis` runs any synthesis, its backward pass written out: per slice the
    activations recomputed, then the products of backpropagation and ReLU's mask by
    threshold_backward, with no autograd graph built per slice (with the closed-form rate, a full-size step 1.1–1.5× faster on a CPU)."""

    @staticmethod
    def layer_inputs(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
        """Each layer's input for the pixels ``x``: x, then every hidden layer's ReLU output."""
        inputs = [x]
        for weight, bias in zip(weights[:-1], biases[:-1]):
            inputs.append(torch.addmm(bias[:, None], weight, inputs[-1]).clamp_min_(0))
        return inputs

    @staticmethod
    def forward(ctx, x: Tensor, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(x, *tensors)
        weights, biases = tensors[0::2], tensors[1::2]
        out = x.new_empty(len(weights[-1]), x.shape[1])
        for s in range(0, x.shape[1], SLICE_PIXELS):
            last = _SlicedMLP.layer_inputs(x[:, s : s + SLICE_PIXELS], weights, biases)[-1]
            torch.addmm(biases[-1][:, None], weights[-1], last, out=out[:, s : s + SLICE_PIXELS])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x, *tensors = ctx.saved_tensors
        weights, biases = tensors[0::2], tensors[1::2]
        grad_x, grad_weights, grad_biases = torch.empty_like(x), [torch.zeros_like(w) for w in weights], [torch.zeros_like(b) for b in biases]
        for s in range(0, x.shape[1], SLICE_PIXELS):
            inputs = _SlicedMLP.layer_inputs(x[:, s : s + SLICE_PIXELS], weights, biases)  # recomputed
            g = grad[:, s : s + SLICE_PIXELS]
            for layer in reversed(range(len(weights))):
                grad_weights[layer].addmm_(g, inputs[layer].T)
                grad_biases[layer] += g.sum(1)
                g = weights[layer].T @ g
                if layer:
                    g = torch.ops.aten.threshold_backward(g, inputs[layer], 0)  # ReLU's mask (its output > 0)
            grad_x[:, s : s + SLICE_PIXELS] = g
        return grad_x, *(g for pair in zip(grad_weights, grad_biases) for g in pair)


def is_relu_mlp(layers: nn.Sequential) -> bool:
    """Whether ``layers`` are :func:`relu_mlp`'s: Linear layers with biases, a ReLU between each
    two (what :class:`_SlicedMLP` computes)."""
    kinds = [nn.Linear if index % 2 == 0 else nn.ReLU for index in range(len(layers))]
    return len(layers) % 2 == 1 and all(type(layer) is kind for layer, kind in zip(layers, kinds)) \
        and all(layer.bias is not None for layer in layers[0::2])


def kan_synthesis(widths: Sequence[int], grids: Sequence[int], reaches: Sequence[float]) -> nn.Sequential:
    """Order-1 KAN layers, each on its own grid of intervals over its own ±reach."""
    return nn.Sequential(*(HatKANLayer(a, b, g, r) for a, b, g, r in zip(widths[:-1], widths[1:], grids, reaches)))


class LatentImage(nn.Module):
    """Latent grids and a synthesis network for one image of ``height`` × ``width``.

    ``widths`` are the synthesis's layer widths, from ``levels`` inputs to the channels;
    ``synthesis`` "mlp" (ReLU) or "kan": order-1 KAN layers, layer k on ``grids[k]`` intervals
    of ±``reaches[k]`` (multiples of kimg.REACH_UNIT, as the file stores them).
    """

    def __init__(self, height: int, width: int, widths: Sequence[int], synthesis: str = "mlp",
                 grids: Sequence[int] | None = None, reaches: Sequence[float] | None = None) -> None:
        super().__init__()
        levels = widths[0]
        if not 1 <= levels <= MAX_LEVELS:
            raise KanimgError(f"latent levels must be 1 … {MAX_LEVELS}, got {levels}")
        self.height, self.width, self.widths = height, width, list(widths)
        self.latents = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, rows, cols)) for rows, cols in level_shapes(height, width, levels))
        # the rate model's (training only), per level: the coarsest value's log-scale, and for
        # each of a stage's two sets its log-scale at zero context and how it grows with the
        # context (:meth:`level_bits`)
        self.rate_parameters = nn.Parameter(torch.zeros(levels, 5))
        kan = synthesis == "kan"
        shaped = grids is not None and reaches is not None and len(grids) == len(reaches) == len(widths) - 1
        if synthesis not in ("mlp", "kan") or kan != shaped or not all(1 <= g <= MAX_KAN_GRID for g in grids or ()):
            raise KanimgError(f"latent synthesis {synthesis!r} (grids {grids}, reaches {reaches}): choose mlp, or kan with a grid and a reach per layer")
        for reach in reaches or ():
            reach_units(reach)  # refuses a reach the file cannot hold
        self.kan = {"synthesis": "kan", "grids": list(grids), "reaches": [float(r) for r in reaches]} if kan else {}
        # ReLU and hats: exact to evaluate everywhere (no exp or erf)
        self.synthesis = relu_mlp(widths) if synthesis == "mlp" else kan_synthesis(widths, grids, reaches)
        self.dense = [max(rows, cols) <= DENSE_LIMIT and (rows, cols) != (height, width)
                      for rows, cols in level_shapes(height, width, levels)]
        self._training_constants: dict = {}  # built on the first forward pass: the decoder never needs them

    def _constant(self, name: str, k: int, like: Tensor) -> Tensor:
        """Grid ``k``'s upsampling factors ("rows", "columns"), made once per dtype and device."""
        key = (name, k, like.dtype, like.device)
        if key not in self._training_constants:
            rows, cols = self.latents[k].shape[-2:]
            value = upsampling_matrix(rows, self.height) if name == "rows" else upsampling_matrix(cols, self.width)
            value = value.to(like.dtype)
            self._training_constants[key] = value.to(like.device)
        return self._training_constants[key]

    @property
    def spec(self) -> dict:
        return {"name": "latent", "widths": list(self.widths), **self.kan}

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
        weights = weights or {}
        if not torch.is_grad_enabled() or features.shape[1] <= SLICE_PIXELS:
            return self.synthesise_features(features, weights), bits
        names = [f"synthesis.{name}" for name, _ in self.synthesis.named_parameters()]
        tensors = [weights.get(name, own) for name, own in zip(names, self.synthesis.parameters())]
        if is_relu_mlp(self.synthesis):  # its parameters: weight, bias, weight, bias …
            return _SlicedMLP.apply(features, *tensors), bits
        run = lambda x, values: self.synthesise_features(x, dict(zip(names, values)))  # noqa: E731
        return _SlicedSynthesis.apply(run, features, *tensors), bits

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
            elif isinstance(layer, HatKANLayer):
                x = layer(x, **{name: weights.get(f"synthesis.{index}.{name}") for name in ("weight", "values", "bias")})
            else:
                x = layer(x)
        return x

    def level_bits(self, k: int, quantised: Tensor) -> Tensor:
        """Bits of grid ``k`` (noisy or rounded values, (1, 1, h, w)) under the training rate
        model, which sees the coder's nested contexts (:func:`code_grid`) smoothly: at each
        stage, odd rows' odd columns under a Laplace whose log-scale grows with log(1 + the sum
        of their four diagonal neighbours' magnitudes), the values whose row + column is odd
        likewise with their four direct neighbours (one such pair of lines per grid, shared by
        its stages), down to a grid of at most RATE_BASE_VALUES values under one Laplace. Differentiable in the neighbours
        too, so training learns to leave zeros among zeros: the version 3 checkerboard's smooth
        model gained +0.56 and +0.29 dB against WebP at 0.3 bpp on the two tuning photos over
        one Laplace per grid."""
        base_scale, odd_scale, odd_slope, cross_scale, cross_slope = self.rate_parameters[k]
        grid, values, log_scales = quantised[0, 0], [], []
        while grid.numel() > RATE_BASE_VALUES:
            # the stage's four phases, each with its known neighbours (zero beyond the border)
            even, odd = grid[0::2, 0::2], grid[1::2, 1::2]
            across, down = grid[0::2, 1::2], grid[1::2, 0::2]  # row even / column odd, and the reverse
            (he, we), (ho, wo) = even.shape, odd.shape
            e = F.pad(even.abs(), (0, 1, 0, 1))
            o_rows = F.pad(odd.abs(), (0, 0, 1, he - ho))  # row r holds odd row r - 1
            o_cols = F.pad(odd.abs(), (1, we - wo))  # column c holds odd column c - 1
            diagonal = e[:ho, :wo] + e[:ho, 1 : wo + 1] + e[1 : ho + 1, :wo] + e[1 : ho + 1, 1 : wo + 1]
            beside_across = e[:he, :wo] + e[:he, 1 : wo + 1] + o_rows[:he] + o_rows[1 : he + 1]
            beside_down = e[:ho, :we] + e[1 : ho + 1, :we] + o_cols[:, :we] + o_cols[:, 1 : we + 1]
            values += [odd.reshape(-1), across.reshape(-1), down.reshape(-1)]
            log_scales += [odd_scale + odd_slope * torch.log(1 + diagonal).reshape(-1),
                           cross_scale + cross_slope * torch.log(1 + torch.cat([beside_across.reshape(-1), beside_down.reshape(-1)]))]
            grid = even
        values.append(grid.reshape(-1))
        log_scales.append(base_scale.expand(grid.numel()))
        return laplace_bits(torch.cat(values), torch.cat(log_scales))  # one call: a grid's stages are many small tensors

    def integer_latents(self) -> list[np.ndarray]:
        """The grids as the file stores them: (rows, columns) int64 each."""
        return [torch.round(latent.detach())[0, 0].cpu().to(torch.int64).numpy() for latent in self.latents]


@torch.no_grad()
def synthesise(latents: Sequence[np.ndarray], weights: Sequence[np.ndarray], height: int, width: int,
               grids: Sequence[int] | None = None, reaches: Sequence[float] | None = None) -> np.ndarray:
    """The decoder: (H, W, C) values in [-1, 1] (unclipped), float64, from integer
    latents and dequantised synthesis weights (per layer: weight, bias for the MLP; weight,
    knot values, bias for the order-1 KAN of ``grids``, ``reaches``), put together from
    :func:`synthesis_tiles`."""
    out = None
    for pixels, values in synthesis_tiles(latents, weights, height, width, grids, reaches):
        out = np.empty((height * width, values.shape[-1])) if out is None else out
        out[pixels] = values
    return out.reshape(height, width, -1)


def synthesis_tiles(latents: Sequence[np.ndarray], weights: Sequence[np.ndarray], height: int, width: int,
                    grids: Sequence[int] | None = None, reaches: Sequence[float] | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`synthesise`'s values a tile of at most kimg.LATENT_TILE_PIXELS pixels at a time,
    (pixels in raster order, (n, C) values): the decoder then holds the upsampled grids and one
    tile's activations, not the whole image's. Each output is a sum accumulated in a fixed
    order (the bias, then input by input its linear term, for the KAN the linear piece of
    :func:`kan_pieces` it falls in), pixel by pixel, so it is the same number for any thread
    count and any tile."""
    features = torch.empty(height, width, len(latents), dtype=torch.float64)
    for k, grid in enumerate(latents):
        features[..., k] = upsample(torch.from_numpy(np.asarray(grid, dtype=np.float64))[None, None], height, width)[0, 0]
    per_layer = 2 if grids is None else 3
    layers = []
    for index in range(len(weights) // per_layer):
        tensors = [torch.from_numpy(np.asarray(w)).to(torch.float64) for w in weights[per_layer * index : per_layer * (index + 1)]]
        pieces = kan_pieces(tensors[0], tensors[1], grids[index], reaches[index]) if grids is not None else None
        layers.append((tensors[0], tensors[-1], pieces))
    flat = features.view(height * width, len(latents))
    for start in range(0, height * width, LATENT_TILE_PIXELS):
        pixels = slice(start, min(start + LATENT_TILE_PIXELS, height * width))
        yield pixels, _synthesis(flat[pixels], layers, grids, reaches).numpy()


def _synthesis(x: Tensor, layers: Sequence[tuple], grids: Sequence[int] | None, reaches: Sequence[float] | None) -> Tensor:
    """:func:`synthesise`'s network on the upsampled features ``x`` of some pixels."""
    for index, (weight, bias, pieces) in enumerate(layers):
        out = bias.expand(*x.shape[:-1], bias.shape[0]).clone()
        for k in range(weight.shape[1]):
            inputs = x[..., k : k + 1]
            if pieces is None:
                out += inputs * weight[:, k]
            else:  # each edge's piece looked up, then slope · x + intercept
                slopes, intercepts = pieces
                piece = kan_piece(inputs[..., 0], grids[index], reaches[index])
                term = slopes[:, k].T[piece]
                term *= inputs
                term += intercepts[:, k].T[piece]
                out += term
        x = torch.relu(out) if pieces is None and index < len(layers) - 1 else out
    return x


# ----------------------------------------------------------------------------- grid coding
# Versions 4 and 5 (5: every model one byte, entropy.COMPACT_CODES), a nested checkerboard:
# a grid G is coded as G[::2, ::2] (itself coded the same way, ``depth`` times in all, the
# last one as a single stream), then its odd rows' odd columns, each value under the model of
# its context: the sum of its four diagonal neighbours' magnitudes (all in G[::2, ::2],
# already known), then the values whose row + column is odd
# (raster order), each under the model of the sum of its four direct neighbours' magnitudes
# (all known by then). Sums are bucketed by CONTEXT_EDGES, each of a stage's two sets into
# 1 … len(CONTEXT_EDGES) buckets (the last takes everything above); bucket 0's values come
# first, then bucket 1's, and so on. The encoder picks the depth and every bucket count that
# code the grid in the fewest bits, headers included.
# Version 8: a set may be predicted. Its values are then coded as residuals v − p, p =
# ⌊(code · S + 8) / 16⌋ with S the signed sum of the same four neighbours as its context, i.e.
# code/4 × their mean rounded half up (code 1 … PREDICTION_CODES per set, 0: not predicted),
# bucketed by the same context; the encoder tries every code per set and keeps the fewest bits
# among those whose residuals stay within the grid's largest magnitude (the same grids of
# full-size photos: files 2.3–6.4 % smaller; docs/compression.md, "Predicted sets").
# Version 3 (still read): a grid is one stream, or a checkerboard whose anchors (row + column
# even) are one stream and whose other values are bucketed by their four direct neighbours.
CONTEXT_EDGES = (0, 1, 2, 3, 5, 9)
MODEL_BITS = 8  # a model in the header: one byte (version 5's compact models, entropy.COMPACT_CODES)
STAGE_BITS = 16  # a stage's two bucket counts in the header
assert len(CONTEXT_EDGES) == MAX_BUCKETS


def _anchors(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows + cols) % 2 == 0


def _neighbour_sums(magnitudes: np.ndarray, diagonal: bool) -> np.ndarray:
    """The sum of each position's four diagonal (or direct) neighbours, 0 beyond the border."""
    p = np.pad(magnitudes, 1)
    if diagonal:
        return p[:-2, :-2] + p[:-2, 2:] + p[2:, :-2] + p[2:, 2:]
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]


def _buckets(sums: np.ndarray, count: int) -> np.ndarray:
    return np.minimum(np.searchsorted(CONTEXT_EDGES, sums, side="right") - 1, count - 1)


def stage_sets(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The masks of one stage's two sets in a grid of ``shape``: odd rows' odd columns
    (diagonal contexts), and row + column odd (direct contexts)."""
    rows, cols = np.indices(shape)
    return (rows % 2 == 1) & (cols % 2 == 1), (rows + cols) % 2 == 1


def _stage_contexts(grid: np.ndarray, mask: np.ndarray, diagonal: bool) -> np.ndarray:
    """Context sums of a stage's set ``mask``: diagonal (odd rows' odd columns) or direct
    neighbours. Every neighbour they sum is decoded before the value: an odd row's odd column
    has only G[::2, ::2] on its diagonals, and a value whose row + column is odd only the other
    two sets beside it."""
    return _neighbour_sums(np.abs(grid), diagonal)[mask]


def _predictions(neighbours: np.ndarray, code: int) -> np.ndarray:
    """Version 8's prediction of a set's values from the signed sums of its context's four
    neighbours (see above)."""
    return (code * neighbours + 8) // 16


def _best_set(grid: np.ndarray, mask: np.ndarray, diagonal: bool, limit: int
              ) -> tuple[float, list[np.ndarray], list[StreamModel], int]:
    """(bits, parts, models, prediction code) of one set of a stage: as it is, or predicted with
    whichever code 1 … PREDICTION_CODES codes it in the fewest bits, if fewer."""
    values, sums = grid[mask], _stage_contexts(grid, mask, diagonal)
    best = (*_best_buckets(values, sums, limit), 0)
    neighbours = _neighbour_sums(grid, diagonal)[mask] if sums.any() else None  # all neighbours 0: nothing to predict
    for code in range(1, PREDICTION_CODES + 1) if neighbours is not None else ():
        residuals = values - _predictions(neighbours, code)
        if np.abs(residuals).max(initial=0) <= limit:
            predicted = _best_buckets(residuals, sums, limit)
            if predicted[0] < best[0]:
                best = (*predicted, code)
    return best


def _best_buckets(values: np.ndarray, sums: np.ndarray, limit: int) -> tuple[float, list[np.ndarray], list[StreamModel]]:
    """(bits, parts, models) of one set with the bucket count that codes it in the fewest bits."""
    finest = _buckets(sums, len(CONTEXT_EDGES))
    exact = [values[finest == b] for b in range(len(CONTEXT_EDGES))]
    fitted = [(cost_bits(part, m, limit) + MODEL_BITS, m) for part in exact for m in [fit_model(part, limit, compact=True)]]
    best = None
    for count in range(1, len(CONTEXT_EDGES) + 1):
        tail = values[finest >= count - 1]
        tail_model = fit_model(tail, limit, compact=True)
        bits = sum(b for b, _ in fitted[: count - 1]) + cost_bits(tail, tail_model, limit) + MODEL_BITS
        if best is None or bits < best[0]:
            best = (bits, exact[: count - 1] + [tail], [m for _, m in fitted[: count - 1]] + [tail_model])
    return best


def code_grid(grid: np.ndarray) -> tuple[LatentLevel, list[np.ndarray], list[StreamModel]]:
    """One grid as versions 5 and 8 code it (see above): (its header, its streams, their models), in
    file order, with the depth that takes the fewest bits."""
    grid = np.asarray(grid, dtype=np.int64)
    limit = max(1, int(np.abs(grid).max(initial=0)))
    stages, options, current = [], [], grid
    for depth in range(MAX_DEPTH + 1):
        base = fit_model(current, limit, compact=True)
        spent = sum(stage[0] for stage in stages)
        options.append((spent + cost_bits(current, base, limit) + MODEL_BITS, depth, base, current))
        if current.size <= 1 or depth == MAX_DEPTH:
            break
        sets = [_best_set(current, mask, diagonal, limit) for mask, diagonal in zip(stage_sets(current.shape), (True, False))]
        stages.append((sum(s[0] for s in sets) + STAGE_BITS, sets))
        current = current[::2, ::2]
    _, depth, base, coarsest = min(options, key=lambda option: option[:2])
    streams, models, buckets, predictions = [coarsest.ravel()], [base], [], []
    for _, sets in reversed(stages[:depth]):  # coarsest stage first: the order of decoding
        buckets.append(tuple(len(parts) for _, parts, _, _ in sets))
        predictions.append(tuple(code for _, _, _, code in sets))
        for _, parts, fitted, _ in sets:
            streams += parts
            models += fitted
    return LatentLevel(limit, models, buckets, predictions), streams, models


def code_latents(latents: Sequence[np.ndarray]) -> tuple[list[LatentLevel], list[np.ndarray], list[int], list[StreamModel]]:
    """Every grid coded by :func:`code_grid`: (level headers, streams, limits, models), in file order."""
    levels, streams, limits, models = [], [], [], []
    for grid in latents:
        level, grid_streams, grid_models = code_grid(grid)
        levels.append(level)
        streams += grid_streams
        limits += [level.limit] * len(grid_streams)
        models += grid_models
    return levels, streams, limits, models


def _decode_nested(decoder: StreamDecoder, shape: tuple[int, int], level: LatentLevel) -> tuple[np.ndarray, list[np.ndarray]]:
    shapes = [shape]
    for _ in level.buckets:
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    models = iter(level.models)
    parts = [decoder.decode(shapes[-1][0] * shapes[-1][1], level.limit, next(models))]
    grid = parts[0].reshape(shapes[-1])
    for stage_shape, counts, stage_codes in zip(reversed(shapes[:-1]), level.buckets, level.stage_codes):
        finer = np.zeros(stage_shape, dtype=np.int64)
        finer[::2, ::2] = grid
        for mask, diagonal, count, code in zip(stage_sets(stage_shape), (True, False), counts, stage_codes):
            context = _buckets(_stage_contexts(finer, mask, diagonal), count)
            values = np.zeros(int(mask.sum()), dtype=np.int64)
            for bucket in range(count):
                parts.append(decoder.decode(int((context == bucket).sum()), level.limit, next(models)))
                values[context == bucket] = parts[-1]
            if code:
                values += _predictions(_neighbour_sums(finer, diagonal)[mask], code)
                if np.abs(values).max(initial=0) > level.limit:  # never so from the encoder
                    raise KanimgError("malformed .kimg payload: a predicted latent beyond its grid's largest magnitude")
            finer[mask] = values
        grid = finer
    return grid, parts


def _decode_checkerboard(decoder: StreamDecoder, shape: tuple[int, int], level: LatentLevel) -> tuple[np.ndarray, list[np.ndarray]]:
    """A version 3 grid: one stream, or anchors then the others by context."""
    if len(level.models) == 1:
        parts = [decoder.decode(shape[0] * shape[1], level.limit, level.models[0])]
        return parts[0].reshape(shape), parts
    anchors = _anchors(shape)
    grid = np.zeros(shape, dtype=np.int64)
    parts = [decoder.decode(int(anchors.sum()), level.limit, level.models[0])]
    grid[anchors] = parts[0]
    sums = _neighbour_sums(np.where(anchors, np.abs(grid), 0), diagonal=False)[~anchors]
    context, rest = _buckets(sums, len(level.models) - 1), np.zeros(int((~anchors).sum()), dtype=np.int64)
    for bucket, model in enumerate(level.models[1:]):
        parts.append(decoder.decode(int((context == bucket).sum()), level.limit, model))
        rest[context == bucket] = parts[-1]
    grid[~anchors] = rest
    return grid, parts


def decode_latents(decoder: StreamDecoder, image: ImageInfo, levels: Sequence[LatentLevel]
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[StreamModel]]:
    """Inverse of :func:`code_latents` (and of version 3's coding): (grids, and the streams,
    limits and models decoded, to check the payload codes them exactly)."""
    grids, streams, limits, models = [], [], [], []
    for level, shape in zip(levels, level_shapes(image.height, image.width, len(levels))):
        decode = _decode_checkerboard if level.buckets is None else _decode_nested
        grid, parts = decode(decoder, shape, level)
        grids.append(grid)
        streams += parts
        limits += [level.limit] * len(parts)
        models += level.models
    return grids, streams, limits, models
