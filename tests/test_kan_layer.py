"""The fast KAN layer against its Cox–de Boor + autograd reference, and its grid operations."""
import copy
from unittest import mock

import pytest
import torch

from kanimg.nn import KAN, KANLayer
from kanimg.nn.bspline import padded_knots, spline_features, spline_features_input_grad, uniform_knots
from kanimg.nn.kan import evenly_spaced
from kanimg.nn.kernel import cpu_kernel


def random_knots(n_in, grid_size, lo, hi, dtype=torch.float64) -> torch.Tensor:
    """Non-uniform knots (I, G+7) on [lo, hi]: intervals between 0.2 and 1.2 units, shuffled."""
    widths = torch.rand(n_in, grid_size + 6, dtype=dtype) + 0.2
    inner = widths[:, 3:-3].sum(1, keepdim=True)
    steps = torch.cat([torch.zeros(n_in, 1, dtype=dtype), widths.cumsum(1)], dim=1)
    return lo + (steps - steps[:, 3:4]) * (hi - lo) / inner


def exact_layer(n_in, n_out, grid_size, lo=-1.0, hi=1.0, dtype=torch.float64, grid_kind="uniform") -> KANLayer:
    """A layer with random weights whose knots are exactly uniform (or random, for percentile) in ``dtype``."""
    layer = KANLayer(n_in, n_out, grid_size, grid_kind=grid_kind).to(dtype)
    if grid_kind == "uniform":
        layer.set_knots(uniform_knots(torch.full((n_in,), lo, dtype=dtype), torch.full((n_in,), hi, dtype=dtype), grid_size), uniform=True)
    else:
        layer.set_knots(random_knots(n_in, grid_size, lo, hi, dtype), uniform=False)
    with torch.no_grad():
        layer.spline_weight.normal_()
        layer.base_weight.normal_()
        layer.spline_scale.uniform_(0.5, 1.5)
    return layer


def inputs(n, n_in, dtype=torch.float64, span=3.0):
    """Points inside the grid, in the extension zones and far outside."""
    x = torch.rand(n, n_in, dtype=dtype) * 2 * span - span
    x[:5] = torch.tensor([1e6, -1e6, 0.0, 1.0, -1.0], dtype=dtype)[:, None]
    return x


def grads(fn, layer, x, g):
    x = x.clone().requires_grad_()
    y = fn(x)
    params = [x, layer.spline_weight, layer.base_weight, layer.spline_scale]
    return (y, *torch.autograd.grad(y, params, g))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def paths():
    """The fused kernel (when built) and the pure-PyTorch path (CUDA's) are both tested."""
    yield "torch", mock.patch("kanimg.nn.packed_spline.cpu_kernel", lambda: None)
    if cpu_kernel() is not None:
        yield "kernel", mock.patch("kanimg.nn.packed_spline.cpu_kernel", cpu_kernel)


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("grid_size,n_in,n_out", [(1, 3, 5), (3, 7, 1), (10, 5, 3), (10, 9, 17), (100, 2, 11), (200, 3, 2)])
def test_forward_and_gradients_match_reference(path, grid_size, n_in, n_out, grid_kind):
    patches = dict(paths())
    if path not in patches:
        pytest.skip("fused kernel not built here")
    torch.manual_seed(grid_size * 31 + n_out)
    layer = exact_layer(n_in, n_out, grid_size, lo=-0.8, hi=1.2, grid_kind=grid_kind)
    x = inputs(300, n_in)
    g = torch.randn(300, n_out, dtype=torch.float64)
    with patches[path]:
        fast = grads(layer, layer, x, g)
    ref = grads(layer.reference_forward, layer, x, g)
    for a, b in zip(fast, ref):
        assert rel_err(a, b) < 1e-10
    # float32: within 1e-5 of the float64 reference, relative to each tensor's scale
    layer32 = exact_layer(n_in, n_out, grid_size, lo=-0.8, hi=1.2, dtype=torch.float32, grid_kind=grid_kind)
    layer32.load_state_dict({k: v.float() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()})
    layer32.set_knots(layer.knots.float(), uniform=layer.has_uniform_knots)
    with patches[path]:
        fast32 = grads(layer32, layer32, x.float(), g.float())
    for a, b in zip(fast32, ref):
        tol = 1e-5 * max(1.0, grid_size / 20)  # input rounding: |dB/dx| grows like G
        assert rel_err(a.double(), b) < tol


