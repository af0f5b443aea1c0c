"""torch.compile of every registered model: one graph (no breaks), the same numbers as eager,
and KAN grid changes that recompile at most once each; the fused kernels' custom ops."""
import subprocess
import sys
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

from kanimg.models import build_model, model_names
from kanimg.nn import KAN, KANLayer
from kanimg.nn.bspline import padded_knots
from kanimg.nn.packed_spline import fused_path

SMALL = {  # small specs of every family, so tracing is quick
    "kan": {"widths": [2, 12, 3], "grids": [8, 5], "levels": 4, "log2_table_size": 8, "finest_resolution": 64},
    "kan-ridge": {"widths": [2, 12, 12, 3], "grids": [16, 5, 5]},
    "siren": {"widths": [2, 16, 16, 3]},
    "mlp": {"widths": [2, 16, 16, 3]},
    "rff": {"widths": [2, 16, 16, 3], "num_features": 8},
    "hashgrid": {"widths": [2, 16, 3], "levels": 4, "log2_table_size": 8, "finest_resolution": 64},
}


def kernel_paths():
    """The fused C++ kernel (when built) and the PyTorch path, chosen by KANIMG_NO_KERNEL."""
    yield "torch", {"KANIMG_NO_KERNEL": "1"}
    if fused_path("cpu", torch.float32):
        yield "kernel", {"KANIMG_NO_KERNEL": "0"}


def forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.pow(2).mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def close(a, b, tol=1e-5):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < tol


def test_every_family_has_a_small_spec_here():
    assert set(model_names(variants=False)) | {"kan-ridge"} == set(SMALL)


@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_compiles_to_one_graph_with_eager_numbers(name, path):
    env = dict(kernel_paths()).get(path)
    if env is None or (path == "kernel" and name not in ("kan", "kan-ridge", "hashgrid")):
        pytest.skip("fused kernel not built here" if env is None else "the kernel paths are the KAN layer's and the hash encoding's")
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name])
    x = torch.rand(300, 2) * 2 - 1
    torch._dynamo.reset()
    with mock.patch.dict("os.environ", env):
        eager = forward_backward(model, x)
        compiled = forward_backward(torch.compile(model, fullgraph=True, backend="aot_eager"), x)  # fullgraph: a break is an error
    assert close(compiled[0], eager[0])
    for g, g_eager in zip(compiled[1], eager[1]):
        assert close(g, g_eager)


@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_grid_updates_and_extensions_recompile_at_most_once_each(path):
    env = dict(kernel_paths()).get(path)
    if env is None:
        pytest.skip("fused kernel not built here")
    torch.manual_seed(1)
    kan = KAN([2, 8, 8, 3], [10, 4, 4], grid_kind="percentile", directions=4)
    compiled = torch.compile(kan, fullgraph=True, backend="aot_eager")
    x = torch.rand(400, 2) * 2 - 1
    torch._dynamo.reset()
    counters.clear()

    def graphs_after(change) -> int:
        change()
        with mock.patch.dict("os.environ", env):
            forward_backward(compiled, x)
            assert close(compiled(x), kan(x))
        return counters["stats"]["unique_graphs"]

    assert graphs_after(lambda: None) == 1
    assert graphs_after(lambda: kan.update_grids(x)) == 2  # uniform → percentile knots: one new graph
    assert graphs_after(lambda: kan.update_grids(x * 0.9)) == 2  # new knot values only: none
    assert graphs_after(lambda: kan.extend_grids([20, 8, 8])) == 3  # new shapes: one
    assert graphs_after(lambda: kan.update_grids(x * 0.8)) == 3


def test_inductor_compiles_a_kan_to_eager_numbers():
    """The real backend once (C++ kernel path where built, else PyTorch), forward and backward."""
    torch.manual_seed(2)
    kan = KAN([2, 8, 3], [6, 4], directions=4)
    x = torch.rand(256, 2) * 2 - 1
    torch._dynamo.reset()
    eager = forward_backward(kan, x)
    compiled = forward_backward(torch.compile(kan, fullgraph=True), x)
    assert close(compiled[0], eager[0])
    for g, g_eager in zip(compiled[1], eager[1]):
        assert close(g, g_eager)


@pytest.mark.parametrize("uniform", [True, False])
def test_the_fused_kernel_op_passes_opcheck(uniform):
    """Schema, fake tensors (shapes for the compiler) and autograd registration of the custom
    ops that wrap the C++ kernel, by torch.library.opcheck."""
    if not fused_path("cpu", torch.float32):
        pytest.skip("fused kernel not built here")
    torch.manual_seed(3)
    layer = KANLayer(3, 5, 6)
    if not uniform:
        layer.update_grid(torch.randn(300, 3))
    lo, inv_h = layer._grid_lo_inv_h()
    knots = None if layer.has_uniform_knots else padded_knots(layer.knots)
    x = torch.randn(50, 3, requires_grad=True)
    w = layer.packed_weight().detach().requires_grad_()
    torch.library.opcheck(torch.ops.kanimg.packed_spline.default, (x, w, lo, inv_h, knots, 6))
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.kanimg.packed_spline_backward.default,
                              (torch.randn(50, 5), x.detach(), w.detach(), lo, inv_h, knots, 6, need_x, need_w))


def test_fused_path_carries_what_the_compilers_constant_mark_sets():
    """packed_spline sets the mark by hand (torch.compiler.assume_constant_result would import
    torch._dynamo at every start); if torch changes how the mark is made, this fails."""
    def probe():
        return True

    mark = vars(torch.compiler.assume_constant_result(probe))
    assert mark and all(getattr(fused_path, key, None) == value for key, value in mark.items())


def test_the_command_starts_without_the_compiler_or_the_optimiser():
    """`kanimg decode` pays for every import at start: torch._dynamo and scipy.optimize were
    over half of it and neither is needed until a model is compiled or a file encoded."""
    code = "import sys, kanimg.cli, kanimg.compress.api; print(sorted(m for m in ('torch._dynamo', 'scipy.optimize') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
