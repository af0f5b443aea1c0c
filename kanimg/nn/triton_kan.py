"""Triton kernels for the KAN layer on CUDA: y = F(x) @ W without ever building F in memory.

F(x) = [silu(x) | B_0(x) … B_{G+2}(x)] per input feature, 4 of the G + 3 spline entries
non-zero. Each kernel walks the inputs and builds one input's features as a (rows × 16) tile in
registers (its basis functions, then silu), which tl.dot multiplies with the matching rows of W
(forward), of Wᵀ (dL/dF, then times the basis slopes for dL/dx) or of dL/dy (dL/dW = Fᵀ · dL/dy,
summed over a share of the rows and added once per share). Nothing of size B × I·(G+3) exists
in either pass. The tiles are dense (16 columns for 5 non-zero ones), which tl.dot repays:
float32 ("ieee", FMA units), or TF32 on the tensor cores where PyTorch's float32 matmuls may
use it (--precision tf32).

Both knot kinds of kan.py: uniform grids (closed-form pieces in u = frac((x - lo)/h)) and any
other knots in bspline.padded_knots layout (interval by a fixed-depth binary search, values by
the local de Boor triangle, written out). float32 only; the layer falls back to the PyTorch
path for other dtypes. Under TRITON_INTERPRET=1 these kernels run on CPU tensors, which is how
the test suite checks them against Cox–de Boor without a GPU. The shares' atomic adds make the
summation order of dL/dW vary between runs (within float32 rounding).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 64
BLOCK_FEATURES = 16  # one input's features per tl.dot: its G + 3 basis functions, then silu
WEIGHT_GRAD_PROGRAMS = 1024  # enough programs for dL/dW to fill a large GPU; each adds its share once


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
def _feature_tile(first, inside, silu, b0, b1, b2, b3, j, NB):
    """(rows, len(j)) tile of one input's features: basis function j for j < NB (b_q where
    j = first + q, else 0), silu at j == NB, 0 beyond. With slopes for values it is dF/dx."""
    q = j[None, :] - first[:, None]
    value = tl.where(q == 0, b0[:, None], tl.where(q == 1, b1[:, None], tl.where(q == 2, b2[:, None], b3[:, None])))
    value = tl.where(inside[:, None] & (q >= 0) & (q < 4) & (j < NB)[None, :], value, 0.0)
    return tl.where((j == NB)[None, :], silu[:, None], value)


@triton.jit
def _weight_rows(i, j, I, NB):
    """The row of W that holds feature j of input i (the tile's order: basis functions, then silu)."""
    return tl.where(j < NB, I + i * NB + j, i)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, lo_ptr, inv_h_ptr, knots_ptr, out_ptr, B, I, O, G,
                    UNIFORM: tl.constexpr, SEARCH_STEPS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr):
    """One program per (row block, output block): for each input, its feature tiles built in
    registers and multiplied into the output tile by tl.dot."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # int64: B·O may pass 2³¹
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < B
    col_ok = cols < O
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    NB = G + 3
    for i in range(I):
        x = tl.load(x_ptr + rows * I + i, mask=row_ok, other=0.0)
        first, inside, b0, b1, b2, b3, d0, d1, d2, d3 = _basis(
            x, tl.load(lo_ptr + i), tl.load(inv_h_ptr + i), knots_ptr + i * (G + 13), G, UNIFORM, SEARCH_STEPS, False)
        silu = x * _sigmoid(x)
        for j0 in range(0, NB + 1, BLOCK_F):
            j = j0 + tl.arange(0, BLOCK_F)
            features = _feature_tile(first, inside, silu, b0, b1, b2, b3, j, NB)
            w = tl.load(w_ptr + _weight_rows(i, j, I, NB)[:, None] * O + cols[None, :],
                        mask=(j <= NB)[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(features, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * O + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _input_grad_kernel(x_ptr, w_ptr, lo_ptr, inv_h_ptr, knots_ptr, grad_out_ptr, grad_x_ptr, B, I, O, G,
                       UNIFORM: tl.constexpr, SEARCH_STEPS: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr):
    """One program per (row block, input): dL/dF of the input's features as dL/dy · W rowsᵀ
    (tl.dot), times their slopes, summed into dL/dx."""
    i = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x = tl.load(x_ptr + rows * I + i, mask=row_ok, other=0.0)
    first, inside, b0, b1, b2, b3, d0, d1, d2, d3 = _basis(
        x, tl.load(lo_ptr + i), tl.load(inv_h_ptr + i), knots_ptr + i * (G + 13), G, UNIFORM, SEARCH_STEPS, True)
    sig = _sigmoid(x)
    silu_slope = sig * (1.0 + x * (1.0 - sig))
    NB = G + 3
    grad = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for j0 in range(0, NB + 1, BLOCK_F):
        j = j0 + tl.arange(0, BLOCK_F)
        w_rows = _weight_rows(i, j, I, NB)
        grad_features = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        for o0 in range(0, O, BLOCK_O):
            cols = o0 + tl.arange(0, BLOCK_O)
            col_ok = cols < O
            g = tl.load(grad_out_ptr + rows[:, None] * O + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w_t = tl.load(w_ptr + w_rows[None, :] * O + cols[:, None], mask=col_ok[:, None] & (j <= NB)[None, :], other=0.0)
            grad_features = tl.dot(g, w_t, grad_features, input_precision=PRECISION)
        slopes = _feature_tile(first, inside, silu_slope, d0, d1, d2, d3, j, NB)
        grad += tl.sum(grad_features * slopes, axis=1)
    tl.store(grad_x_ptr + rows * I + i, grad, mask=row_ok)


@triton.jit
def _weight_grad_kernel(x_ptr, lo_ptr, inv_h_ptr, knots_ptr, grad_out_ptr, grad_w_ptr, B, I, O, G, ROWS_PER_PROGRAM,
                        UNIFORM: tl.constexpr, SEARCH_STEPS: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr):
    """One program per (input, feature block, output block, share of the rows): Fᵀ · dL/dy over
    its rows by tl.dot, added into dL/dW once at the end (few atomics: one per share)."""
    i = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    n_col_blocks = tl.cdiv(O, BLOCK_O)
    cols = (tl.program_id(2) % n_col_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    col_ok = cols < O
    row_start = (tl.program_id(2) // n_col_blocks).to(tl.int64) * ROWS_PER_PROGRAM
    NB = G + 3
    lo = tl.load(lo_ptr + i)
    inv_h = tl.load(inv_h_ptr + i)
    acc = tl.zeros((BLOCK_F, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_B):
        rows = row_start + r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x = tl.load(x_ptr + rows * I + i, mask=row_ok, other=0.0)
        first, inside, b0, b1, b2, b3, d0, d1, d2, d3 = _basis(
            x, lo, inv_h, knots_ptr + i * (G + 13), G, UNIFORM, SEARCH_STEPS, False)
        features = _feature_tile(first, inside, x * _sigmoid(x), b0, b1, b2, b3, j, NB)
        g = tl.load(grad_out_ptr + rows[:, None] * O + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(features), g, acc, input_precision=PRECISION)
    tl.atomic_add(grad_w_ptr + _weight_rows(i, j, I, NB)[:, None] * O + cols[None, :], acc,
                  mask=(j <= NB)[:, None] & col_ok[None, :])


def _search_steps(grid_size: int) -> int:
    return max(1, math.ceil(math.log2(grid_size + 6)))


def _knots_arg(x: Tensor, knots: Tensor | None) -> Tensor:
    return x.new_zeros(1) if knots is None else knots.contiguous()


def _precision(precision: str | None) -> str:
    """tl.dot's input precision: as asked, else TF32 where PyTorch's float32 matmuls may use it
    (--precision tf32), else full float32."""
    if precision:
        return precision
    tf32 = torch.backends.cuda.matmul.allow_tf32 and torch.version.hip is None  # ROCm's Triton: TF32 on few chips
    return "tf32" if tf32 else "ieee"


def _output_block(n_out: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n_out)))  # tl.dot needs at least 16


def forward(x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Tensor | None,
            precision: str | None = None) -> Tensor:
    """F(x) @ weight for float32 x (B, I), weight (I + I·(G+3), O); knots None = uniform grid;
    precision "ieee" or "tf32" for tl.dot (None: PyTorch's float32 matmul setting)."""
    x, weight = x.contiguous(), weight.contiguous()  # the kernels index row-major
    batch, n_in = x.shape
    n_out = weight.shape[1]
    out = x.new_empty(batch, n_out)
    block_o = _output_block(n_out)
    if batch == 0 or n_in == 0 or n_out == 0:
        return out.zero_()
    _forward_kernel[(triton.cdiv(batch, BLOCK_ROWS), triton.cdiv(n_out, block_o))](
        x, weight, lo.contiguous(), inv_h.contiguous(), _knots_arg(x, knots), out, batch, n_in, n_out, grid_size,
        UNIFORM=knots is None, SEARCH_STEPS=_search_steps(grid_size), PRECISION=_precision(precision),
        BLOCK_B=BLOCK_ROWS, BLOCK_O=block_o, BLOCK_F=BLOCK_FEATURES)
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Tensor | None,
             need_x: bool = True, need_w: bool = True, precision: str | None = None) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dx, dL/dW) of :func:`forward`; either is None when not asked for."""
    x, weight, grad_out = x.contiguous(), weight.contiguous(), grad_out.contiguous()  # the kernels index row-major
    batch, n_in = x.shape
    n_out = weight.shape[1]
    lo, inv_h, knots_arg = lo.contiguous(), inv_h.contiguous(), _knots_arg(x, knots)
    block_o = _output_block(n_out)
    common = dict(UNIFORM=knots is None, SEARCH_STEPS=_search_steps(grid_size), PRECISION=_precision(precision),
                  BLOCK_B=BLOCK_ROWS, BLOCK_O=block_o, BLOCK_F=BLOCK_FEATURES)
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros_like(weight) if need_w else None
    if batch == 0 or n_in == 0 or n_out == 0:
        return (None if grad_x is None else grad_x.zero_()), grad_w
    if need_x:
        _input_grad_kernel[(triton.cdiv(batch, BLOCK_ROWS), n_in)](
            x, weight, lo, inv_h, knots_arg, grad_out, grad_x, batch, n_in, n_out, grid_size, **common)
    if need_w:
        feature_blocks = triton.cdiv(grid_size + 4, BLOCK_FEATURES)
        col_blocks = triton.cdiv(n_out, block_o)
        row_blocks = triton.cdiv(batch, BLOCK_ROWS)
        shares = max(1, min(row_blocks, triton.cdiv(WEIGHT_GRAD_PROGRAMS, n_in * feature_blocks * col_blocks)))
        rows_per_program = triton.cdiv(row_blocks, shares) * BLOCK_ROWS
        _weight_grad_kernel[(n_in, feature_blocks, col_blocks * triton.cdiv(batch, rows_per_program))](
            x, lo, inv_h, knots_arg, grad_out, grad_w, batch, n_in, n_out, grid_size, rows_per_program, **common)
    return grad_x, grad_w