def test_kernel_and_torch_features_agree():
    kernel = cpu_kernel()
    if kernel is None:
        pytest.skip("fused kernel not built here")
    x = inputs(500, 6, torch.float32)
    lo, inv_h = torch.full((6,), -1.0), torch.full((6,), 4.0)
    for knots in (None, padded_knots(random_knots(6, 8, -1.0, 1.0, torch.float32))):
        kernel_knots = torch.empty(0) if knots is None else knots
        feats = torch.empty(500, 6 + 6 * 11)
        kernel.features(x, torch.sigmoid(x), lo, inv_h, kernel_knots, 8, feats)
        assert torch.allclose(feats, spline_features(x, lo, inv_h, 8, knots), atol=1e-6)
        grad_f = torch.randn_like(feats)
        gx = torch.empty_like(x)
        kernel.input_grad(x, torch.sigmoid(x), grad_f, lo, inv_h, kernel_knots, 8, gx)
        assert torch.allclose(gx, spline_features_input_grad(x, grad_f, lo, inv_h, 8, knots), atol=1e-4)


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
def test_double_backward_matches_reference(grid_kind):
    torch.manual_seed(0)
    layer = exact_layer(3, 4, 7, grid_kind=grid_kind)
    x = inputs(40, 3, span=1.5).requires_grad_()
    # On the random knots, gradgradcheck's central differences at the exact points (±1 is a
    # knot, ±1e6) fail for the Cox–de Boor reference too: checked on the random points there.
    checked = x if grid_kind == "uniform" else x[5:].detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda v: layer(v), (checked,))

    def second_derivative(fn):
        v = x.clone().requires_grad_()
        (d1,) = torch.autograd.grad(fn(v).sum(), v, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), v)
        return d2

    assert rel_err(second_derivative(layer), second_derivative(layer.reference_forward)) < 1e-10
    assert second_derivative(layer).abs().sum() > 0


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
@pytest.mark.parametrize("grid_size", [1, 5, 64])
def test_no_nan_at_knots_ends_and_far_outside(grid_size, grid_kind):
    layer = KANLayer(4, 3, grid_size, grid_kind=grid_kind)
    if grid_kind == "percentile" and grid_size > 1:  # coincident knots, as quantiles of tied samples give
        knots = layer.knots.clone()
        knots[:, 4] = knots[:, 5]
        layer.set_knots(knots, uniform=False)
    h = 2 / grid_size
    special = torch.tensor([-1.0, 1.0, -1 - 3 * h, 1 + 3 * h, -1 + h, 1 - h, 1e30, -1e30, 0.0])
    knots = layer.knots[0]
    x = torch.cat([special, knots]).repeat(4, 1).t().contiguous()
    for path, patch in paths():
        with patch:
            xr = x.clone().requires_grad_()
            y = layer(xr)
            y.sum().backward()
        assert torch.isfinite(y).all(), path
        assert torch.isfinite(xr.grad).all(), path
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters()), path
        layer.zero_grad()


def smooth_coefficients(layer: KANLayer) -> None:
    """Spline coefficients sampled from smooth random curves (like trained edges, unlike noise)."""
    t = layer.knots[0, 2:-2]  # Greville-like abscissae of the G+3 basis functions
    freq = torch.rand(layer.out_features, layer.in_features, 1) * 4 + 1
    phase = torch.rand(layer.out_features, layer.in_features, 1) * 6.28
    with torch.no_grad():
        layer.spline_weight.copy_(0.3 * torch.sin(freq * t + phase))


