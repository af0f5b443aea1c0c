"""The registry and every registered model."""
import math

import pytest
import torch

from kanimg.errors import KanimgError
from kanimg.models import build_model, get_entry, model_names
from kanimg.nn.siren import Siren


@pytest.mark.parametrize("name", model_names())
def test_every_model_runs_forward_and_backward(name):
    extra = {"grids": [8, 4, 4]} if get_entry(name).family == "kan" else {}
    model = build_model(name, widths=[2, 16, 16, 3], **extra)
    x = torch.rand(64, 2) * 2 - 1
    y = model(x)
    assert y.shape == (64, 3)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    rebuilt = build_model(**model.spec)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt(x), y)


def test_registry_resolves_and_rejects():
    assert build_model("kan", widths=[2, 128, 1], grids=[100, 10]).spec["grids"] == [100, 10]
    assert build_model("kan-ridge", widths=[2, 8, 8, 1], grids=None).spec["grids"] == [128, 20, 20]
    assert build_model("kan", widths=[2, 8, 1], grids=None).spec["grids"] == [16, 16]
    with pytest.raises(KanimgError, match="unknown model 'resnet'.*kan"):
        build_model("resnet")
    with pytest.raises(KanimgError, match="no option omega0"):
        build_model("kan", omega0=30)
    for bad in ({"widths": [2, 8, 1], "grids": [5]}, {"widths": [2, 0, 1]}, {"widths": [2, -3, 1]},
                {"widths": [2, 8, 1], "grids": [5, 0]}, {"widths": [2]}):
        with pytest.raises(KanimgError):
            build_model("kan", **bad)


def test_siren_initial_weights_follow_the_paper():
    torch.manual_seed(0)
    omega0 = 30.0
    model = Siren([2, 256, 256, 256, 1], omega0)
    first, *hidden = [layer.linear.weight for layer in model.hidden]
    assert first.abs().max() <= 1 / 2 and first.abs().max() > 0.95 / 2  # U(-1/n, 1/n), n = 2
    for w in hidden + [model.out.weight]:
        bound = math.sqrt(6 / w.shape[1]) / omega0
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform, not just bounded


def test_rff_frequencies_have_the_requested_scale():
    torch.manual_seed(0)
    model = build_model("rff", widths=[2, 32, 1], scale=3.0, num_features=4096)
    assert abs(model.frequencies.std().item() - 3.0) < 0.1
    assert model.net[0].in_features == 2 * 4096


def test_default_kan_grids_follow_the_image_size():
    from kanimg.fitting import model_spec_for

    # on the coordinates: a first grid of half the longer side, hidden grids of 20
    assert model_spec_for("kan-ridge", {}, 3, (256, 256))["grids"] == [128, 20, 20, 20]
    assert model_spec_for("kan-xy", {"widths": [2, 8, 1]}, 1, (400, 600))["grids"] == [300, 20]
    assert model_spec_for("kan-ridge", {}, 1, (8, 8))["grids"][0] == 16  # never below 16 …
    assert model_spec_for("kan-ridge", {}, 1, (4000, 3000))["grids"][0] == 512  # … nor above 512
    assert model_spec_for("kan", {"levels": 0, "widths": [2, 8, 1]}, 1, (400, 600))["grids"] == [300, 20]
    assert "grids" not in model_spec_for("kan2", {}, 1, (600, 600))  # a preset keeps its own grids
    assert model_spec_for("kan-ridge", {"grids": [7, 3, 3, 3]}, 1, (600, 600))["grids"] == [7, 3, 3, 3]
    # on a hash encoding: fixed grids; the encoding's finest level as fine as the image
    spec = model_spec_for("kan", {}, 3, (300, 200))
    assert (spec["widths"], spec["grids"], spec["finest_resolution"]) == ([2, 3], [16], 300)
    assert model_spec_for("kan", {"finest_resolution": 64}, 3, (300, 200))["finest_resolution"] == 64


