"""Coordinates, the minibatch sampler and renders at other resolutions."""
import numpy as np
import pytest
import torch

from kanimg.render import render
from kanimg.sampling import CoordinateSampler, ImageTarget, axis_coords, pixel_coords


def test_one_epoch_visits_every_pixel_exactly_once():
    coords = pixel_coords(13, 17)
    values = torch.arange(13 * 17, dtype=torch.float32)[:, None]
    sampler = CoordinateSampler(coords, values, batch_size=10, seed=3)
    seen = torch.cat([sampler.next_batch()[1] for _ in range(-(-221 // 10))])  # ceil(221 / 10) batches
    assert seen.shape[0] == 221
    assert torch.equal(torch.sort(seen[:, 0]).values, values[:, 0])
    # batches pair each coordinate with its own value
    c, v = sampler.next_batch()
    assert torch.equal(coords[v[:, 0].long()], c)


def test_sampler_state_round_trip_draws_the_same_batches():
    coords, values = pixel_coords(8, 8), torch.rand(64, 3)
    a = CoordinateSampler(coords, values, 7, seed=1)
    for _ in range(5):
        a.next_batch()
    b = CoordinateSampler(coords, values, 7, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(12):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


@pytest.mark.parametrize("batch_size", [12, 0])  # 221 pixels: epochs end in a batch of 5, or one whole-image batch
def test_data_parallel_shares_make_up_exactly_the_one_process_batch(batch_size):
    coords = pixel_coords(13, 17)
    values = torch.arange(13 * 17, dtype=torch.float32)[:, None]
    alone = CoordinateSampler(coords, values, batch_size, seed=3)
    ranks = [CoordinateSampler(coords, values, batch_size, seed=3, share=(r, 3)) for r in range(3)]
    for _ in range(30):  # across epochs
        whole = alone.next_batch()[1][:, 0]
        parts = [sampler.next_batch()[1][:, 0] for sampler in ranks]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.sort(whole).values)
        assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1
    assert torch.equal(ranks[1].next_batch(whole=True)[0], alone.next_batch()[0])  # grid updates: the whole batch everywhere


def test_no_rank_gets_an_empty_share():
    """221 pixels in batches of 10 end an epoch with 1 pixel: too few for 3 ranks, so it is skipped."""
    coords, values = pixel_coords(13, 17), torch.rand(221, 1)
    ranks = [CoordinateSampler(coords, values, 10, seed=3, share=(r, 3)) for r in range(3)]
    for _ in range(60):
        sizes = [sampler.next_batch()[0].shape[0] for sampler in ranks]
        assert min(sizes) >= 3 and ranks[0].whole_count == 10


def test_full_batch_when_batch_size_is_zero_or_large():
    coords, values = pixel_coords(4, 4), torch.rand(16, 1)
    for bs in (0, 16, 1000):
        c, v = CoordinateSampler(coords, values, bs).next_batch()
        assert c.shape[0] == 16


def test_coordinate_conventions():
    assert torch.allclose(axis_coords(4, "centers"), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(axis_coords(3, "linspace"), torch.tensor([-1.0, 0.0, 1.0]))
    xy = pixel_coords(2, 3)  # row-major, (x, y)
    assert torch.allclose(xy[1], torch.tensor([0.0, -0.5]))
    assert torch.allclose(xy[3], torch.tensor([-2 / 3, 0.5]))
    with pytest.raises(ValueError):
        axis_coords(3, "corners")


@pytest.mark.parametrize("n", [1, 2, 37])
@pytest.mark.parametrize("convention", ["centers", "linspace"])
def test_axis_coordinates_in_float64_are_the_decoders_and_float32_stays_as_it_was(convention, n):
    """float64: the values the .kimg decoder has always used (bit for bit); the float32 default
    is computed in float32 as before (not float64 rounded, which differs in the last bit)."""
    if convention == "centers":
        decoder = (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1
        single = (2 * torch.arange(n, dtype=torch.float32) + 1) / n - 1
    else:
        decoder = torch.linspace(-1, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
        single = torch.linspace(-1, 1, n, dtype=torch.float32) if n > 1 else torch.zeros(1)
    double = axis_coords(n, convention, dtype=torch.float64)
    assert double.dtype == torch.float64 and torch.equal(double, decoder)
    assert axis_coords(n, convention).dtype == torch.float32 and torch.equal(axis_coords(n, convention), single)
    xy = pixel_coords(n, 3, convention, dtype=torch.float64)
    assert xy.dtype == torch.float64 and torch.equal(xy[:, 1], decoder.repeat_interleave(3))


class _XY(torch.nn.Module):
    """A 'model' that returns its coordinates: renders show where pixels sample the image."""

    def forward(self, xy):
        return xy


@pytest.mark.parametrize("convention", ["centers", "linspace"])
def test_render_at_other_sizes_stays_aligned(convention):
    small = render(_XY(), 4, 4, convention)  # (H, W, 2): (x + 1)/2, (y + 1)/2
    big = render(_XY(), 8, 8, convention)
    # same image extent: first/last sample positions are consistent across resolutions
    if convention == "centers":
        assert np.allclose(small.mean(axis=(0, 1)), big.mean(axis=(0, 1)))  # both centred on the image
        assert np.allclose(big[::2, ::2] + big[1::2, 1::2], 2 * small, atol=1e-6)  # 2×2 blocks average to the coarse pixel
    else:
        assert np.allclose(small[0, 0], big[0, 0]) and np.allclose(small[-1, -1], big[-1, -1])


def test_render_in_bands_equals_one_pass():
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    whole = render(model, 37, 23, chunk=10_000)
    banded = render(model, 37, 23, chunk=50)  # 2 rows per band
    assert np.allclose(whole, banded, atol=1e-6)
    target = ImageTarget(np.zeros((37, 23, 3), np.float32))
    assert target.coords.shape == (37 * 23, 2) and torch.all(target.values == -1)
