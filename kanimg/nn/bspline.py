"""Cubic B-spline bases for KAN layers: the fast local form and the Cox–de Boor reference.

A grid of G intervals on [lo, hi] with spacing h = (hi - lo) / G is extended by 3 knots on
each side (KAN paper, arXiv 2404.19756, Sec. 2.2), giving G + 3 cubic B-splines B_0 … B_{G+2};
B_m is supported on [lo + (m-3)h, lo + (m+1)h]. Inputs outside [lo - 3h, hi + 3h) get no
spline term. On a uniform grid exactly four B-splines are non-zero at any x and they have a
closed form in u = frac((x - lo) / h), which is what the fast path uses.
"""
from __future__ import annotations

import torch
from torch import Tensor

SPLINE_ORDER = 3


def uniform_knots(lo: Tensor, hi: Tensor, grid_size: int) -> Tensor:
    """Extended uniform knot vectors.

    Args:
        lo, hi: (I,) interior grid range per input feature.
        grid_size: G, the number of intervals.
    Returns:
        (I, G + 7) knots t_0 … t_{G+6}; the interior range is [t_3, t_{G+3}].
    """
    steps = torch.arange(-SPLINE_ORDER, grid_size + SPLINE_ORDER + 1, dtype=lo.dtype, device=lo.device)
    h = (hi - lo) / grid_size
    return lo[:, None] + steps[None, :] * h[:, None]


def cubic_pieces(u: Tensor) -> Tensor:
    """Values of the four non-zero uniform cubic B-splines B_j … B_{j+3} at u ∈ [0, 1).

    Returns (…, 4): (1-u)³/6, (3u³-6u²+4)/6, (-3u³+3u²+3u+1)/6, u³/6.
    """
    u2 = u * u
    u3 = u2 * u
    v = 1 - u
    return torch.stack([v * v * v / 6, (3 * u3 - 6 * u2 + 4) / 6, (-3 * u3 + 3 * u2 + 3 * u + 1) / 6, u3 / 6], dim=-1)


def cubic_pieces_du(u: Tensor) -> Tensor:
    """d/du of :func:`cubic_pieces`, shape (…, 4)."""
    u2 = u * u
    v = 1 - u
    return torch.stack([-v * v / 2, 1.5 * u2 - 2 * u, -1.5 * u2 + u + 0.5, u2 / 2], dim=-1)


def _locate(x: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Basis indices (B, I, 4), their validity mask (B, I, 4) and u (B, I) for inputs x (B, I)."""
    s = (x - lo) * inv_h  # (B, I) position in knot spacings from lo
    inside = (s >= -SPLINE_ORDER) & (s < grid_size + SPLINE_ORDER)
    s = torch.where(inside, s, torch.zeros_like(s))  # keeps floor() finite for far/NaN inputs
    j = torch.floor(s)
    u = s - j  # floor has zero derivative: du/dx = 1/h almost everywhere
    m = j.long()[..., None] + torch.arange(4, device=x.device)  # (B, I, 4) basis indices
    valid = inside[..., None] & (m >= 0) & (m <= grid_size + 2)
    return m.clamp(0, grid_size + 2), valid, u


def spline_features(x: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int) -> Tensor:
    """Feature rows [silu(x) | B_0(x_0) … B_{G+2}(x_0) | … ] of a uniform-grid KAN layer.

    Args:
        x: (B, I) layer inputs.
        lo, inv_h: (I,) grid start and 1/h per input feature.
        grid_size: G.
    Returns:
        (B, I + I·(G+3)) features; one matmul with the packed weight gives the layer output.
        Built from differentiable ops, so gradients (of any order) flow through it.
    """
    batch, n_in = x.shape
    n_basis = grid_size + SPLINE_ORDER
    m, valid, u = _locate(x, lo, inv_h, grid_size)
    values = cubic_pieces(u) * valid  # (B, I, 4)
    basis = x.new_zeros(batch, n_in, n_basis).scatter_add(2, m, values)  # (B, I, G+3)
    return torch.cat([torch.nn.functional.silu(x), basis.reshape(batch, n_in * n_basis)], dim=1)


def spline_features_input_grad(x: Tensor, grad_features: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int) -> Tensor:
    """dL/dx (B, I) from dL/dF (B, I + I·(G+3)) for :func:`spline_features`."""
    batch, n_in = x.shape
    n_basis = grid_size + SPLINE_ORDER
    m, valid, u = _locate(x, lo, inv_h, grid_size)
    grad_basis = grad_features[:, n_in:].reshape(batch, n_in, n_basis).gather(2, m)  # (B, I, 4)
    spline_part = (grad_basis * cubic_pieces_du(u) * valid).sum(-1) * inv_h
    sig = torch.sigmoid(x)
    return grad_features[:, :n_in] * sig * (1 + x * (1 - sig)) + spline_part


def cox_de_boor(x: Tensor, knots: Tensor, order: int = SPLINE_ORDER) -> Tensor:
    """Reference B-spline basis by the Cox–de Boor recursion, for any (also non-uniform) knots.

    Args:
        x: (B, I) inputs.
        knots: (I, n) non-decreasing knot vectors.
    Returns:
        (B, I, n - order - 1) basis values; half-open intervals [t_m, t_{m+1}), so the basis
        is zero at and beyond the last knot.
    """
    xe = x[..., None]  # (B, I, 1)
    t = knots[None]  # (1, I, n)
    basis = ((xe >= t[..., :-1]) & (xe < t[..., 1:])).to(x.dtype)  # (B, I, n-1) order-0 indicators
    for k in range(1, order + 1):
        left_den = t[..., k:-1] - t[..., : -(k + 1)]
        right_den = t[..., k + 1 :] - t[..., 1:-k]
        left = (xe - t[..., : -(k + 1)]) / torch.where(left_den == 0, torch.ones_like(left_den), left_den)
        right = (t[..., k + 1 :] - xe) / torch.where(right_den == 0, torch.ones_like(right_den), right_den)
        basis = left * basis[..., :-1] + right * basis[..., 1:]
    return basis
