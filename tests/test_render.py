"""The one renderer: any dtype, chosen pixels, and the separable path of x-y KANs."""
import copy

import numpy as np
import pytest
import torch

from kanimg.models import build_model
from kanimg.render import GridEvaluator, render
from kanimg.sampling import pixel_coords

H, W = 13, 29  # not square, so rows and columns cannot be confused


def random_kan(seed: int = 0, **options) -> torch.nn.Module:
    """A small KAN with random (not initial) weights: every edge matters."""
    torch.manual_seed(seed)
    model = build_model("kan", widths=[2, 6, 5, 3], grids=[12, 4, 4], **{"levels": 0, "directions": 8, **options})
    with torch.no_grad():
        for layer in model.layers:
            layer.base_weight.normal_()
            layer.spline_weight.copy_(torch.cumsum(torch.randn_like(layer.spline_weight) * 0.3, dim=-1))
            layer.spline_scale.uniform_(0.5, 1.5)
    return model


def per_pixel(model: torch.nn.Module, convention: str = "centers", dtype=torch.float64) -> np.ndarray:
    """The plain reference: the model on every pixel's coordinates, (H, W, C)."""
    with torch.no_grad():
        out = copy.deepcopy(model).to(dtype)(pixel_coords(H, W, convention, dtype=dtype))
    return ((out + 1) / 2).reshape(H, W, -1).numpy()


@pytest.mark.parametrize("convention", ["centers", "linspace"])
def test_the_separable_path_of_an_xy_kan_equals_its_per_pixel_forward(convention):
    model = random_kan(directions=0).to(torch.float64)
    assert GridEvaluator(model, H, W, convention).separable
    image = render(model, H, W, convention)
    assert image.dtype == np.float64 and image.shape == (H, W, 3)
    np.testing.assert_allclose(image, per_pixel(model, convention), rtol=0, atol=1e-12)


def test_kans_that_are_not_f_of_x_plus_g_of_y_take_the_per_pixel_path():
    ridge = random_kan(seed=1)  # the default: 8 ridge directions
    assert ridge.directions == 8
    knotty = random_kan(seed=2, directions=0, grid_kind="percentile")
    knotty.update_grids(torch.rand(500, 2) ** 3 * 2 - 1)  # samples bunched near -1: percentile knots far from even
    assert not knotty.layers[0].has_uniform_knots
    for model in (ridge, knotty):
        assert not GridEvaluator(model, H, W).separable
        image = render(model, H, W)
        assert image.dtype == np.float32
        np.testing.assert_allclose(image, per_pixel(model, dtype=torch.float32), rtol=0, atol=1e-6)
        np.testing.assert_allclose(render(model, H, W, dtype=torch.float64), per_pixel(model), rtol=0, atol=1e-12)


@pytest.mark.parametrize("directions", [0, 8])
def test_a_float64_render_is_float64_and_agrees_with_float32(directions):
    model = random_kan(directions=directions)
    single = render(model, H, W)
    double = render(model, H, W, dtype=torch.float64)
    assert single.dtype == np.float32 and double.dtype == np.float64
    np.testing.assert_allclose(single, double, rtol=0, atol=1e-5)
    assert np.abs(single - double).max() > 0  # really evaluated in float64, not float32 cast up
    # the caller's model is left as it was: its dtype, its mode
    model.train()
    render(model, H, W, dtype=torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.layers[0].knots.dtype == torch.float32
    assert model.training


@pytest.mark.parametrize("name", ["kan", "kan-xy", "siren"])
def test_chosen_pixels_are_those_rows_of_the_whole_render(name):
    torch.manual_seed(0)
    model = random_kan(directions=0) if name == "kan-xy" else random_kan() if name == "kan" else build_model("siren", widths=[2, 12, 12, 3])
    whole = render(model, H, W, dtype=torch.float64).reshape(-1, 3)
    chosen = np.random.default_rng(0).choice(H * W, size=100, replace=False)
    subset = render(model, H, W, chunk=9, dtype=torch.float64, pixels=chosen)  # chunks of 9 pixels
    assert subset.shape == (100, 3)
    np.testing.assert_allclose(subset, whole[chosen], rtol=0, atol=1e-12)
    assert render(model, H, W, pixels=[]).shape == (0, 3)
    with pytest.raises(IndexError):
        render(model, H, W, pixels=[H * W])


def test_a_render_in_small_chunks_equals_one_pass():
    model = random_kan(directions=0)
    np.testing.assert_allclose(render(model, H, W, chunk=5), render(model, H, W), rtol=0, atol=1e-6)
