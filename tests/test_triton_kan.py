"""The CUDA layer's Triton kernels against Cox–de Boor, run on CPU by Triton's interpreter.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before triton is imported, and the kernels
run on CPU tensors. On a GPU machine (benchmarks/gpu_check.sh) the same checks run compiled,
on CUDA tensors.
"""
import importlib
import os

import pytest
import torch

from kanimg.nn import KAN, KANLayer
from kanimg.nn.bspline import padded_knots, spline_features
from kanimg.nn.packed_spline import fused_path

from test_kan_layer import exact_layer, inputs, rel_err

triton = pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "") in ("", "0")
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def kernels():
    """kanimg.nn.triton_kan: compiled on a GPU, interpreted on CPU (conftest.py turns on
    TRITON_INTERPRET before triton is first imported)."""
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET could be set")
    return importlib.import_module("kanimg.nn.triton_kan")


def kernel_outputs(kernels, layer: KANLayer, x: torch.Tensor, g: torch.Tensor, need_x=True, need_w=True):
    """(y, dL/dx, dL/dW_packed) from the Triton kernels, float32 on DEVICE."""
    lo, inv_h = layer._grid_lo_inv_h()
    knots = None if layer.has_uniform_knots else padded_knots(layer.knots).float().to(DEVICE)
    args = dict(weight=layer.packed_weight().detach().float().to(DEVICE), lo=lo.float().to(DEVICE), inv_h=inv_h.float().to(DEVICE),
                grid_size=layer.grid_size, knots=knots)
    x32 = x.float().to(DEVICE)
    y = kernels.forward(x32, **args)
    grad_x, grad_w = kernels.backward(g.float().to(DEVICE), x32, **args, need_x=need_x, need_w=need_w)
    return y.cpu(), None if grad_x is None else grad_x.cpu(), None if grad_w is None else grad_w.cpu()


def reference_outputs(layer: KANLayer, x: torch.Tensor, g: torch.Tensor):
    """The same three in float64 by Cox–de Boor and autograd (dL/dW as Fᵀ·g of the dense features)."""
    x = x.clone().requires_grad_()
    y = layer.reference_forward(x)
    (grad_x,) = torch.autograd.grad(y, x, g)
    lo, inv_h = layer._grid_lo_inv_h()
    features = spline_features(x.detach(), lo, inv_h, layer.grid_size, None if layer.has_uniform_knots else padded_knots(layer.knots))
    return y.detach(), grad_x, features.t() @ g


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
@pytest.mark.parametrize("grid_size,n_in,n_out", [(1, 3, 5), (2, 1, 1), (7, 5, 37), (50, 3, 33), (200, 3, 2), (13, 2, 70)])
def test_forward_and_gradients_match_cox_de_boor(kernels, grid_size, n_in, n_out, grid_kind):
    """Odd widths, several row and output blocks, inputs inside, in the extension zones and far out."""
    torch.manual_seed(grid_size * 7 + n_out)
    layer = exact_layer(n_in, n_out, grid_size, lo=-0.8, hi=1.2, grid_kind=grid_kind)
    x = inputs(150, n_in)
    g = torch.randn(150, n_out, dtype=torch.float64)
    for got, want in zip(kernel_outputs(kernels, layer, x, g), reference_outputs(layer, x, g)):
        assert rel_err(got.double(), want) < 2e-5


def test_extended_grid_knots_and_nan_inputs(kernels):
    """After a grid extension the knots are not evenly spaced (general path); a NaN input spreads
    to exactly the entries it does on the reference path (its row of y, its dL/dx, its feature's
    SiLU row of dL/dW) and nowhere else."""
    torch.manual_seed(3)
    layer = exact_layer(4, 9, 5, grid_kind="uniform")
    layer.extend_grid(15)
    assert not layer.has_uniform_knots
    x = inputs(100, 4)
    g = torch.randn(100, 9, dtype=torch.float64)
    for got, want in zip(kernel_outputs(kernels, layer, x, g), reference_outputs(layer, x, g)):
        assert rel_err(got.double(), want) < 2e-5
    x[7, 2] = float("nan")
    got, want = kernel_outputs(kernels, layer, x, g), reference_outputs(layer, x, g)
    assert got[0][7].isnan().all() and got[1][7, 2].isnan() and got[2][2].isnan().all()
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())


