"""Triton kernels for the KAN layer on CUDA: y = F(x) @ W without ever building F.

F(x) = [silu(x_i) | B_0(x_i) … B_{G+2}(x_i)] has 4 non-zero spline entries in G + 3 per input
feature, so the forward program of a (rows × outputs) tile walks the inputs and, for each,
adds silu(x)·W[i] and the four B_q(x)·W[row of B_q] — gathered weight rows instead of a dense
feature matrix. The backward computes dL/dx the same way (with the basis slopes) and adds
B_q(x)·dL/dy into dL/dW with atomics, so nothing of size B × I·(G+3) exists in either pass.

Both knot kinds of kan.py: uniform grids (closed-form pieces in u = frac((x - lo)/h)) and any
other knots in bspline.padded_knots layout (interval by a fixed-depth binary search, values by
the local de Boor triangle, written out). float32 only; the layer falls back to the PyTorch
path for other dtypes. Under TRITON_INTERPRET=1 these kernels run on CPU tensors, which is how
the test suite checks them against Cox–de Boor without a GPU. Weight-gradient atomics make the
summation order of dL/dW vary between runs (within float32 rounding).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 64
BLOCK_OUTPUTS = 32


@triton.jit
def _safe_div(num, den):
    ok = den != 0
    return tl.where(ok, num / tl.where(ok, den, 1.0), 0.0)


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x) without overflow for large |x|."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _basis(x, lo, inv_h, knots_row, G, UNIFORM: tl.constexpr, SEARCH_STEPS: tl.constexpr, SLOPES: tl.constexpr):
    """(first index, inside, b0..b3, d0..d3) of the four cubic B-splines that can be non-zero at x.

    Uniform: lo, inv_h give the grid. Otherwise ``knots_row`` points at this feature's G + 13
    padded knots (the G + 7 real ones start at offset 3)."""
    if UNIFORM:
        s = (x - lo) * inv_h
        inside = (s >= -3.0) & (s < G + 3.0)
        s = tl.where(inside, s, 0.0)
        first_f = tl.floor(s)
        u = s - first_f
        first = first_f.to(tl.int32)
        u2 = u * u
        u3 = u2 * u
        v = 1.0 - u
        b0 = v * v * v / 6.0
        b1 = (3.0 * u3 - 6.0 * u2 + 4.0) / 6.0
        b2 = (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0) / 6.0
        b3 = u3 / 6.0
        if SLOPES:
            d0 = -v * v / 2.0 * inv_h
            d1 = (1.5 * u2 - 2.0 * u) * inv_h
            d2 = (-1.5 * u2 + u + 0.5) * inv_h
            d3 = u2 / 2.0 * inv_h
        else:
            d0 = b0
            d1 = b0
            d2 = b0
            d3 = b0
    else:
        real = knots_row + 3  # real knots t_0 … t_{G+6}
        n = G + 7
        inside = (x >= tl.load(real)) & (x < tl.load(real + n - 1))
        low = tl.zeros(x.shape, dtype=tl.int32)
        high = tl.zeros(x.shape, dtype=tl.int32) + (n - 1)
        for _ in tl.static_range(SEARCH_STEPS):  # invariant t[low] <= x < t[high]
            mid = (low + high) // 2
            t_mid = tl.load(real + mid)
            active = high - low > 1
            low = tl.where(active & (t_mid <= x), mid, low)
            high = tl.where(active & (t_mid > x), mid, high)
        k = tl.where(inside, low, 3)
        t_m2 = tl.load(real + k - 2)
        t_m1 = tl.load(real + k - 1)
        t_0 = tl.load(real + k)
        t_1 = tl.load(real + k + 1)
        t_2 = tl.load(real + k + 2)
        t_3 = tl.load(real + k + 3)
        xs = tl.where(inside, x, t_0)
        l1 = xs - t_0
        l2 = xs - t_m1
        l3 = xs - t_m2
        r1 = t_1 - xs
        r2 = t_2 - xs
        r3 = t_3 - xs
        # degree 1
        temp = _safe_div(tl.full(x.shape, 1.0, tl.float32), r1 + l1)
        a0 = r1 * temp
        a1 = l1 * temp
        # degree 2
        temp = _safe_div(a0, r1 + l2)
        q0 = r1 * temp
        saved = l2 * temp
        temp = _safe_div(a1, r2 + l1)
        q1 = saved + r2 * temp
        q2 = l1 * temp
        # degree 3
        temp = _safe_div(q0, r1 + l3)
        b0 = r1 * temp
        saved = l3 * temp
        temp = _safe_div(q1, r2 + l2)
        b1 = saved + r2 * temp
        saved = l2 * temp
        temp = _safe_div(q2, r3 + l1)
        b2 = saved + r3 * temp
        b3 = l1 * temp
        if SLOPES:  # dB_{m,3}/dx = 3 (B_{m,2}/(t_{m+3} - t_m) - B_{m+1,2}/(t_{m+4} - t_{m+1}))
            e0 = _safe_div(q0, t_1 - t_m2)
            e1 = _safe_div(q1, t_2 - t_m1)
            e2 = _safe_div(q2, t_3 - t_0)
            d0 = -3.0 * e0
            d1 = 3.0 * (e0 - e1)
            d2 = 3.0 * (e1 - e2)
            d3 = 3.0 * e2
        else:
            d0 = b0
            d1 = b0
            d2 = b0
            d3 = b0
        first = k - 3
    return first, inside, b0, b1, b2, b3, d0, d1, d2, d3


@triton.jit
def _spline_term(w_ptr, base, first, q, value, ok, n_basis, cols, col_ok, O):
    """value · W[row of basis function first + q] for each row of the tile (0 where it does not exist)."""
    m = first + q
    ok = ok & (m >= 0) & (m < n_basis)
    w = tl.load(w_ptr + (base + m)[:, None] * O + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    return value[:, None] * w


@triton.jit
def _spline_grad(w_ptr, grad_w_ptr, g, base, first, q, value, slope, ok, n_basis, cols, col_ok, O,
                 NEED_X: tl.constexpr, NEED_W: tl.constexpr):
    """Adds value · dL/dy into dL/dW's row of basis function first + q; returns slope · (dL/dy · W row)."""
    m = first + q
    ok = ok & (m >= 0) & (m < n_basis)
    where = (base + m)[:, None] * O + cols[None, :]
    tile_ok = ok[:, None] & col_ok[None, :]
    if NEED_W:
        tl.atomic_add(grad_w_ptr + where, value[:, None] * g, mask=tile_ok)
    result = tl.zeros(value.shape, dtype=tl.float32)
    if NEED_X:
        result = slope * tl.sum(g * tl.load(w_ptr + where, mask=tile_ok, other=0.0), axis=1)
    return result