def test_grid_update_preserves_function_where_data_was_covered():
    torch.manual_seed(1)
    layer = KANLayer(4, 6, 10)
    smooth_coefficients(layer)
    x = torch.randn(4096, 4) * 0.15 + 0.1  # activations now concentrate in part of the grid
    before = layer(x).detach()
    layer.update_grid(x)
    after = layer(x).detach()
    assert layer.knots[:, 3].min() > -1.0 and layer.knots[:, -4].max() < 1.0  # the range moved in
    assert rel_err(after, before) < 2e-3


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
def test_grid_update_does_not_blow_up_over_many_refits(grid_kind):
    """A trap seen before: repeated refits with empty intervals grew huge coefficients."""
    torch.manual_seed(2)
    layer = KANLayer(3, 3, 20, grid_kind=grid_kind)
    with torch.no_grad():
        layer.spline_weight.normal_(0, 0.1)
    x0 = torch.randn(2048, 3) * 0.2
    x0[:, 0] = torch.where(torch.rand(2048) < 0.5, -0.6, 0.6) + 0.01 * torch.randn(2048)  # a gap in the middle
    reference = layer(x0).detach()
    for _ in range(100):
        layer.update_grid(x0 + 0.01 * torch.randn_like(x0))
    assert torch.isfinite(layer.spline_weight).all()
    assert layer.spline_weight.abs().max() < 10
    # percentile knots follow the sample quantiles, so every jittered batch moves some of them
    # and each such refit is a (slightly lossy) projection: measured 0.25 after 100 refits
    assert rel_err(layer(x0).detach(), reference) < (0.05 if grid_kind == "uniform" else 0.35)


def whole_support(layer: KANLayer, n: int = 4000) -> torch.Tensor:
    """Points spread over every knot interval t_0 … t_{G+6}: the interior and both extension zones."""
    t = layer.knots.to(torch.float64)
    return (t[:, 0] + (t[:, -1] - t[:, 0]) * torch.rand(n, 1, dtype=torch.float64)).to(layer.knots.dtype)


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_grid_extension_keeps_the_function_on_the_whole_old_support(grid_kind, path):
    """No grid update first: un-updated hidden activations live in the extension zones (1.05–1.55
    on a [-1, 1] grid of 10), and a refinement must keep the function there too."""
    patches = dict(paths())
    if path not in patches:
        pytest.skip("fused kernel not built here")
    torch.manual_seed(3)
    layer = exact_layer(3, 5, 10, grid_kind=grid_kind)  # percentile: random non-uniform knots, as updates leave
    x = whole_support(layer)
    zone = torch.linspace(1.05, 1.55, 200, dtype=torch.float64)[:, None].expand(-1, 3)  # beyond hi = 1
    interior = (layer.knots[:, 3].clone(), layer.knots[:, -4].clone())
    before, before_zone = layer.reference_forward(x).detach(), layer.reference_forward(zone).detach()
    for grid_size in (20, 40, 120):
        layer.extend_grid(grid_size)
        assert layer.grid_size == grid_size and layer.spline_weight.shape[-1] == grid_size + 3
        assert torch.equal(layer.knots[:, 3], interior[0]) and torch.equal(layer.knots[:, -4], interior[1])
        with patches[path]:  # float64: only the refit's 1e-9 ridge (REFIT_SMOOTHING) is left
            assert rel_err(layer(x).detach(), before) < 1e-7
            assert rel_err(layer(zone).detach(), before_zone) < 1e-7


def test_grid_extension_of_a_float32_network_is_exact_to_rounding():
    torch.manual_seed(4)
    net = KAN([2, 5, 3], [10, 5])
    with torch.no_grad():
        for layer in net.layers:
            layer.spline_weight.normal_(0, 0.3)
    x = torch.rand(3000, 2) * 3.2 - 1.6  # the first layer's whole support, extension zones included
    before = net(x).detach()
    net.extend_grids([20, 10])
    assert net.grids == [20, 10]
    assert rel_err(net(x).detach(), before) < 1e-5
    net.extend_grids([60, 10])
    assert rel_err(net(x).detach(), before) < 1e-5