def test_only_the_asked_gradients_are_computed(kernels):
    torch.manual_seed(4)
    layer = exact_layer(3, 4, 6)
    x, g = inputs(70, 3), torch.randn(70, 4, dtype=torch.float64)
    _, both_x, both_w = kernel_outputs(kernels, layer, x, g)
    _, only_x, none_w = kernel_outputs(kernels, layer, x, g, need_w=False)
    _, none_x, only_w = kernel_outputs(kernels, layer, x, g, need_x=False)
    assert none_w is None and none_x is None
    assert torch.equal(only_x, both_x) and rel_err(only_w, both_w) < 1e-6


@pytest.mark.parametrize("programs", [1, 6, 1024])
def test_the_weight_gradient_however_the_rows_are_shared(kernels, monkeypatch, programs):
    """dL/dW sums Fᵀ·dL/dy over shares of the rows, one program each: 300 rows as one share of
    5 row blocks, 2 shares of 3 and 2 blocks, or 5 shares of one."""
    torch.manual_seed(7)
    layer = exact_layer(3, 6, 9)
    x, g = inputs(300, 3), torch.randn(300, 6, dtype=torch.float64)
    monkeypatch.setattr(kernels, "WEIGHT_GRAD_PROGRAMS", programs)
    _, _, got = kernel_outputs(kernels, layer, x, g, need_x=False)
    assert rel_err(got.double(), reference_outputs(layer, x, g)[2]) < 2e-5


def test_an_empty_batch(kernels):
    layer = exact_layer(2, 5, 4)
    y, grad_x, grad_w = kernel_outputs(kernels, layer, torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.float64))
    assert y.shape == (0, 5) and grad_x.shape == (0, 2) and not grad_w.any()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_the_layer_takes_the_triton_path_on_cuda():
    """On CUDA a float32 KAN runs the Triton kernels; they agree with the PyTorch path."""
    from unittest import mock

    torch.manual_seed(5)
    kan = KAN([2, 32, 32, 3], [40, 8, 8], directions=8).cuda()
    x = torch.rand(10_000, 2, device="cuda") * 2 - 1
    assert fused_path("cuda", torch.float32)  # the kernels' one-time self-test runs here, not under the spy
    with mock.patch("kanimg.nn.triton_kan.forward", wraps=importlib.import_module("kanimg.nn.triton_kan").forward) as spy:
        fast = kan(x)
    assert spy.call_count == 3
    with mock.patch.dict(os.environ, {"KANIMG_NO_KERNEL": "1"}):
        slow = kan(x)
    assert rel_err(fast, slow) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_a_compiled_kan_on_cuda_keeps_the_triton_kernel_and_eager_numbers():
    torch.manual_seed(6)
    kan = KAN([2, 32, 32, 3], [40, 8, 8], grid_kind="percentile", directions=8).cuda()
    x = torch.rand(5000, 2, device="cuda") * 2 - 1
    kan.update_grids(x)
    eager = kan(x)
    eager.square().mean().backward()
    grads = [p.grad.clone() for p in kan.parameters()]
    kan.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(kan, fullgraph=True)(x)
    compiled.square().mean().backward()
    assert rel_err(compiled, eager) < 1e-5
    for p, g in zip(kan.parameters(), grads):
        assert rel_err(p.grad, g) < 1e-4


def test_the_self_test_passes_the_kernels_and_catches_a_wrong_one(kernels, monkeypatch):
    """Before the layer uses the Triton kernels on a GPU it runs them once against the PyTorch
    path; a kernel that computes something else is refused (the layer then keeps the PyTorch path)."""
    from kanimg.nn.packed_spline import self_test

    self_test(kernels, DEVICE)
    real = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *args, **kwargs: real(*args, **kwargs) * 1.001)
    with pytest.raises(RuntimeError, match="self-test mismatch"):
        self_test(kernels, DEVICE)
