"""The one renderer: a model evaluated on a pixel grid, at any resolution, in any dtype, in flat memory.

:func:`render` serves fits, checkpoints and the .kimg decoder alike (the decoder drives a
:class:`GridEvaluator` tile by tile, in float32 and float64).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import KanimgError
from .io import MAX_PIXELS
from .mapped import MAX_STREAM_PIXELS, MAX_STREAM_SIDE
from .nn.bspline import spline_features
from .nn.kan import KAN
from .sampling import axis_coords, chunks

EVAL_CHUNK = 1 << 16  # pixels per forward pass (CPU: larger chunks were no faster)
GPU_EVAL_CHUNK = 1 << 18  # on CUDA: fewer, fuller launches; a few hundred MB of activations
TABLE_VALUES = 1 << 24  # spline features per piece of a KAN's first-layer tables (as kimg.TILE_VALUES)


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


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (floating) parameters, float32 for a model without any."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def separable(model: nn.Module) -> bool:
    """Whether the model is a KAN whose first layer sees x and y alone on uniform knots, so that
    each of its units is f(x) + g(y) and can be tabulated per axis (:class:`GridEvaluator`)."""
    return (isinstance(model, KAN) and model.encoding is None and model.directions == 0 and model.layers[0].in_features == 2
            and model.layers[0].has_uniform_knots)


def axis_table(layer: nn.Module, feature: int, values: Tensor, table_values: int = TABLE_VALUES) -> Tensor:
    """Σ over one input feature's edges of a KAN layer (uniform knots) at ``values``: (N,) → (N, O),
    computed ``table_values`` spline features at a time."""
    lo, inv_h = layer._grid_lo_inv_h()
    spline = layer.spline_scale[:, feature, None] * layer.spline_weight[:, feature, :]  # (O, G+3)
    weight = torch.cat([layer.base_weight[:, feature, None], spline], dim=1).t()  # (G+4, O)
    step = max(1, table_values // weight.shape[0])
    return torch.cat([spline_features(values[part, None], lo[feature : feature + 1], inv_h[feature : feature + 1],
                                      layer.grid_size) @ weight for part in chunks(values.shape[0], step)])


class GridEvaluator:
    """A model at row-major pixel indices of an H×W grid, in the model's own dtype, on ``device``
    (where the model must be).

    A KAN whose first layer sees x and y alone (:func:`separable`) has first-layer units
    f(x) + g(y): they are evaluated once on the W + H distinct coordinates and broadcast — free,
    however fine the grid — and only the deeper layers run per pixel. Any other model runs per
    pixel on the pixels' coordinates.

    Args:
        coords_dtype: the dtype the axis coordinates are computed in before rounding to the
            model's (default: the model's). The .kimg decoder's float32 screening uses float64.
        table_values: spline features per piece of the first-layer tables (memory only).
    """

    def __init__(self, model: nn.Module, height: int, width: int, convention: str = "centers",
                 device: torch.device | str | None = None, coords_dtype: torch.dtype | None = None,
                 table_values: int = TABLE_VALUES) -> None:
        self.model, self.height, self.width = model, height, width
        self.dtype = model_dtype(model)
        coords_dtype = coords_dtype or self.dtype
        self.xs = axis_coords(width, convention, device, coords_dtype).to(self.dtype)
        self.ys = axis_coords(height, convention, device, coords_dtype).to(self.dtype)
        self.separable = separable(model)
        if self.separable:
            with torch.no_grad():
                first = model.layers[0]
                self.fx = axis_table(first, 0, self.xs, table_values)  # (W, O)
                self.fy = axis_table(first, 1, self.ys, table_values)  # (H, O)

    @torch.no_grad()
    def __call__(self, index: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Values (model output + 1)/2 in [0, 1] (unclipped) at row-major pixel ``index`` (N,) on
        the evaluator's device: (N, C), the outputs converted to ``dtype`` (default: the model's)
        before the mapping."""
        index = index.to(self.xs.device)
        row, col = index // self.width, index % self.width
        was_training = self.model.training
        self.model.eval()
        try:
            if self.separable:
                hidden = self.fy[row] + self.fx[col]
                for layer in self.model.layers[1:]:
                    hidden = layer(hidden)
            else:
                hidden = self.model(torch.stack([self.xs[col], self.ys[row]], dim=1))
        finally:
            self.model.train(was_training)
        return (hidden.to(dtype or self.dtype) + 1) / 2


