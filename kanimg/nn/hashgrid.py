"""Multiresolution hash encoding with a small ReLU MLP head (Müller et al. 2022, "Instant
Neural Graphics Primitives with a Multiresolution Hash Encoding"), in plain PyTorch.

Level l has a grid of N_l cells per side, N_l = ⌊N_min · b^l⌋ with b = exp((ln N_max − ln N_min)
/ (L − 1)) (paper eq. 3). Each of its (N_l + 1)² vertices owns F learned features: stored
densely where they fit in the level's table of T entries, else looked up by the spatial hash
(x · 1 ⊕ y · 2654435761) mod T (paper eq. 4, 2-D). A point's features are the bilinear
interpolation of its cell's four vertices at every level, concatenated (L · F values) and
decoded by the MLP.

Departures from the reference (tiny-cuda-nn): fused kernels on CPU only (elsewhere a weighted
gather and a scatter-add into a dense table gradient, :func:`interpolate`), float32 tables, and coordinates in [-1, 1]² mapped to the
unit square with vertices on its border (so a level with N_l cells has exactly N_l + 1
vertices per side).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .kernel import cpu_kernel
from .mlp import relu_mlp
from .packed_spline import fused_path

HASH_PRIME_Y = 2654435761  # π₂ of the paper's spatial hash; π₁ = 1
INIT_SCALE = 1e-4  # table entries start in U(-1e-4, 1e-4), as in the paper


class _Interpolate(torch.autograd.Function):
    """Σ_k weights[n, k] · table[rows[n, k]]: rows and weights (N, K) → (N, F).

    Forward is one fused ``embedding_bag``; backward scatter-adds into the table's gradient with
    ``index_add_``, 3–4× faster on CPU than ``embedding``'s backward. The weights (functions
    of the coordinates, which are not trained) get no gradient.
    """

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(rows, weights)
        ctx.entries = table.shape[0]
        return nn.functional.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weights = ctx.saved_tensors
        contributions = (weights[..., None] * grad[:, None, :]).reshape(-1, grad.shape[1])  # (N·K, F)
        return grad.new_zeros(ctx.entries, grad.shape[1]).index_add_(0, rows.reshape(-1), contributions), None, None


# The fused C++ CPU kernels (csrc/hashgrid_cpu.cpp) as a torch custom op, so torch.compile sees
# one opaque node instead of tracing into a pybind call; backward recomputes the corners from x.
@torch.library.custom_op("kanimg::hash_encode", mutates_args=())
def _fused_encode(x: Tensor, table: Tensor, resolution: Tensor, side: Tensor, size: Tensor, hashed: Tensor, offset: Tensor) -> Tensor:
    return cpu_kernel().hash_encode(x.contiguous(), table.contiguous(), resolution, side, size, hashed, offset)


@_fused_encode.register_fake
def _(x, table, resolution, side, size, hashed, offset):
    return x.new_empty(x.shape[0], resolution.shape[0] * table.shape[1])


@torch.library.custom_op("kanimg::hash_encode_backward", mutates_args=())
def _fused_encode_backward(grad: Tensor, x: Tensor, resolution: Tensor, side: Tensor, size: Tensor, hashed: Tensor, offset: Tensor,
                           entries: int) -> Tensor:
    return cpu_kernel().hash_encode_backward(grad, x.contiguous(), resolution, side, size, hashed, offset, entries)


@_fused_encode_backward.register_fake
def _(grad, x, resolution, side, size, hashed, offset, entries):
    return grad.new_empty(entries, grad.shape[1] // resolution.shape[0])


def _encode_setup_context(ctx, inputs, output) -> None:
    x, table, *levels = inputs
    ctx.save_for_backward(x, *levels)
    ctx.entries = table.shape[0]


def _encode_autograd(ctx, grad: Tensor):
    x, *levels = ctx.saved_tensors
    return None, torch.ops.kanimg.hash_encode_backward(grad, x, *levels, ctx.entries), None, None, None, None, None


_fused_encode.register_autograd(_encode_autograd, setup_context=_encode_setup_context)


def interpolate(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """Weighted sums of table rows: rows and weights (B, L, K) → (B, L·F)."""
    batch, levels, k = rows.shape
    return _Interpolate.apply(table, rows.reshape(-1, k), weights.reshape(-1, k)).reshape(batch, levels * table.shape[1])


def level_resolutions(levels: int, base: int, finest: int) -> list[int]:
    """N_l = ⌊N_min · b^l⌋ for l = 0 … L-1, b = exp((ln N_max − ln N_min) / (L − 1))."""
    if levels == 1:
        return [int(base)]
    growth = math.exp((math.log(finest) - math.log(base)) / (levels - 1))
    return [int(math.floor(base * growth**level + 1e-9)) for level in range(levels)]


class HashGridEncoding(nn.Module):
    """(B, 2) coordinates in [-1, 1] → (B, L·F) interpolated multiresolution features.

    Args:
        levels: L.
        features: F, features per vertex.
        log2_table_size: log₂ T, entries per level's table (levels with fewer vertices are dense).
        base_resolution, finest_resolution: N_min and N_max, cells per side of the coarsest and
            finest level.
    """

    def __init__(self, levels: int = 16, features: int = 2, log2_table_size: int = 14, base_resolution: int = 16,
                 finest_resolution: int = 256) -> None:
        super().__init__()
        self.levels, self.features = levels, features
        self.out_features = levels * features
        table = 1 << log2_table_size
        resolutions = level_resolutions(levels, base_resolution, finest_resolution)
        sizes = [min(table, (n + 1) ** 2) for n in resolutions]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("resolution", torch.tensor(resolutions, dtype=torch.float32))  # (L,) N_l
        self.register_buffer("side", torch.tensor([n + 1 for n in resolutions]))  # (L,) vertices per side
        self.register_buffer("size", torch.tensor(sizes))  # (L,) table entries per level
        self.register_buffer("hashed", torch.tensor([(n + 1) ** 2 > table for n in resolutions]))  # (L,)
        self.register_buffer("offset", torch.tensor(offsets))  # (L,) start of each level in the table
        self.table = nn.Parameter(torch.empty(sum(sizes), features))  # (Σ sizes, F)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.table.uniform_(-INIT_SCALE, INIT_SCALE)

    def corners(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows (B, L, 4) of every point's cell corners at every level, and their
        bilinear weights (B, L, 4)."""
        position = (x.clamp(-1, 1)[:, None, :] + 1) / 2 * self.resolution[:, None]  # (B, L, 2) in cells
        cell = torch.minimum(position.floor(), (self.resolution - 1)[:, None])  # x = 1 lies in the last cell
        frac = position - cell  # (B, L, 2) in [0, 1]
        cell = cell.long()
        dx = torch.tensor([0, 1, 0, 1], device=x.device)
        dy = torch.tensor([0, 0, 1, 1], device=x.device)
        cx, cy = cell[..., 0:1] + dx, cell[..., 1:2] + dy  # (B, L, 4) vertex coordinates
        dense = cx + cy * self.side[:, None]
        hashed = torch.bitwise_xor(cx, cy * HASH_PRIME_Y) % self.size[:, None]
        rows = torch.where(self.hashed[:, None], hashed, dense) + self.offset[:, None]
        fx, fy = frac[..., 0:1], frac[..., 1:2]
        weights = torch.where(dx.bool(), fx, 1 - fx) * torch.where(dy.bool(), fy, 1 - fy)  # (B, L, 4)
        return rows, weights

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype == self.table.dtype and fused_path("cpu", x.dtype):
            return torch.ops.kanimg.hash_encode(x, self.table, self.resolution, self.side, self.size, self.hashed, self.offset)
        return interpolate(self.table, *self.corners(x))


class HashGrid(nn.Module):
    """Hash encoding + ReLU MLP: widths [2, hidden…, n_out], the first linear layer taking the
    encoding's L·F features (the paper's image experiments: 2 hidden layers of 64)."""

    def __init__(self, widths: Sequence[int], levels: int = 16, features: int = 2, log2_table_size: int = 14,
                 base_resolution: int = 16, finest_resolution: int = 256) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        self.encoding = HashGridEncoding(levels, features, log2_table_size, base_resolution, finest_resolution)
        self.net = relu_mlp([levels * features, *widths[1:]])
        self.finest_resolution = finest_resolution

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.encoding(x))