def test_grid_coarsening_stays_close_on_smooth_edges():
    torch.manual_seed(5)
    layer = KANLayer(4, 6, 20)
    smooth_coefficients(layer)
    x = whole_support(layer)
    before = layer(x).detach()
    layer.extend_grid(10)
    assert layer.grid_size == 10 and rel_err(layer(x).detach(), before) < 0.05


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
def test_many_row_blocks_match_one(grid_kind, monkeypatch):
    """The kernel path cuts large batches into row blocks (about 5k rows of a 128-wide hidden
    layer); a tiny block size forces several blocks, and a last partial one."""
    if cpu_kernel() is None:
        pytest.skip("fused kernel not built here")
    import kanimg.nn.packed_spline as kan_module

    torch.manual_seed(6)
    layer = exact_layer(6, 12, 8, grid_kind=grid_kind, dtype=torch.float32)
    x = torch.randn(1000, 6)
    g = torch.randn(1000, 12)
    one_block = grads(layer, layer, x, g)
    monkeypatch.setattr(kan_module, "BLOCK_ELEMENTS", 256 * (6 + 6 * 11))  # 256 rows per block
    assert len(kan_module._row_blocks(1000, 6 + 6 * 11)) == 4
    blocks = grads(layer, layer, x, g)
    exact = copy.deepcopy(layer).double()
    reference = grads(exact.reference_forward, exact, x.double(), g.double())
    for a, b, r in zip(blocks, one_block, reference):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert rel_err(a.double(), r) < 1e-5


def test_percentile_grid_places_knots_at_sample_quantiles():
    layer = KANLayer(1, 1, 4, grid_kind="percentile")
    x = torch.cat([torch.rand(900) * 0.1, torch.rand(100) * 0.9 + 0.1])[:, None]  # 90 % of samples below 0.1
    layer.update_grid(x)
    interior = layer.knots[0, 3:-3]
    assert interior[2] < 0.1  # the median knot follows the data, not the range
    assert torch.all(interior[1:] > interior[:-1])


def test_kernel_builds_are_kept_apart_per_cpu(monkeypatch):
    """-march=native code from one CPU can SIGILL on another: a cache shared between machines
    (a home folder on NFS, a copied ~/.cache) must never hand one CPU's build to another."""
    import io

    from kanimg.nn import kernel

    def cpuinfo(flags: str):
        text = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
        return lambda *args, **kwargs: io.StringIO(text)

    keys = {}
    for flags in ("fpu sse2 avx2", "fpu sse2 avx2 avx512f", "fpu sse2 avx2"):
        monkeypatch.setattr(kernel, "open", cpuinfo(flags), raising=False)
        keys.setdefault(flags, set()).add(kernel._cpu_key())
    assert len(keys["fpu sse2 avx2"]) == 1 and keys["fpu sse2 avx2"] != keys["fpu sse2 avx2 avx512f"]
    monkeypatch.undo()
    assert kernel._NAME == f"kanimg_kan_cpu_{kernel._cpu_key()}_{kernel._torch_key()}"


def test_kernel_builds_are_kept_apart_per_torch_install(monkeypatch, tmp_path):
    """Two venvs on one machine share the build cache: each keeps its own build, or every switch
    between them rebuilds (half a minute) over a library the other may have loaded."""
    import torch

    from kanimg.nn import kernel

    ours = kernel._torch_key()
    assert kernel._torch_key() == ours
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert kernel._torch_key() != ours
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert kernel._torch_key() != ours


