"""y = F(x) @ W, the one matmul of a KAN layer, on the fastest path the device has.

F(x) = [silu(x) | local cubic B-spline basis] (bspline.py). Three paths compute it:

- CPU: the fused C++ kernel (kernel.py), when a compiler built it;
- CUDA: the Triton kernels (triton_kan.py), float32;
- anywhere else (other dtypes or devices, no compiler, KANIMG_NO_KERNEL=1): PyTorch ops.

The two fused paths are one torch custom op, ``kanimg::packed_spline`` with its backward
``kanimg::packed_spline_backward``, so ``torch.compile`` sees one opaque node per layer instead
of tracing into pybind calls (no graph break), and Inductor compiles everything around it.
The PyTorch path is an autograd Function that Dynamo traces, so compiling it fuses its ops.
Every path saves only x (and the parameter-sized W) for backward and recomputes the features
there. Double backward (create_graph=True, e.g. d²y/dx² for PINN losses) always runs on
differentiable PyTorch ops.
"""
import functools
import os
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from .bspline import padded_knots, spline_features, spline_features_input_grad
from .kernel import cpu_kernel

# Layers with at most this many outputs use the C++ kernel's narrow path (no materialised F).
NARROW_OUTPUTS = 8
# The C++ path handles a batch in row blocks whose feature matrix stays under this many
# elements, so the transient F never exceeds ~32 MB whatever the batch (a whole 512×512
# image is one batch) and its buffer can be reused instead of reallocated.
BLOCK_ELEMENTS = 1 << 23


def packed_spline(x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Optional[Tensor]) -> Tensor:
    """F(x) @ weight for x (B, I), weight (I + I·(G+3), O); ``knots`` None means a uniform grid
    given by lo and inv_h (I,), else knots in bspline.padded_knots layout."""
    if fused_path(x.device.type, x.dtype):
        return torch.ops.kanimg.packed_spline(x, weight, lo, inv_h, knots, grid_size)
    return _TorchPackedSpline.apply(x, weight, lo, inv_h, grid_size, knots)