def test_ridge_directions_feed_the_first_kan_layer_projections_of_x_and_y():
    torch.manual_seed(0)
    kan = build_model("kan", widths=[2, 6, 3], grids=[10, 4], directions=8, levels=0)
    assert kan.layers[0].in_features == 8 and kan.spec["directions"] == 8
    x = torch.rand(200, 2) * 2 - 1
    x[:4] = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])  # corners reach ±1 on every direction
    p = kan.lift(x)
    assert p.shape == (200, 8) and p.abs().max() <= 1 + 1e-6 and torch.allclose(p[:4].abs().amax(0), torch.ones(8))
    assert torch.allclose(p[:, 0], x[:, 0]) and torch.allclose(p[:, 4], x[:, 1], atol=1e-6)  # θ = 0 is x, θ = π/2 is y
    theta = 3 * math.pi / 8
    direct = (x[:, 0] * math.cos(theta) + x[:, 1] * math.sin(theta)) / (abs(math.cos(theta)) + abs(math.sin(theta)))
    assert torch.allclose(p[:, 3], direct, atol=1e-6)
    out = p
    for layer in kan.layers:
        out = layer(out)
    assert torch.allclose(kan(x), out)
    assert build_model("kan-xy", widths=[2, 6, 3], grids=[10, 4], directions=2).layers[0].in_features == 2  # 2 = x, y
    with pytest.raises(KanimgError, match="directions"):
        build_model("kan-xy", widths=[2, 6, 3], grids=[10, 4], directions=-1)
    with pytest.raises(KanimgError, match="ridge directions apply to a KAN on the coordinates"):
        build_model("kan", widths=[2, 3], directions=8)  # the default KAN sees a hash encoding


def test_a_ridge_kan_is_refused_by_the_codec_not_misencoded():
    from kanimg.compress.tensors import slots

    with pytest.raises(KanimgError, match="ridge directions"):
        slots(build_model("kan", widths=[2, 6, 3], grids=[10, 4], directions=8, levels=0).spec)
    with pytest.raises(KanimgError, match="hash encoding"):
        slots(build_model("kan", widths=[2, 3]).spec)


def test_the_default_kan_is_one_kan_layer_on_the_hashgrid_encoding():
    """kan = the hashgrid family's encoding read out by KAN layers: the same features for the
    same options and table, a first layer as wide as levels × features, and grid updates
    that move its knots to where those features lie."""
    torch.manual_seed(0)
    options = {"levels": 6, "features": 3, "log2_table_size": 9, "base_resolution": 4, "finest_resolution": 40}
    kan = build_model("kan", widths=[2, 3], grids=[8], **options)
    grid = build_model("hashgrid", widths=[2, 16, 3], **options)
    assert [len(kan.layers), kan.layers[0].in_features, kan.spec["directions"]] == [1, 18, 0]
    with torch.no_grad():
        kan.encoding.table.normal_(0, 0.5)
        grid.encoding.table.copy_(kan.encoding.table)
    x = torch.rand(500, 2) * 2 - 1
    features = grid.encoding(x)
    assert torch.equal(kan.lift(x), features)
    assert torch.allclose(kan(x), kan.layers[0](features))
    kan.update_grids(x)  # percentile knots: the interior spans each feature's samples
    knots = kan.layers[0].knots
    assert torch.allclose(knots[:, 3], features.min(0).values, atol=1e-5)
    assert torch.allclose(knots[:, 3 + 8], features.max(0).values, atol=1e-5)
    kan(x).square().mean().backward()
    assert kan.encoding.table.grad.abs().sum() > 0  # the tables learn through the KAN layer
    assert build_model("kan", widths=[2, 3], levels=0).layers[0].in_features == 2  # levels 0: x and y
    with pytest.raises(KanimgError, match="levels must be"):
        build_model("kan", widths=[2, 3], levels=-1)
