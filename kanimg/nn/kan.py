"""Kolmogorov–Arnold Network layers with per-layer cubic B-spline grids.

    y_j = Σ_i  w_b[j,i] · silu(x_i)  +  w_s[j,i] · Σ_m c[j,i,m] · B_m(x_i)        (KAN paper, eq. 2.10)

The fast path packs [w_b | w_s ⊙ c] into one (I·(G+3) + I, O) weight and evaluates the layer
as ONE matmul with the feature rows [silu(x) | local basis] (see bspline.py), on a fused C++
kernel (CPU) or Triton kernel (CUDA) where there is one (packed_spline.py). Every path saves
only x for backward and recomputes the features there, so a layer keeps 4 bytes per input
feature per sample instead of the dense basis.

Departures from pykan, on purpose:
- knots are uniform per input feature (closed-form basis) or, with ``grid_kind="percentile"``,
  placed at sample quantiles by grid updates as in pykan (local de Boor basis after a binary
  search); both run through the same packed matmul and kernels;
- a grid update refits the range per input feature and re-solves the coefficients by a
  regularised float64 least-squares projection of the old function onto the new spline space,
  sampled evenly on every new knot interval, so no interval is ever empty.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .bspline import (SPLINE_ORDER, cox_de_boor, padded_knots, uniform_knots)
from .packed_spline import packed_spline

GRID_KINDS = ("uniform", "percentile")
# A uniform grid spans all of a feature's samples, except outliers more than RANGE_MARGIN of
# the central range beyond its RANGE_QUANTILE quantiles (those fall on the 3 extension
# intervals, or beyond, where only the SiLU base acts).
RANGE_QUANTILE = 0.001
RANGE_MARGIN = 0.25
# pykan's grid_eps: percentile knots are mixed with this fraction of uniform knots, which
# bounds the smallest interval.
PERCENTILE_UNIFORM_MIX = 0.02
# Least-squares refit: evaluation points per knot interval, and the second-difference
# penalty relative to the mean diagonal of the normal matrix (keeps rank-deficient or
# badly scaled systems finite without visibly changing well-posed fits).
REFIT_POINTS_PER_INTERVAL = 4
# A grid update moves a feature's knots only when some knot would move by more than this many
# knot intervals: a refit onto non-nested knots loses a little detail each time, and on
# batch-to-batch jitter of the sample range those losses were measured to add up.
REFIT_TOLERANCE = 1.0
REFIT_SMOOTHING = 1e-9
# Checkpoints written before layers recorded their knot kind: knots whose spacings differ by
# no more than this, relative to the spacing itself, are read as uniform (float32 knots that
# sit far from 0 relative to their spacing are read as general: slower, never wrong).
UNIFORM_TOLERANCE = 1e-5


class KANLayer(nn.Module):
    """One KAN layer: I·O learnable edge functions silu-base + cubic spline on G intervals.

    Args:
        in_features, out_features: I and O.
        grid_size: G, the number of spline intervals of every input feature's grid.
        grid_range: initial interior range [lo, hi] of every grid.
        grid_kind: "uniform" (closed-form basis) or "percentile" (pykan-style knots at
            sample quantiles after each grid update).
        noise_scale: amplitude of the initial spline coefficients, divided by G (as pykan).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int,
        grid_range: Sequence[float] = (-1.0, 1.0),
        grid_kind: str = "uniform",
        noise_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if grid_kind not in GRID_KINDS:
            raise ValueError(f"grid_kind must be one of {GRID_KINDS}, not {grid_kind!r}")
        if grid_size < 1 or in_features < 1 or out_features < 1:
            raise ValueError("in_features, out_features and grid_size must be positive")
        self.in_features, self.out_features, self.grid_size = in_features, out_features, grid_size
        self.grid_kind = grid_kind
        self.noise_scale = noise_scale
        lo = torch.full((in_features,), float(grid_range[0]))
        hi = torch.full((in_features,), float(grid_range[1]))
        self.register_buffer("knots", uniform_knots(lo, hi, grid_size))  # (I, G+7)
        # Evenly spaced knots take the closed-form basis. Recorded by whoever sets the knots
        # (set_knots, grid updates and extensions), never guessed from their values, and kept
        # in the state dict.
        self.has_uniform_knots = True
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))  # w_b (O, I)
        self.spline_scale = nn.Parameter(torch.empty(out_features, in_features))  # w_s (O, I)
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + SPLINE_ORDER))  # c (O, I, G+3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pykan's initialisation: w_b ~ U(-1, 1)/√I, w_s = 1/√I, small random spline coefficients."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.base_weight.uniform_(-bound, bound)
            self.spline_scale.fill_(bound)
            self.spline_weight.uniform_(-0.5, 0.5).mul_(self.noise_scale / self.grid_size)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, G={self.grid_size}, {self.grid_kind} grid"

    def _grid_lo_inv_h(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.knots[:, SPLINE_ORDER], self.knots[:, SPLINE_ORDER + self.grid_size]
        return lo, self.grid_size / (hi - lo)

    def packed_weight(self) -> Tensor:
        """[w_b ; w_s ⊙ c] as one (I + I·(G+3), O) matrix matching the feature rows."""
        spline = (self.spline_scale[..., None] * self.spline_weight).permute(1, 2, 0)  # (I, G+3, O)
        return torch.cat([self.base_weight.t(), spline.reshape(-1, self.out_features)], dim=0)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, I) -> (B, O)."""
        lo, inv_h = self._grid_lo_inv_h()
        knots = None if self.has_uniform_knots else padded_knots(self.knots)
        if torch.is_autocast_enabled(x.device.type):
            # Mixed precision: the layer itself runs in float32 (at least), since the basis needs
            # the digits of u = (x - lo)/h that bf16 drops, and neither the C++ kernel nor the
            # PyTorch path's scatter takes half types; the ops around it follow autocast.
            dtype = torch.promote_types(x.dtype, torch.float32)
            with torch.autocast(x.device.type, enabled=False):
                return packed_spline(x.to(dtype), self.packed_weight().to(dtype), lo.to(dtype), inv_h.to(dtype), self.grid_size,
                                     None if knots is None else knots.to(dtype))
        return packed_spline(x, self.packed_weight(), lo, inv_h, self.grid_size, knots)

    def set_knots(self, knots: Tensor, uniform: bool) -> None:
        """Replace the knots (I, G+7); ``uniform``: every feature's knots are evenly spaced."""
        if knots.shape != (self.in_features, self.grid_size + 2 * SPLINE_ORDER + 1):
            raise ValueError(f"knots of shape {tuple(knots.shape)} for {self.in_features} features and G={self.grid_size}")
        self.knots = knots.to(self.knots.dtype).contiguous()
        self.has_uniform_knots = bool(uniform)

    def get_extra_state(self) -> dict:
        return {"uniform_knots": self.has_uniform_knots}

    def set_extra_state(self, state: dict) -> None:
        self.has_uniform_knots = bool(state["uniform_knots"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "_extra_state"
        if key not in state_dict and prefix + "knots" in state_dict:  # a checkpoint from before the knot kind was kept
            state_dict[key] = {"uniform_knots": evenly_spaced(state_dict[prefix + "knots"])}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same layer the straightforward way: Cox–de Boor dense basis and autograd.

        Works for any knots; keeps the (B, I, G+3) basis and its recursion for backward. The
        tests and benchmarks use it as the oracle for the fast path.
        """
        basis = cox_de_boor(x, self.knots)  # (B, I, G+3)
        spline = torch.einsum("bim,oim->bo", basis, self.spline_scale[..., None] * self.spline_weight)
        return nn.functional.silu(x) @ self.base_weight.t() + spline

    def spline_values(self, x: Tensor) -> Tensor:
        """Σ_m c[j,i,m] B_m(x_i) for every edge: x (B, I) -> (B, O, I), by Cox–de Boor."""
        return torch.einsum("bim,oim->boi", cox_de_boor(x, self.knots), self.spline_weight)

    @torch.no_grad()
    def update_grid(self, x: Tensor) -> None:
        """Move each input feature's grid to where its samples x (N, I) now lie, keeping the function."""
        xs = torch.sort(x.detach().to(torch.float64), dim=0).values  # (N, I)
        n = xs.shape[0]
        if self.grid_kind == "uniform":
            k = int(RANGE_QUANTILE * (n - 1))
            span = xs[n - 1 - k] - xs[k]
            lo = torch.maximum(xs[0], xs[k] - RANGE_MARGIN * span)  # all samples, unless far outliers
            hi = torch.minimum(xs[-1], xs[n - 1 - k] + RANGE_MARGIN * span)
            centre, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(1e-3)
            new = uniform_knots(centre - half, centre + half, self.grid_size)
        else:
            idx = torch.linspace(0, n - 1, self.grid_size + 1, device=x.device).round().long()
            adaptive = xs[idx].t()  # (I, G+1)
            lo, hi = adaptive[:, :1], adaptive[:, -1:]
            span = (hi - lo).clamp_min(1e-3)
            uniform = lo + span * torch.linspace(0, 1, self.grid_size + 1, dtype=xs.dtype, device=x.device)
            interior = PERCENTILE_UNIFORM_MIX * uniform + (1 - PERCENTILE_UNIFORM_MIX) * adaptive
            h = span / self.grid_size
            pad = torch.arange(1, SPLINE_ORDER + 1, dtype=xs.dtype, device=x.device)
            new = torch.cat([interior[:, :1] - h * pad.flip(0), interior, interior[:, -1:] + h * pad], dim=1)
        new = new.to(self.knots.dtype)
        # Keep the grids of features whose samples barely moved: every refit onto knots that
        # are not a refinement loses a little detail, and those losses add up over many updates.
        spacing = (self.knots[:, -SPLINE_ORDER - 1] - self.knots[:, SPLINE_ORDER]) / self.grid_size
        moved = (new - self.knots).abs().amax(dim=1) > REFIT_TOLERANCE * spacing  # (I,)
        if moved.any():
            self._refit(torch.where(moved[:, None], new, self.knots), self.grid_size, moved,
                        uniform=self.grid_kind == "uniform" and (self.has_uniform_knots or bool(moved.all())))

    @torch.no_grad()
    def extend_grid(self, grid_size: int) -> None:
        """Refine (or coarsen) the interior to ``grid_size`` intervals, keeping the function.

        The interior knots are subdivided by interpolating their positions (evenly on a uniform
        grid; keeping the spacing pattern of percentile knots), and the three extension knots on
        each side stay where they are. When ``grid_size`` is a multiple of G every old knot is
        kept, so the new spline space contains the old one on the whole support [t_0, t_{G+6}]
        (the interior and the extension zones, where hidden activations live when grids are not
        updated) and the projection is exact to rounding. Departure from pykan, which refits the
        new grid to samples. The extension knots then keep the old spacing, so a uniform layer
        takes the general-knot path until its next grid update.
        """
        old = self.knots.to(torch.float64)
        interior = old[:, SPLINE_ORDER : SPLINE_ORDER + self.grid_size + 1]  # (I, G+1)
        position = torch.arange(grid_size + 1, device=old.device) * self.grid_size  # new knot i sits at old index i·G/G'
        left = torch.div(position, grid_size, rounding_mode="floor").clamp_max(self.grid_size - 1)
        frac = (position - left * grid_size).to(torch.float64) / grid_size  # exactly 0 at every old knot
        refined = interior[:, left] + (interior[:, left + 1] - interior[:, left]) * frac  # (I, G'+1)
        new = torch.cat([old[:, :SPLINE_ORDER], refined, old[:, -SPLINE_ORDER:]], dim=1)
        self._refit(new.to(self.knots.dtype), grid_size, whole_support=True, uniform=self.has_uniform_knots and grid_size == self.grid_size)

    def _refit(self, new_knots: Tensor, grid_size: int, features: Tensor | None = None, whole_support: bool = False,
               uniform: bool = False) -> None:
        """Least-squares projection of every edge's spline onto the spline space of ``new_knots``.

        Fitted on REFIT_POINTS_PER_INTERVAL points per knot interval of the new grid, so every
        basis function is well sampled whatever the knot spacing (no empty intervals): the
        interior intervals only for a grid update (its new knots are not nested in the old ones,
        and weighting the extension zones too was measured to cost interior accuracy for little
        gain in the tails), all of them with ``whole_support`` (grid extension, whose nested
        knots make the fit exact everywhere). ``features`` (I,) bool limits the refit to those
        input features; the others keep their coefficients bit for bit.
        """
        old_knots = self.knots.to(torch.float64)
        knots = new_knots.to(torch.float64)
        n_basis = grid_size + SPLINE_ORDER
        frac = (torch.arange(REFIT_POINTS_PER_INTERVAL, dtype=torch.float64, device=knots.device) + 0.5) / REFIT_POINTS_PER_INTERVAL
        inner = knots if whole_support else knots[:, SPLINE_ORDER : SPLINE_ORDER + grid_size + 1]  # (I, G'+7) or (I, G'+1)
        points = (inner[:, :-1, None] + (inner[:, 1:] - inner[:, :-1])[..., None] * frac).reshape(self.in_features, -1)  # (I, P)
        old_values = torch.einsum("pim,oim->ipo", cox_de_boor(points.t(), old_knots), self.spline_weight.to(torch.float64))  # (I, P, O)
        design = cox_de_boor(points.t(), knots).permute(1, 0, 2)  # (I, P, G'+3)
        normal = design.transpose(1, 2) @ design  # (I, G'+3, G'+3)
        diff2 = torch.diff(torch.eye(n_basis, dtype=torch.float64, device=knots.device), n=2, dim=0)
        penalty = diff2.t() @ diff2
        scale = normal.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)[:, None, None]
        coef = _solve_symmetric(normal + REFIT_SMOOTHING * scale * penalty, design.transpose(1, 2) @ old_values)  # (I, G'+3, O)
        coef = coef.permute(2, 0, 1).to(self.spline_weight.dtype)  # (O, I, G'+3)
        if features is not None:
            coef = torch.where(features[None, :, None], coef, self.spline_weight)
        if grid_size == self.grid_size:  # in place: optimisers keep tracking the parameter
            self.spline_weight.copy_(coef)
        else:  # a new shape needs a new parameter; the trainer rebuilds its optimiser
            self.spline_weight = nn.Parameter(coef.contiguous())
        self.grid_size = grid_size
        self.set_knots(new_knots, uniform)


def _solve_symmetric(a: Tensor, b: Tensor) -> Tensor:
    """Solve the batch of symmetric systems a x = b (I, n, n) · (I, n, O), by Cholesky.

    Not torch.linalg.solve: its batched LU (MKL getrf, torch 2.14.1 CPU) was measured to print
    "DLASWP parameter 6" errors and never return on a 2-core Intel Xeon for batches of more than
    one system of order ≥ ~100 with 2 threads, i.e. on any grid update of a layer with G ≳ 100.
    A system that is not positive definite (degenerate knots) is solved one matrix at a time,
    which that build handles."""
    factor, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, factor)
    return torch.stack([torch.linalg.solve(m, r) for m, r in zip(a, b)])