def check_render_size(height: int, width: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse a grid outside 1x1 … ``max_pixels`` (sides up to MAX_STREAM_SIDE) in one line."""
    if width < 1 or height < 1:
        raise KanimgError(f"cannot render {width}x{height}: an image needs at least 1x1 pixels")
    if max(width, height) > MAX_STREAM_SIDE:
        raise KanimgError(f"cannot render {width}x{height}: a side of {max(width, height):,} pixels, over the limit of "
                          f"{MAX_STREAM_SIDE:,}")
    if width * height > max_pixels:
        raise KanimgError(f"cannot render {width}x{height}: {width * height / 1e6:,.0f} megapixels, over the limit of "
                          f"{max_pixels / 1e6:,.0f}")


def _evaluator(model: nn.Module, height: int, width: int, convention: str, device: torch.device | str,
               dtype: torch.dtype | None, max_pixels: int) -> tuple[GridEvaluator, torch.dtype]:
    """The GridEvaluator of a render (of a copy of the model converted to ``dtype`` if that differs)
    and the render's output dtype, after checking the grid size."""
    check_render_size(height, width, max_pixels)
    if dtype is not None and dtype != model_dtype(model):
        model = copy.deepcopy(model).to(dtype)
    evaluate = GridEvaluator(model, height, width, convention, device)
    return evaluate, torch.promote_types(evaluate.dtype, torch.float32)


@torch.no_grad()
def render_bands(model: nn.Module, height: int, width: int, convention: str = "centers",
                 device: torch.device | str = "cpu", chunk: int | None = None, dtype: torch.dtype | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """The model on an H×W pixel grid as bands of whole rows, top to bottom: (first row,
    (rows, W, C) numpy pixels in [0, 1], unclipped), about ``chunk`` pixels (default
    :func:`eval_chunk`) each, so an image larger than memory can be rendered to a file
    (up to MAX_STREAM_PIXELS). ``dtype`` as in :func:`render`."""
    evaluate, out_dtype = _evaluator(model, height, width, convention, device, dtype, MAX_STREAM_PIXELS)
    chunk = chunk or eval_chunk(device)
    rows = max(1, chunk // width)
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        first = start * width  # (a row wider than a chunk is evaluated in pieces)
        parts = [evaluate(torch.arange(first + part.start, first + part.stop, device=device), out_dtype).cpu()
                 for part in chunks((stop - start) * width, chunk)]
        yield start, torch.cat(parts).numpy().reshape(stop - start, width, -1)


@torch.no_grad()
def render(model: nn.Module, height: int, width: int, convention: str = "centers",
           device: torch.device | str = "cpu", chunk: int | None = None, dtype: torch.dtype | None = None,
           pixels: Sequence[int] | np.ndarray | Tensor | None = None) -> np.ndarray:
    """Pixels in [0, 1] (unclipped) of the model on an H×W pixel grid: (H, W, C), or (len(pixels), C)
    at the row-major indices ``pixels`` only.

    ``dtype`` (default: the model's parameter dtype) is the evaluation dtype; another one
    evaluates a copy of the model converted to it (the model itself is left as it is). The
    result is numpy in that dtype (at least float32). ``chunk`` pixels (default:
    :func:`eval_chunk`) are evaluated at a time, so memory stays flat however large the
    render; only the output itself is held (larger images: :func:`render_bands`).

    Raises:
        KanimgError: a grid outside 1x1 … MAX_PIXELS (the output must fit in memory).
        IndexError: a pixel index outside the grid.
    """
    if pixels is None:
        check_render_size(height, width)
        out = None
        for start, band in render_bands(model, height, width, convention, device, chunk, dtype):
            out = np.empty((height, width, band.shape[2]), band.dtype) if out is None else out
            out[start : start + band.shape[0]] = band
        return out
    evaluate, out_dtype = _evaluator(model, height, width, convention, device, dtype, MAX_PIXELS)
    count = height * width
    index = (pixels.to("cpu", torch.long) if isinstance(pixels, Tensor)
             else torch.as_tensor(np.asarray(pixels, dtype=np.int64))).reshape(-1)
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < count:
        raise IndexError(f"pixel indices must lie in [0, {count}) for a {width}x{height} grid")
    parts = [evaluate(index[part], out_dtype).cpu() for part in chunks(index.shape[0], chunk or eval_chunk(device))]
    if not parts:  # no pixels asked for: the output width is unknown without a forward pass
        parts = [evaluate(torch.zeros(1, dtype=torch.long), out_dtype).cpu()[:0]]
    return torch.cat(parts).numpy()
