"""The B-spline basis against independent references: scipy's BSpline and finite differences."""
import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from kanimg.nn.bspline import cox_de_boor, cubic_pieces, cubic_pieces_du, spline_features, uniform_knots
from kanimg.nn.kan import KANLayer


def scipy_spline(x: np.ndarray, knots: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Σ_m c_m B_m(x) with every B_m from scipy, zero outside its support."""
    total = np.zeros_like(x)
    for m, c in enumerate(coef):
        b = BSpline.basis_element(knots[m : m + 5], extrapolate=False)(x)
        total += c * np.nan_to_num(b)
    return total


@pytest.mark.parametrize("grid_size", [1, 3, 10, 100])
def test_layer_spline_part_equals_scipy(grid_size):
    torch.manual_seed(grid_size)
    lo, hi = -0.7, 1.3
    layer = KANLayer(3, 2, grid_size).double()
    knots = uniform_knots(torch.tensor([lo] * 3, dtype=torch.float64), torch.tensor([hi] * 3, dtype=torch.float64), grid_size)
    layer.set_knots(knots, uniform=True)
    with torch.no_grad():
        layer.spline_weight.normal_()
        layer.base_weight.zero_()
        layer.spline_scale.fill_(1.0)
    h = (hi - lo) / grid_size
    # inside the grid, in the extension zones, beyond the extended knots
    x = torch.cat([torch.rand(400, 3) * 2 * (hi - lo) + lo - (hi - lo) / 2,
                   torch.rand(50, 3) * 6 * h + lo - 3 * h, torch.rand(50, 3) * 6 * h + hi - 3 * h]).double()
    fast = layer(x).detach().numpy()  # (B, O): spline part only (w_b = 0, w_s = 1)
    knots = knots[0].numpy()
    coef = layer.spline_weight.detach().numpy()  # (O, I, G+3)
    xd = x.numpy()
    expected = np.stack([sum(scipy_spline(xd[:, i], knots, coef[o, i]) for i in range(3)) for o in range(2)], axis=1)
    np.testing.assert_allclose(fast, expected, atol=1e-6 * max(1, np.abs(expected).max()), rtol=0)
    # and the reference Cox–de Boor path (any knots) too
    basis = cox_de_boor(x, torch.as_tensor(knots).expand(3, -1))
    via_cdb = torch.einsum("bim,oim->bo", basis, torch.as_tensor(coef)).numpy()
    np.testing.assert_allclose(via_cdb, expected, atol=1e-10)


def test_cox_de_boor_matches_scipy_on_nonuniform_knots():
    rng = np.random.default_rng(0)
    knots = np.sort(rng.uniform(-1, 1, 14))
    coef = rng.normal(size=10)
    x = rng.uniform(-1.2, 1.2, 500)
    basis = cox_de_boor(torch.as_tensor(x)[:, None], torch.as_tensor(knots)[None])
    np.testing.assert_allclose((basis[:, 0] @ torch.as_tensor(coef)).numpy(), scipy_spline(x, knots, coef), atol=1e-10)


def test_local_pieces_partition_of_unity_and_derivative():
    u = torch.rand(1000, dtype=torch.float64)
    assert torch.allclose(cubic_pieces(u).sum(-1), torch.ones_like(u))
    eps = 1e-6
    fd = (cubic_pieces(u + eps) - cubic_pieces(u - eps)) / (2 * eps)
    assert torch.allclose(cubic_pieces_du(u), fd, atol=1e-8)


def test_features_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = (torch.rand(20, 4, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    lo = torch.full((4,), -1.0, dtype=torch.float64)
    inv_h = torch.full((4,), 5 / 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: spline_features(v, lo, inv_h, 5), (x,))