def fused_path(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a fused kernel serves this device and dtype (a constant for torch.compile)."""
    if os.environ.get("KANIMG_NO_KERNEL", "") not in ("", "0"):
        return False
    if device_type == "cpu":
        return dtype in (torch.float32, torch.float64) and cpu_kernel() is not None
    if device_type == "cuda":
        return dtype == torch.float32 and _triton() is not None
    return False


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (over a
# second of every start of the `kanimg` command): the compiler calls fused_path once while
# tracing and keeps its answer, so the KAN layer stays one graph (tests/test_compile.py).
fused_path._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.cache
def _triton():
    """The Triton kernels module, or None where Triton is missing or its kernels fail their
    self-test on this GPU (then the PyTorch path runs, with a warning)."""
    try:
        from . import triton_kan

        self_test(triton_kan, "cuda")
    except Exception as exc:  # ImportError, a compile error, a wrong result: all mean the PyTorch path
        if not isinstance(exc, ImportError):
            warnings.warn(f"kanimg: Triton KAN kernels unavailable ({str(exc).splitlines()[0][:200]}); using the PyTorch path")
        return None
    return triton_kan


def self_test(kernels, device: str) -> None:
    """Run the kernels once on a small layer of each knot kind against the PyTorch path; raise
    on any difference beyond float32 rounding. Kernels that were never compiled on this GPU
    model must not silently train a wrong network."""
    generator = torch.Generator().manual_seed(0)
    for uniform in (True, False):
        n_in, n_out, grid = 3, 5, 6
        x = (torch.rand(67, n_in, generator=generator) * 3 - 1.5).to(device)
        weight = torch.randn(n_in * (grid + 4), n_out, generator=generator).to(device)
        lo, inv_h = torch.full((n_in,), -1.0, device=device), torch.full((n_in,), grid / 2.0, device=device)
        knots = None
        if not uniform:
            steps = torch.rand(n_in, grid + 6, generator=generator) + 0.3
            knots = padded_knots((torch.cat([torch.zeros(n_in, 1), steps.cumsum(1)], 1) - 4.0) / 2).to(device)
        grad_out = torch.randn(67, n_out, generator=generator).to(device)
        with torch.autocast(torch.device(device).type, enabled=False):
            # full float32 whatever the user's TF32 setting: TF32 rounding is not what is tested
            got = (kernels.forward(x, weight, lo, inv_h, grid, knots, precision="ieee"),
                   *kernels.backward(grad_out, x, weight, lo, inv_h, grid, knots, precision="ieee"))
            # the reference in float64, so TF32 matmuls (a user's setting, or --precision tf32) cannot fail it
            x64, w64, lo64, inv_h64, g64 = (t.double() for t in (x, weight, lo, inv_h, grad_out))
            knots64 = None if knots is None else knots.double()
            want = (spline_features(x64, lo64, inv_h64, grid, knots64) @ w64,
                    *_torch_backward(g64, x64, w64, lo64, inv_h64, grid, knots64, True, True))
        for a, b in zip((t.double() for t in got), want):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())):
                raise RuntimeError(f"self-test mismatch ({'uniform' if uniform else 'general'} knots): "
                                   f"max difference {float((a - b).abs().max()):.3g}")


# ---------------------------------------------------------------------------- the PyTorch path
class _TorchPackedSpline(torch.autograd.Function):
    """PyTorch ops, saving only x (and W) for backward; differentiable backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight, lo, inv_h, knots)
        ctx.grid_size = grid_size
        return spline_features(x, lo, inv_h, grid_size, knots) @ weight

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lo, inv_h, knots = ctx.saved_tensors
        grad_x, grad_w = _torch_backward(grad_out, x, weight, lo, inv_h, ctx.grid_size, knots, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None, None, None


def _torch_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int,
                    knots: Optional[Tensor], need_x: bool, need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    grad_x = grad_w = None
    if need_w:  # features recomputed, never stored
        grad_w = spline_features(x, lo, inv_h, grid_size, knots).transpose(0, 1) @ grad_out  # (K, O)
    if need_x:
        grad_x = spline_features_input_grad(x, grad_out @ weight.transpose(0, 1), lo, inv_h, grid_size, knots)
    return grad_x, grad_w


# ---------------------------------------------------------------------------- the fused kernels
@torch.library.custom_op("kanimg::packed_spline", mutates_args=())
def _fused_forward(x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, knots: Optional[Tensor], grid_size: int) -> Tensor:
    if x.device.type == "cuda":
        return _triton().forward(x, weight, lo, inv_h, grid_size, knots)
    return _cpu_forward(cpu_kernel(), x, weight, lo, inv_h, grid_size, knots)


@_fused_forward.register_fake
def _(x, weight, lo, inv_h, knots, grid_size):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("kanimg::packed_spline_backward", mutates_args=())
def _fused_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, knots: Optional[Tensor],
                    grid_size: int, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """(dL/dx, dL/dW); an empty tensor stands for one that was not asked for."""
    if x.device.type == "cuda":
        grad_x, grad_w = _triton().backward(grad_out, x, weight, lo, inv_h, grid_size, knots, need_x, need_w)
    else:
        grad_x, grad_w = _cpu_backward(cpu_kernel(), grad_out, x, weight, lo, inv_h, grid_size, knots, need_x, need_w)
    return (x.new_empty(0) if grad_x is None else grad_x), (x.new_empty(0) if grad_w is None else grad_w)


@_fused_backward.register_fake
def _(grad_out, x, weight, lo, inv_h, knots, grid_size, need_x, need_w):
    return x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, lo, inv_h, knots, grid_size = inputs
    ctx.save_for_backward(x, weight, lo, inv_h, knots)
    ctx.grid_size = grid_size


def _fused_autograd(ctx, grad_out: Tensor):
    x, weight, lo, inv_h, knots = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops, so higher derivatives exist
        grad_x, grad_w = _torch_backward(grad_out, x, weight, lo, inv_h, ctx.grid_size, knots, need_x, need_w)
    else:
        grad_x, grad_w = torch.ops.kanimg.packed_spline_backward(grad_out, x, weight, lo, inv_h, knots, ctx.grid_size, need_x, need_w)
        grad_x, grad_w = (grad_x if need_x else None), (grad_w if need_w else None)
    return grad_x, grad_w, None, None, None, None


_fused_forward.register_autograd(_fused_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------- the C++ kernel's driver
class _Workspace(threading.local):
    """Per-thread scratch buffers for the C++ path, grown on demand and reused."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < rows * cols:
            buf = self.buffers[(name, dtype)] = torch.empty(rows * cols, dtype=dtype)
        return buf[: rows * cols].view(rows, cols)


_workspace = _Workspace()
_NO_KNOTS = torch.empty(0)  # tells the kernel: uniform grid, use lo and inv_h


def _row_blocks(batch: int, n_features: int) -> list[slice]:
    rows = max(256, BLOCK_ELEMENTS // n_features)
    return [slice(s, min(s + rows, batch)) for s in range(0, batch, rows)]


def _cpu_forward(kernel, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int, knots: Optional[Tensor]) -> Tensor:
    x, weight, lo, inv_h = x.contiguous(), weight.contiguous(), lo.contiguous(), inv_h.contiguous()
    knots = _NO_KNOTS if knots is None else knots.contiguous()
    sig = torch.sigmoid(x)
    if weight.shape[1] <= NARROW_OUTPUTS:
        return kernel.narrow_forward(x, sig, weight, lo, inv_h, knots, grid_size)
    out = x.new_empty(x.shape[0], weight.shape[1])
    for rows in _row_blocks(x.shape[0], weight.shape[0]):
        feats = _workspace.get("features", rows.stop - rows.start, weight.shape[0], x.dtype)  # (b, K)
        kernel.features(x[rows], sig[rows], lo, inv_h, knots, grid_size, feats)
        torch.mm(feats, weight, out=out[rows])
    return out


def _cpu_backward(kernel, grad_out: Tensor, x: Tensor, weight: Tensor, lo: Tensor, inv_h: Tensor, grid_size: int,
                  knots: Optional[Tensor], need_x: bool, need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    x, weight, lo, inv_h = x.contiguous(), weight.contiguous(), lo.contiguous(), inv_h.contiguous()
    knots = _NO_KNOTS if knots is None else knots.contiguous()
    grad_out = grad_out.contiguous()
    sig = torch.sigmoid(x)
    if weight.shape[1] <= NARROW_OUTPUTS:
        grad_x, grad_w = kernel.narrow_backward(x, sig, grad_out, weight, lo, inv_h, knots, grid_size, need_x, need_w)
        return (grad_x if need_x else None), (grad_w if need_w else None)
    n_features = weight.shape[0]
    grad_w = x.new_zeros(weight.shape) if need_w else None
    grad_x = torch.empty_like(x) if need_x else None
    for rows in _row_blocks(x.shape[0], n_features):
        n = rows.stop - rows.start
        if need_w:
            feats = _workspace.get("features", n, n_features, x.dtype)  # (b, K) recomputed, never stored
            kernel.features(x[rows], sig[rows], lo, inv_h, knots, grid_size, feats)
            grad_w.addmm_(feats.transpose(0, 1), grad_out[rows])  # (K, O)
        if need_x:
            grad_feats = torch.mm(grad_out[rows], weight.transpose(0, 1), out=_workspace.get("grad_features", n, n_features, x.dtype))
            kernel.input_grad(x[rows], sig[rows], grad_feats, lo, inv_h, knots, grid_size, grad_x[rows])
    return grad_x, grad_w
