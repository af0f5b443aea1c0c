"""Cubic B-spline bases for KAN layers: the fast local form and the Cox–de Boor reference.

A grid of G intervals on [lo, hi] with spacing h = (hi - lo) / G is extended by 3 knots on
each side (KAN paper, arXiv 2404.19756, Sec. 2.2), giving G + 3 cubic B-splines B_0 … B_{G+2};
B_m is supported on [lo + (m-3)h, lo + (m+1)h]. Inputs outside [lo - 3h, hi + 3h) get no
spline term. Exactly four B-splines can be non-zero at any x. On a uniform grid they have a
closed form in u = frac((x - lo) / h); on other knots (percentile grids) the interval is found
by binary search and the four values come from the local de Boor triangle. Both are what the
fast path uses; Cox–de Boor over the whole dense basis is the reference.
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


def padded_knots(knots: Tensor) -> Tensor:
    """Knots (I, n) with 3 more on each side continuing the end spacings: the layout the knot
    paths read, so the local de Boor triangle of every interval only meets finite knots."""
    steps = torch.arange(1, SPLINE_ORDER + 1, dtype=knots.dtype, device=knots.device)
    first = (knots[:, 1] - knots[:, 0])[:, None]
    last = (knots[:, -1] - knots[:, -2])[:, None]
    return torch.cat([knots[:, :1] - first * steps.flip(0), knots, knots[:, -1:] + last * steps], dim=1).contiguous()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (coincident knots), without inf/NaN in either direction."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _local_basis(x: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Tensor | None,
                 slopes: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The four basis functions that can be non-zero at each x (B, I).

    Returns their indices (B, I, 4) (clamped into range), validity mask (B, I, 4), values
    (B, I, 4) and, if ``slopes``, d/dx of the values. ``knots`` None: the uniform grid given by
    lo and inv_h (closed form); otherwise any knots in :func:`padded_knots` layout (interval by
    binary search, values by the local de Boor triangle).
    """
    if knots is None:
        s = (x - lo) * inv_h  # (B, I) position in knot spacings from lo
        inside = (s >= -SPLINE_ORDER) & (s < grid_size + SPLINE_ORDER)
        s = torch.where(inside, s, torch.zeros_like(s))  # keeps floor() finite for far/NaN inputs
        first = torch.floor(s)
        u = s - first  # floor has zero derivative: du/dx = 1/h almost everywhere
        values = cubic_pieces(u)
        d = cubic_pieces_du(u) * inv_h[:, None] if slopes else None
    else:
        inside, first, values, d = _de_boor(x, knots, slopes)
    m = first.long()[..., None] + torch.arange(4, device=x.device)  # (B, I, 4) basis indices
    valid = inside[..., None] & (m >= 0) & (m <= grid_size + 2)
    return m.clamp(0, grid_size + 2), valid, values, d


def _de_boor(x: Tensor, padded: Tensor, slopes: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Local cubic basis on arbitrary knots: (inside, first index, values, slopes) as in _local_basis."""
    real = padded[:, SPLINE_ORDER:-SPLINE_ORDER].contiguous()  # (I, n)
    inside = (x >= real[:, 0]) & (x < real[:, -1])  # False for NaN too
    k = torch.searchsorted(real, x.detach().t().contiguous(), right=True).t() - 1  # t_k <= x < t_{k+1}
    k = torch.where(inside, k, torch.full_like(k, SPLINE_ORDER))
    offsets = torch.arange(-SPLINE_ORDER, SPLINE_ORDER + 1, device=x.device)
    near = torch.gather(padded.expand(x.shape[0], -1, -1), 2, k[..., None] + SPLINE_ORDER + offsets)  # (B, I, 7)

    def t(o: int) -> Tensor:  # t_{k+o}
        return near[..., SPLINE_ORDER + o]

    xs = torch.where(inside, x, t(0))  # outside: any finite point, masked by the caller
    left = [None] + [xs - t(1 - j) for j in (1, 2, 3)]
    right = [None] + [t(j) - xs for j in (1, 2, 3)]
    basis = [torch.ones_like(xs)]
    for j in (1, 2, 3):  # the de Boor triangle: degree j from degree j - 1
        if j == 3:
            quadratic = basis
        saved, nxt = torch.zeros_like(xs), []
        for q in range(j):
            temp = _safe_div(basis[q], right[q + 1] + left[j - q])
            nxt.append(saved + right[q + 1] * temp)
            saved = left[j - q] * temp
        basis = nxt + [saved]
    d = None
    if slopes:  # dB_{m,3}/dx = 3 (B_{m,2} / (t_{m+3} - t_m) - B_{m+1,2} / (t_{m+4} - t_{m+1})), m = k-3+q
        zero = torch.zeros_like(xs)
        d = torch.stack([3 * ((_safe_div(quadratic[q - 1], t(q) - t(q - 3)) if q > 0 else zero)
                              - (_safe_div(quadratic[q], t(q + 1) - t(q - 2)) if q < 3 else zero)) for q in range(4)], dim=-1)
    return inside, k - SPLINE_ORDER, torch.stack(basis, dim=-1), d


def spline_features(x: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Tensor | None = None) -> Tensor:
    """Feature rows [silu(x) | B_0(x_0) … B_{G+2}(x_0) | … ] of a KAN layer.

    Args:
        x: (B, I) layer inputs.
        lo, inv_h: (I,) grid start and 1/h per input feature (uniform grids).
        grid_size: G.
        knots: None for uniform grids, else any knots in :func:`padded_knots` layout.
    Returns:
        (B, I + I·(G+3)) features; one matmul with the packed weight gives the layer output.
        Built from differentiable ops, so gradients (of any order) flow through it.
    """
    batch, n_in = x.shape
    n_basis = grid_size + SPLINE_ORDER
    m, valid, values, _ = _local_basis(x, lo, inv_h, grid_size, knots)
    basis = x.new_zeros(batch, n_in, n_basis).scatter_add(2, m, values * valid)  # (B, I, G+3)
    return torch.cat([torch.nn.functional.silu(x), basis.reshape(batch, n_in * n_basis)], dim=1)


def spline_features_input_grad(x: Tensor, grad_features: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int,
                               knots: Tensor | None = None) -> Tensor:
    """dL/dx (B, I) from dL/dF (B, I + I·(G+3)) for :func:`spline_features`."""
    batch, n_in = x.shape
    n_basis = grid_size + SPLINE_ORDER
    m, valid, _, slopes = _local_basis(x, lo, inv_h, grid_size, knots, slopes=True)
    grad_basis = grad_features[:, n_in:].reshape(batch, n_in, n_basis).gather(2, m)  # (B, I, 4)
    spline_part = (grad_basis * slopes * valid).sum(-1)
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