@triton.jit
def _forward_kernel(x_ptr, w_ptr, lo_ptr, inv_h_ptr, knots_ptr, out_ptr, B, I, O, G,
                    UNIFORM: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # int64: B·O may pass 2³¹
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < B
    col_ok = cols < O
    tile_ok = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    n_basis = G + 3
    for i in range(I):
        x = tl.load(x_ptr + rows * I + i, mask=row_ok, other=0.0)
        silu = x * _sigmoid(x)
        acc += silu[:, None] * tl.load(w_ptr + i * O + cols, mask=col_ok, other=0.0)[None, :]
        first, inside, b0, b1, b2, b3, d0, d1, d2, d3 = _basis(
            x, tl.load(lo_ptr + i), tl.load(inv_h_ptr + i), knots_ptr + i * (G + 13), G, UNIFORM, SEARCH_STEPS, False)
        base = I + i * n_basis
        acc += _spline_term(w_ptr, base, first, 0, b0, inside & row_ok, n_basis, cols, col_ok, O)
        acc += _spline_term(w_ptr, base, first, 1, b1, inside & row_ok, n_basis, cols, col_ok, O)
        acc += _spline_term(w_ptr, base, first, 2, b2, inside & row_ok, n_basis, cols, col_ok, O)
        acc += _spline_term(w_ptr, base, first, 3, b3, inside & row_ok, n_basis, cols, col_ok, O)
    tl.store(out_ptr + rows[:, None] * O + cols[None, :], acc, mask=tile_ok)


@triton.jit
def _backward_kernel(x_ptr, w_ptr, lo_ptr, inv_h_ptr, knots_ptr, grad_out_ptr, grad_x_ptr, grad_w_ptr, B, I, O, G,
                     UNIFORM: tl.constexpr, SEARCH_STEPS: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):
    """One program per (row block, input feature): dL/dx of that column, and its rows of dL/dW."""
    i = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x = tl.load(x_ptr + rows * I + i, mask=row_ok, other=0.0)
    sig = _sigmoid(x)
    silu = x * sig
    first, inside, b0, b1, b2, b3, d0, d1, d2, d3 = _basis(
        x, tl.load(lo_ptr + i), tl.load(inv_h_ptr + i), knots_ptr + i * (G + 13), G, UNIFORM, SEARCH_STEPS, NEED_X)
    n_basis = G + 3
    base = I + i * n_basis
    grad_silu = tl.zeros((BLOCK_B,), dtype=tl.float32)
    grad_spline = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for start in range(0, O, BLOCK_O):
        cols = start + tl.arange(0, BLOCK_O)
        col_ok = cols < O
        g = tl.load(grad_out_ptr + rows[:, None] * O + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if NEED_X:
            grad_silu += tl.sum(g * tl.load(w_ptr + i * O + cols, mask=col_ok, other=0.0)[None, :], axis=1)
        if NEED_W:
            tl.atomic_add(grad_w_ptr + i * O + cols, tl.sum(g * silu[:, None], axis=0), mask=col_ok)
        ok = inside & row_ok
        grad_spline += _spline_grad(w_ptr, grad_w_ptr, g, base, first, 0, b0, d0, ok, n_basis, cols, col_ok, O, NEED_X, NEED_W)
        grad_spline += _spline_grad(w_ptr, grad_w_ptr, g, base, first, 1, b1, d1, ok, n_basis, cols, col_ok, O, NEED_X, NEED_W)
        grad_spline += _spline_grad(w_ptr, grad_w_ptr, g, base, first, 2, b2, d2, ok, n_basis, cols, col_ok, O, NEED_X, NEED_W)
        grad_spline += _spline_grad(w_ptr, grad_w_ptr, g, base, first, 3, b3, d3, ok, n_basis, cols, col_ok, O, NEED_X, NEED_W)
    if NEED_X:
        grad = grad_silu * sig * (1.0 + x * (1.0 - sig)) + tl.where(inside, grad_spline, 0.0)
        tl.store(grad_x_ptr + rows * I + i, grad, mask=row_ok)


def _search_steps(grid_size: int) -> int:
    return max(1, math.ceil(math.log2(grid_size + 6)))


def _knots_arg(x: Tensor, knots: Tensor | None) -> Tensor:
    return x.new_zeros(1) if knots is None else knots.contiguous()


def forward(x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Tensor | None) -> Tensor:
    """F(x) @ weight for float32 x (B, I), weight (I + I·(G+3), O); knots None = uniform grid."""
    x, weight = x.contiguous(), weight.contiguous()  # the kernels index row-major
    batch, n_in = x.shape
    n_out = weight.shape[1]
    out = x.new_empty(batch, n_out)
    grid = (triton.cdiv(batch, BLOCK_ROWS), triton.cdiv(n_out, BLOCK_OUTPUTS))
    _forward_kernel[grid](x.contiguous(), weight.contiguous(), lo.contiguous(), inv_h.contiguous(), _knots_arg(x, knots), out,
                          batch, n_in, n_out, grid_size, UNIFORM=knots is None, SEARCH_STEPS=_search_steps(grid_size),
                          BLOCK_B=BLOCK_ROWS, BLOCK_O=BLOCK_OUTPUTS)
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Tensor | None,
             need_x: bool = True, need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dx, dL/dW) of :func:`forward`; either is None when not asked for."""
    x, weight = x.contiguous(), weight.contiguous()  # the kernels index row-major; so do the gradients made here
    batch, n_in = x.shape
    grad_x = torch.empty_like(x) if need_x else x.new_empty(1)
    grad_w = torch.zeros_like(weight) if need_w else x.new_empty(1)
    if need_x or need_w:
        _backward_kernel[(triton.cdiv(batch, BLOCK_ROWS), n_in)](
            x.contiguous(), weight.contiguous(), lo.contiguous(), inv_h.contiguous(), _knots_arg(x, knots), grad_out.contiguous(),
            grad_x, grad_w, batch, n_in, weight.shape[1], grid_size, UNIFORM=knots is None,
            SEARCH_STEPS=_search_steps(grid_size), NEED_X=need_x, NEED_W=need_w, BLOCK_B=BLOCK_ROWS, BLOCK_O=BLOCK_OUTPUTS)
    return (grad_x if need_x else None), (grad_w if need_w else None)