def evenly_spaced(knots: Tensor) -> bool:
    """Whether every row of knots (I, G+7) is evenly spaced, to UNIFORM_TOLERANCE of its spacing."""
    steps = knots.to(torch.float64).diff(dim=1)
    return bool(((steps.amax(1) - steps.amin(1)) <= UNIFORM_TOLERANCE * steps.abs().amax(1)).all())


def ridge_directions(count: int) -> Tensor:
    """(2, K) projections of (x, y) onto K evenly spaced directions θ_k = πk/K, each scaled so that
    [-1, 1]² maps onto [-1, 1]: p_k = (x cos θ_k + y sin θ_k) / (|cos θ_k| + |sin θ_k|)."""
    theta = torch.arange(count, dtype=torch.float64) * math.pi / count
    directions = torch.stack([torch.cos(theta), torch.sin(theta)])  # (2, K)
    return (directions / directions.abs().sum(0)).float()


class KAN(nn.Module):
    """A deep KAN: widths [n_0, …, n_L] with one grid size per layer.

    Args:
        widths: layer widths, e.g. [2, 128, 128, 128, 128, 1].
        grids: L grid sizes (one per layer) or one int for all, e.g. [100, 10, 10, 10, 10].
        grid_range: initial interior grid range of every layer.
        grid_kind: "uniform" or "percentile" (see KANLayer).
        directions: K > n_0 feeds the first layer K projections of the 2-D input onto evenly
            spaced directions (:func:`ridge_directions`) instead of x and y alone, so its edge
            functions are ridge functions along K directions rather than only f(x) + g(y).
        encoding: a module mapping the (N, 2) input to (N, E) features that the first layer
            sees instead (E = ``encoding.out_features``), e.g. a multiresolution hash encoding:
            the first layer's edge functions then act on learned 2-D features.
    """

    def __init__(
        self,
        widths: Sequence[int],
        grids: Sequence[int] | int,
        grid_range: Sequence[float] = (-1.0, 1.0),
        grid_kind: str = "uniform",
        directions: int = 0,
        encoding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        grids = [int(grids)] * (len(widths) - 1) if isinstance(grids, int) else [int(g) for g in grids]
        if encoding is not None and directions:
            raise ValueError("a KAN sees either an encoding of its input or ridge directions, not both")
        self.directions = directions if directions > widths[0] else 0
        if self.directions:
            self.register_buffer("projection", ridge_directions(self.directions))  # (2, K)
        self.encoding = encoding
        first = encoding.out_features if encoding is not None else self.directions or widths[0]
        inputs = [first] + widths[1:-1]
        self.layers = nn.ModuleList(
            KANLayer(a, b, g, grid_range, grid_kind) for a, b, g in zip(inputs, widths[1:], grids)
        )

    @property
    def grids(self) -> list[int]:
        return [layer.grid_size for layer in self.layers]

    def lift(self, x: Tensor) -> Tensor:
        """The first layer's inputs: x itself, its K ridge projections (N, K) or its encoding (N, E)."""
        if self.encoding is not None:
            return self.encoding(x)
        if not self.directions:
            return x
        if torch.is_autocast_enabled(x.device.type):  # the coordinates keep full precision
            with torch.autocast(x.device.type, enabled=False):
                return x.to(torch.promote_types(x.dtype, torch.float32)) @ self.projection
        return x @ self.projection

    def forward(self, x: Tensor) -> Tensor:
        x = self.lift(x)
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.no_grad()
    def update_grids(self, x: Tensor) -> None:
        """Refit every layer's grid to the activations that samples x (N, n_0) produce."""
        x = self.lift(x)
        for layer in self.layers:
            layer.update_grid(x)
            x = layer(x)

    @torch.no_grad()
    def extend_grids(self, grids: Sequence[int]) -> None:
        """Change each layer's grid size (e.g. 10 → 20), keeping the represented function."""
        for layer, g in zip(self.layers, grids):
            if g != layer.grid_size:
                layer.extend_grid(int(g))
