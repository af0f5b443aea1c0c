"""The hash encoding against a direct dense-grid computation, its hashing, its fused CPU kernel
against the PyTorch path, and the model."""

import pytest
import torch

from kanimg.errors import KanimgError
from kanimg.models import build_model
from kanimg.nn.hashgrid import HASH_PRIME_Y, HashGridEncoding, interpolate, level_resolutions
from kanimg.nn.kernel import cpu_kernel


def paths() -> list:
    """The PyTorch path, and the fused C++ kernel where it builds (chosen by KANIMG_NO_KERNEL)."""
    return [pytest.param("1", id="torch")] + ([pytest.param("0", id="kernel")] if cpu_kernel() is not None else [])


def dense_reference(encoding: HashGridEncoding, x: torch.Tensor) -> torch.Tensor:
    """Every level as an image of vertex features, bilinearly sampled by grid_sample: the
    encoding computed without any index arithmetic of ours (valid where no level is hashed)."""
    parts = []
    for level in range(encoding.levels):
        side = int(encoding.side[level])
        start = int(encoding.offset[level])
        grid = encoding.table[start : start + side * side].reshape(side, side, -1).permute(2, 0, 1)[None]  # (1, F, y, x)
        sampled = torch.nn.functional.grid_sample(grid, x[None, None], mode="bilinear", align_corners=True)  # (1, F, 1, B)
        parts.append(sampled[0, :, 0].t())
    return torch.cat(parts, dim=1)


def test_levels_grow_geometrically_from_the_coarsest_to_the_finest():
    assert level_resolutions(16, 16, 256)[0] == 16 and level_resolutions(16, 16, 256)[-1] == 256
    sizes = level_resolutions(8, 4, 512)
    ratios = [b / a for a, b in zip(sizes[:-1], sizes[1:])]
    assert all(1.8 < r < 2.2 for r in ratios)  # b = (512 / 4)^(1/7) = 2


@pytest.mark.parametrize("no_kernel", paths())
def test_collision_free_encoding_equals_bilinear_sampling_of_dense_grids(no_kernel, monkeypatch):
    monkeypatch.setenv("KANIMG_NO_KERNEL", no_kernel)
    torch.manual_seed(0)
    encoding = HashGridEncoding(levels=5, features=3, log2_table_size=16, base_resolution=2, finest_resolution=60)
    assert not encoding.hashed.any()
    with torch.no_grad():
        encoding.table.normal_()
    x = torch.rand(2000, 2) * 2 - 1
    x[:6] = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 0.0], [0.999999, -0.5]])
    assert torch.allclose(encoding(x), dense_reference(encoding, x), atol=1e-5)
    # gradients too: d(sum of features · g)/d table, both ways
    g = torch.randn(2000, 15)
    (ours,) = torch.autograd.grad((encoding(x) * g).sum(), encoding.table)
    (theirs,) = torch.autograd.grad((dense_reference(encoding, x) * g).sum(), encoding.table)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.skipif(cpu_kernel() is None, reason="the fused CPU kernel does not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernel_equals_the_pytorch_path_on_hashed_levels(dtype):
    torch.manual_seed(1)
    encoding = HashGridEncoding(levels=6, features=2, log2_table_size=9, base_resolution=3, finest_resolution=300).to(dtype)
    assert encoding.hashed.any() and not encoding.hashed.all()
    with torch.no_grad():
        encoding.table.normal_()
    x = torch.rand(3000, 2, dtype=dtype) * 2.4 - 1.2  # some points outside [-1, 1]², clamped by both
    x[:4] = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [0.999999, 1.0]], dtype=dtype)
    g = torch.randn(3000, 12, dtype=dtype)
    reference = interpolate(encoding.table, *encoding.corners(x))  # the PyTorch path
    (reference_grad,) = torch.autograd.grad((reference * g).sum(), encoding.table)
    features = encoding(x)
    (grad,) = torch.autograd.grad((features * g).sum(), encoding.table)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(features, reference, atol=tolerance)
    assert torch.allclose(grad, reference_grad, atol=tolerance * 10)