def test_the_knot_kind_is_recorded_by_what_set_the_knots_not_guessed():
    """Knots with alternating spacings 1e-3 / 1.5e-3 far from 0 are not uniform, though their
    spacings differ by little relative to their magnitude (what the old guess compared)."""
    torch.manual_seed(0)
    layer = KANLayer(2, 3, 6).double()
    steps = torch.tensor([1e-3, 1.5e-3] * 6, dtype=torch.float64)
    knots = (100 + torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])).repeat(2, 1)  # (2, G+7)
    assert not evenly_spaced(knots)
    layer.set_knots(knots, uniform=False)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = knots[:, 3] + (knots[:, 9] - knots[:, 3]) * torch.rand(500, 1, dtype=torch.float64)
    assert rel_err(layer(x), layer.reference_forward(x)) < 1e-10  # read as uniform, the fast path was 14 % off

    fresh = KANLayer(2, 3, 6).double()
    assert fresh.has_uniform_knots
    fresh.load_state_dict(layer.state_dict())  # the kind travels with the knots
    assert not fresh.has_uniform_knots
    legacy = {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}
    fresh = KANLayer(2, 3, 6).double()
    fresh.load_state_dict(legacy)  # a checkpoint from before: classified by spacing
    assert not fresh.has_uniform_knots
    fresh.load_state_dict({k: v for k, v in KANLayer(2, 3, 6).state_dict().items() if not k.endswith("_extra_state")})
    assert fresh.has_uniform_knots


@pytest.mark.parametrize("grid_kind", ["uniform", "percentile"])
def test_grid_updates_and_extensions_set_the_knot_kind(grid_kind):
    torch.manual_seed(0)
    layer = KANLayer(3, 2, 8, grid_kind=grid_kind)
    samples = torch.randn(2000, 3) ** 3 * 0.5  # skewed: quantiles are far from even
    layer.update_grid(samples)
    assert layer.has_uniform_knots == (grid_kind == "uniform") == evenly_spaced(layer.knots)
    layer.extend_grid(16)  # extension knots keep the old spacing
    assert not layer.has_uniform_knots and not evenly_spaced(layer.knots)
    layer.update_grid(samples * 3)  # every feature moves
    assert layer.has_uniform_knots == (grid_kind == "uniform") == evenly_spaced(layer.knots)
    with pytest.raises(ValueError, match="knots of shape"):
        layer.set_knots(torch.zeros(3, 5), uniform=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_kan_trains_under_autocast_with_its_splines_in_float32(dtype):
    """Mixed precision used to crash in the second layer (a bf16 scatter into a float32 basis,
    and a kernel without half types); the KAN's layers and its ridge projections now run in
    float32 inside autocast, so its outputs and gradients equal a float32 pass."""
    torch.manual_seed(0)
    kan = KAN([2, 16, 16, 3], [12, 4, 4], directions=8)
    kan.layers[1].update_grid(torch.randn(500, 16) ** 3)  # general knots in one layer
    x = torch.rand(300, 2) * 2 - 1
    head = torch.nn.Linear(3, 3)  # an op autocast does lower, after the KAN

    def loss_and_grads():
        kan.zero_grad()
        head.zero_grad()
        loss = head(kan(x)).float().pow(2).mean()
        loss.backward()
        return kan(x).detach(), [p.grad.clone() for p in kan.parameters()]

    for path, patch in paths():
        with patch:
            out32, grads32 = loss_and_grads()
            with torch.autocast("cpu", dtype=dtype):
                assert head(kan(x)).dtype == dtype  # autocast is on around the KAN
                out, grads = loss_and_grads()
        assert out.dtype == torch.float32 and torch.equal(out, out32), path
        for g, g32 in zip(grads, grads32):
            assert rel_err(g, g32) < 2e-2, path  # through the bf16/fp16 head's backward


def test_a_grid_update_of_a_fine_grid_finishes_on_two_threads():
    """torch.linalg.solve's batched LU hung on this project's 2-core Intel machine (MKL printing
    "DLASWP parameter 6") for batches of systems of order ≥ ~100 with 2 threads: any grid update
    of a layer with G ≳ 100 never returned. Run in a fresh process with a deadline, so a
    regression fails instead of hanging the suite."""
    import subprocess
    import sys

    script = """
import torch
torch.set_num_threads(2)
torch.manual_seed(0)
from kanimg.nn import KANLayer
layer = KANLayer(8, 16, 256, grid_kind="percentile")
x = torch.rand(4096, 8) * 2 - 1
before = layer(x)
layer.update_grid(x)
layer.extend_grid(512)
change = ((layer(x) - before).abs().max() / before.abs().max()).item()
assert change < 0.01, change
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