@pytest.mark.skipif(cpu_kernel() is None, reason="the fused CPU kernel does not build here")
def test_fused_kernel_never_reads_outside_the_table_for_non_finite_coordinates():
    encoding = HashGridEncoding(levels=4, features=2, log2_table_size=8, base_resolution=4, finest_resolution=64)
    x = torch.tensor([[float("nan"), 0.5], [0.2, float("inf")], [float("-inf"), float("nan")]])
    corner = torch.tensor([[-1.0, 0.5], [0.2, 1.0], [-1.0, -1.0]])  # NaN reads as -1, ±inf as ±1
    assert torch.equal(encoding(x), encoding(corner))
    (grad,) = torch.autograd.grad(encoding(x).sum(), encoding.table)
    assert torch.isfinite(grad).all()


@pytest.mark.skipif(cpu_kernel() is None, reason="the fused CPU kernel does not build here")
def test_fused_kernel_gives_the_same_bits_on_any_thread_count():
    torch.manual_seed(2)
    encoding = HashGridEncoding(levels=8, features=2, log2_table_size=10, base_resolution=4, finest_resolution=200)
    x, g = torch.rand(5000, 2) * 2 - 1, torch.randn(5000, 16)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            features = encoding(x)
            (grad,) = torch.autograd.grad((features * g).sum(), encoding.table)
            results.append((features.detach(), grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(f, results[0][0]) and torch.equal(d, results[0][1]) for f, d in results[1:])


def test_fine_levels_are_hashed_into_their_table():
    encoding = HashGridEncoding(levels=4, features=2, log2_table_size=8, base_resolution=4, finest_resolution=64)
    assert encoding.resolution.tolist() == [4, 10, 25, 64]
    assert encoding.hashed.tolist() == [False, False, True, True]  # 5² and 11² vertices fit 256 entries, 26² do not
    assert encoding.table.shape == (25 + 121 + 2 * 256, 2)
    rows, weights = encoding.corners(torch.rand(500, 2) * 2 - 1)
    for level in range(4):
        start, size = int(encoding.offset[level]), int(encoding.size[level])
        assert rows[:, level].min() >= start and rows[:, level].max() < start + size
    assert torch.allclose(weights.sum(-1), torch.ones(500, 4))
    # the paper's hash of vertex (x, y) at level 3: (x · 1 xor y · 2654435761) mod T
    x = torch.tensor([[-1 + 2 * (5 + 0.25) / 64, -1 + 2 * (9 + 0.5) / 64]])
    rows, _ = encoding.corners(x)
    assert int(rows[0, 3, 0]) - int(encoding.offset[3]) == (5 ^ (9 * HASH_PRIME_Y)) % 256


def test_hashgrid_model_fits_and_refuses_bad_options():
    torch.manual_seed(0)
    model = build_model("hashgrid", widths=[2, 32, 32, 3], levels=8, log2_table_size=10, finest_resolution=32)
    assert model.spec["finest_resolution"] == 32
    x = torch.rand(4096, 2) * 2 - 1
    target = torch.sin(4 * x[:, :1]) * torch.cos(3 * x[:, 1:]).expand(-1, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = (model(x) - target).square().mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 20
    for bad in ({"levels": 0}, {"log2_table_size": 40}, {"base_resolution": 64, "finest_resolution": 32}, {"widths": [3, 8, 1]}):
        with pytest.raises(KanimgError):
            build_model("hashgrid", **bad)


def test_fitting_sizes_the_finest_level_and_the_tables_to_the_image():
    from kanimg.fitting import model_spec_for

    # entries per pixel: hashgrid 4, kan 1; 150,000 pixels → 2^18 entries (×4: 2^20, capped at 2^19)
    for family, log2_at_300x500, log2_at_256x256 in (("hashgrid", 19, 18), ("kan", 18, 16)):
        spec = model_spec_for(family, {}, 3, (300, 500))
        assert (spec["finest_resolution"], spec["log2_table_size"]) == (500, log2_at_300x500)
        assert model_spec_for(family, {}, 3, (256, 256))["log2_table_size"] == log2_at_256x256
        assert model_spec_for(family, {}, 3, (40, 60))["log2_table_size"] == 16  # never below 2^16
        assert model_spec_for(family, {}, 3, (3000, 4000))["log2_table_size"] == 19  # at most 2^19
        chosen = model_spec_for(family, {"finest_resolution": 64, "log2_table_size": 12}, 3, (300, 500))
        assert (chosen["finest_resolution"], chosen["log2_table_size"]) == (64, 12)
    assert build_model("hashgrid").encoding.table.shape[0] <= 16 * 2**16  # unfitted: 2^16 entries per level
