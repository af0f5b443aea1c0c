"""The latent-grid codec: grids and synthesis (a ReLU MLP or an order-1 KAN) round-trip exactly
through .kimg versions 5 and 6 (and version 3 and 4 files still decode), the decoder matches an independent numpy evaluation, the rate
term matches scipy's Laplace, and damaged or crafted latent files are refused."""
import struct
from dataclasses import replace
import subprocess
from pathlib import Path
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from conftest import photo_crop
from kanimg.cli import main
from kanimg.compress import kimg, latent, latent_codec, neural, resume
from kanimg.compress.bitstream import decode_image, decode_model, encode_model
from kanimg.compress.kimg import ImageInfo
from kanimg.compress.entropy import StreamDecoder, cost_bits, encode_streams, fit_model
from kanimg.compress.latent import LatentImage, code_latents, decode_latents, laplace_bits, level_shapes, synthesise
from kanimg.compress.neural import CompressConfig, compress_image
from kanimg.compress.quantize import QuantConfig, quantize_tensor
from kanimg.compress.tensors import stored_arrays
from kanimg.errors import KanimgError
from kanimg.io import as_image
from kanimg.models import build_model


def latent_like(height=13, width=21, widths=(5, 8, 3), seed=0) -> LatentImage:
    """A latent image with integer-ish grids (mostly 0, as rate training leaves them) and random weights."""
    torch.manual_seed(seed)
    model = LatentImage(height, width, list(widths))
    with torch.no_grad():
        for k, latent in enumerate(model.latents):
            latent.copy_(torch.round(torch.randn_like(latent) * (1.5 + k)) * (torch.rand_like(latent) < 0.6))
    return model


def keys_bicubic(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cubic convolution (Keys, a = -0.75) with half-pixel centres and clamped borders: the
    upsampling the format specifies, written out independently of torch."""
    def kernel(t):
        t, a = np.abs(t), -0.75
        return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1, np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))

    def weights(n_out, n_in):
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            source = (i + 0.5) * n_in / n_out - 0.5
            base = int(np.floor(source))
            for tap in range(base - 1, base + 3):
                matrix[i, min(max(tap, 0), n_in - 1)] += kernel(source - tap)
        return matrix

    if grid.shape == (height, width):
        return grid.astype(np.float64)
    return weights(height, grid.shape[0]) @ grid.astype(np.float64) @ weights(width, grid.shape[1]).T


def test_level_shapes_halve_and_round_up():
    assert level_shapes(13, 21, 4) == [(13, 21), (7, 11), (4, 6), (2, 3)]


def test_round_trip_restores_grids_and_quantised_weights_and_re_encodes_to_the_same_bytes():
    model = latent_like()
    info = ImageInfo(13, 21, 3)
    data = encode_model(model, info, QuantConfig(8))
    assert data[4] == 5  # nested grid coding with one-byte models is version 5
    decoded = decode_model(data)
    assert decoded.model.spec == model.spec and decoded.image == info
    for a, b in zip(model.integer_latents(), decoded.model.integer_latents()):
        assert np.array_equal(a, b)
    for original, restored in zip(stored_arrays(model), stored_arrays(decoded.model)):
        assert np.array_equal(restored, quantize_tensor(original, QuantConfig(8)).dequantize())
    assert encode_model(decoded.model, info, QuantConfig(8)) == data


def decoded_at_one_and_two_threads(data: bytes) -> list[np.ndarray]:
    threads = torch.get_num_threads()
    try:
        images = []
        for count in (1, 2):
            torch.set_num_threads(count)
            images.append(decode_image(data).integers)
    finally:
        torch.set_num_threads(threads)
    return images


def test_decoder_equals_an_independent_numpy_evaluation_and_any_thread_count():
    model = latent_like()
    data = encode_model(model, ImageInfo(13, 21, 3), QuantConfig(9))
    decoded = decode_model(data)
    grids, weights = decoded.model.integer_latents(), stored_arrays(decoded.model)
    x = np.stack([keys_bicubic(g, 13, 21) for g in grids], -1)
    layers = len(weights) // 2
    for layer in range(layers):
        x = x @ weights[2 * layer].T + weights[2 * layer + 1]
        x = np.maximum(x, 0) if layer < layers - 1 else x
    ours = synthesise(grids, weights, 13, 21)
    assert np.allclose(ours, x, atol=1e-12)
    expected = np.round(np.clip((x + 1) / 2, 0, 1) * 255)
    images = decoded_at_one_and_two_threads(data)
    assert np.array_equal(images[0], images[1])
    assert np.abs(images[0].astype(np.int64) - expected).max() == 0


@pytest.mark.parametrize("dense_limit", [1024, 0])  # grids upsampled as matrix products, or interpolated
def test_training_forward_with_rounded_latents_is_the_decoder(dense_limit, monkeypatch):
    monkeypatch.setattr(latent, "DENSE_LIMIT", dense_limit)
    model = latent_like().double()
    assert any(model.dense) == bool(dense_limit)
    out, _ = model("round")
    ours = synthesise(model.integer_latents(), stored_arrays(model), 13, 21)
    assert np.allclose(out.detach().numpy().T.reshape(13, 21, 3), ours, atol=1e-12)


def test_the_rounding_phase_sees_the_synthesis_the_file_will_hold():
    """Quantisation-aware training: with fake-quantised weights, the training forward is the
    decoder of the file written at that precision."""
    model = latent_like().double()
    bits = latent_codec.WEIGHT_BITS_ESTIMATE
    out, _ = model("round", model.quantized_synthesis(bits))
    stored = decode_model(encode_model(model, ImageInfo(13, 21, 3), QuantConfig(bits))).model
    decoded = synthesise(stored.integer_latents(), stored_arrays(stored), 13, 21)
    assert np.allclose(out.detach().numpy().T.reshape(13, 21, 3), decoded, atol=1e-9)
    assert not np.allclose(out.detach().numpy().T.reshape(13, 21, 3), model("round")[0].detach().numpy().T.reshape(13, 21, 3), atol=1e-4)


def test_rounded_latents_keep_a_pull_towards_zero():
    """In the rounding phase a latent that rounds to 0 still pays rate for drifting (the rate
    of the rounded value has no slope at 0)."""
    model = latent_like()
    with torch.no_grad():
        for values in model.latents:
            values.fill_(0.3)
    _, bits = model("ste")
    bits.backward()
    assert all(float(values.grad.sum()) > 0 for values in model.latents)


def test_rate_term_is_the_laplace_mass_of_each_unit_interval():
    values = torch.tensor([-3.0, -0.4, 0.0, 0.7, 2.0, 9.0], dtype=torch.float64)
    log_scale = torch.tensor(0.3, dtype=torch.float64)
    scale = float(np.exp(0.3))
    mass = stats.laplace.cdf(values.numpy() + 0.5, scale=scale) - stats.laplace.cdf(values.numpy() - 0.5, scale=scale)
    assert float(laplace_bits(values, log_scale)) == pytest.approx(-np.log2(mass).sum(), rel=1e-10)
    # and its gradient, by finite differences in the scale
    log_scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    laplace_bits(values, log_scale).backward()
    step = 1e-3
    numeric = (float(laplace_bits(values, torch.tensor(0.3 + step, dtype=torch.float64))) -
               float(laplace_bits(values, torch.tensor(0.3 - step, dtype=torch.float64)))) / (2 * step)
    assert float(log_scale.grad) == pytest.approx(numeric, rel=1e-5)


def test_rate_term_in_closed_form_matches_the_two_cdfs_and_their_derivatives_per_value():
    """The closed form of each value's mass (inside ½, in the tails, at 0, near ±½, far out
    where the floor holds) against scipy's two CDFs, and its derivatives in each value and
    each value's own log-scale against central finite differences."""
    values = torch.tensor([0.0, 0.2, -0.49, 0.51, -0.7, 1.3, -2.0, 4.6, 0.05, -3.3], dtype=torch.float64)
    log_scale = torch.tensor([0.3, -1.0, 0.8, -2.0, 0.0, 1.5, -0.4, 0.2, -3.0, 2.0], dtype=torch.float64)
    scale = np.exp(log_scale.numpy())
    mass = stats.laplace.cdf(values.numpy() + 0.5, scale=scale) - stats.laplace.cdf(values.numpy() - 0.5, scale=scale)
    for v, m, ls in zip(values, mass, log_scale):
        assert float(laplace_bits(v[None], ls[None])) == pytest.approx(-np.log2(m), rel=1e-12)
    v, ls = values.clone().requires_grad_(), log_scale.clone().requires_grad_()
    laplace_bits(v, ls).backward()
    step = 1e-6
    for i in range(len(values)):
        for tensor, grad in ((values, v.grad), (log_scale, ls.grad)):
            up, down = tensor.clone(), tensor.clone()
            up[i] += step
            down[i] -= step
            args = (up, log_scale) if tensor is values else (values, up)
            back = (down, log_scale) if tensor is values else (values, down)
            numeric = (float(laplace_bits(*args)) - float(laplace_bits(*back))) / (2 * step)
            assert float(grad[i]) == pytest.approx(numeric, rel=1e-5, abs=1e-7)
    assert float(v.grad[0]) == 0  # the mass is flat in the value at 0
    # far beyond its scale a value costs the floor, with no slope to pull it back
    far, tiny = torch.tensor([40.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    bits = laplace_bits(far, tiny)
    bits.backward()
    assert bits.item() == pytest.approx(-np.log2(latent.BITS_FLOOR)) and float(far.grad) == 0 and float(tiny.grad) == 0


def nested_contexts(grid: np.ndarray, depth: int) -> list[tuple[str, int, int, float]]:
    """Every value of ``grid`` as the nested coding sees it, written out position by position:
    (its set: "base", "odd" or "cross"; row; column; the sum of its context neighbours'
    magnitudes), in decoding order. A stage at spacing s = 2^t looks at the values on the grid
    of spacing s: odd multiples of s in both coordinates take their four diagonal neighbours
    (±s, ±s), the others not on the 2s grid their four direct ones (±s, 0), (0, ±s)."""
    rows, cols = grid.shape
    out = []
    step = 2**depth
    out += [("base", i, j, 0.0) for i in range(0, rows, step) for j in range(0, cols, step)]
    for t in reversed(range(depth)):
        s = 2**t

        def around(i, j, offsets):
            return float(sum(abs(grid[i + a, j + b]) for a, b in offsets if 0 <= i + a < rows and 0 <= j + b < cols))

        diagonal, direct = [(-s, -s), (-s, s), (s, -s), (s, s)], [(-s, 0), (s, 0), (0, -s), (0, s)]
        out += [("odd", i, j, around(i, j, diagonal)) for i in range(s, rows, 2 * s) for j in range(s, cols, 2 * s)]
        out += [("cross", i, j, around(i, j, direct)) for i in range(0, rows, s) for j in range(0, cols, s)
                if (i // s + j // s) % 2 == 1]
    return out


def test_training_rate_sees_the_coders_nested_contexts(monkeypatch):
    """Each grid's training rate, written out value by value with scipy: every stage's odd rows'
    odd columns under a Laplace set by their four diagonal neighbours, the values whose row +
    column is odd by their four direct ones, the coarsest grid under one Laplace."""
    monkeypatch.setattr(latent, "RATE_BASE_VALUES", 4)
    model = latent_like(height=27, width=22).double()
    with torch.no_grad():
        # scales wide enough that no probability meets laplace_bits' floor of 1e-9
        model.rate_parameters.copy_(torch.tensor([1.0, 0.5, 0.3, 0.7, 0.2]) + 0.2 * torch.randn(model.rate_parameters.shape, dtype=torch.float64))
    for k, values in enumerate(model.latents):
        grid = torch.round(values.detach())[0, 0].numpy()
        base_scale, odd_scale, odd_slope, cross_scale, cross_slope = model.rate_parameters[k].detach().numpy()
        depth, size = 0, grid.size
        while size > 4:
            depth += 1
            size = int(np.ceil(grid.shape[0] / 2**depth) * np.ceil(grid.shape[1] / 2**depth))
        expected = 0.0
        for kind, i, j, total in nested_contexts(grid, depth):
            log_scale = {"base": base_scale, "odd": odd_scale + odd_slope * np.log1p(total),
                         "cross": cross_scale + cross_slope * np.log1p(total)}[kind]
            scale = np.exp(log_scale)
            expected -= np.log2(stats.laplace.cdf(grid[i, j] + 0.5, scale=scale) - stats.laplace.cdf(grid[i, j] - 0.5, scale=scale))
        assert float(model.level_bits(k, torch.round(values.detach())).detach()) == pytest.approx(expected, rel=1e-9)
    # the neighbours' values get a gradient (training can learn to cluster zeros), as do the scales
    model.zero_grad()
    model.level_bits(1, model.latents[1] + 0.25).backward()
    assert model.latents[1].grad.abs().sum() > 0 and bool((model.rate_parameters.grad[1] != 0).all())


def reference_streams(grid: np.ndarray, buckets: list[tuple[int, int]], predictions: list[tuple[int, int]] | None = None
                      ) -> list[np.ndarray]:
    """The streams of ``grid`` nested with these bucket counts (coarsest stage first), in file
    order, from the hand-written contexts; with ``predictions`` (version 8), each predicted
    value as its residual v − ⌊(code · the signed sum of its context's four neighbours + 8) / 16⌋."""
    order = nested_contexts(grid, len(buckets))
    rows, cols = grid.shape
    streams = [np.array([grid[i, j] for kind, i, j, _ in order if kind == "base"], dtype=np.int64)]
    for stage, (counts, codes) in enumerate(zip(buckets, predictions or [(0, 0)] * len(buckets))):
        s = 2 ** (len(buckets) - 1 - stage)
        offsets = {"odd": [(-s, -s), (-s, s), (s, -s), (s, s)], "cross": [(-s, 0), (s, 0), (0, -s), (0, s)]}
        for kind, count, code in zip(("odd", "cross"), counts, codes):
            chosen = []
            for k, i, j, total in order:
                if k == kind and (i % (2 * s) or j % (2 * s)) and not (i % s or j % s):
                    signed = sum(int(grid[i + a, j + b]) for a, b in offsets[kind] if 0 <= i + a < rows and 0 <= j + b < cols)
                    chosen.append((int(grid[i, j]) - (code * signed + 8) // 16, int(latent._buckets(np.array(total), count))))
            streams += [np.array([v for v, b in chosen if b == bucket], dtype=np.int64) for bucket in range(count)]
    return streams


def clustered_grid(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = (rng.random(shape) < 0.15) * rng.integers(-5, 6, shape)
    return base + np.roll(base, 1, 0) + np.roll(base, 1, 1)  # clustered, as edges are


SHAPES = [(40, 60), (37, 23), (1, 9), (9, 1), (1, 1), (2, 3), (17, 13)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_the_decoder_reads_any_depth_and_buckets_as_the_format_describes(shape, depth):
    """Streams written from the hand-written contexts, at every depth the grid allows and random
    bucket counts, decode to the grid (independently of the encoder's choices)."""
    depth = min(depth, (max(shape) - 1).bit_length())
    grid = clustered_grid(shape, sum(shape) + depth)
    rng = np.random.default_rng(depth)
    buckets = [tuple(int(n) for n in rng.integers(1, 7, 2)) for _ in range(depth)]
    limit = max(1, int(np.abs(grid).max()))
    streams = reference_streams(grid, buckets)
    models = [fit_model(stream, limit) for stream in streams]
    level = kimg.LatentLevel(limit, models, buckets)
    payload = encode_streams(streams, [limit] * len(streams), models)
    (back,), decoded, _, _ = decode_latents(StreamDecoder(payload), ImageInfo(*shape, 1), [level])
    assert np.array_equal(back, grid) and all(np.array_equal(a, b) for a, b in zip(decoded, streams))


@pytest.mark.parametrize("shape", SHAPES)
def test_nested_coding_round_trips_with_the_contexts_written_out_by_hand(shape):
    blocks = np.kron(clustered_grid(shape, 1), np.ones((4, 4), dtype=np.int64))  # 4 × 4 blocks: two stages see them
    for grid in (clustered_grid(shape, sum(shape)), blocks):
        (level,), streams, limits, models = code_latents([grid])
        assert len(level.models) == 1 + sum(map(sum, level.buckets))
        payload = encode_streams(streams, limits, models)
        (back,), decoded, _, _ = decode_latents(StreamDecoder(payload), ImageInfo(*grid.shape, 1), [level])
        assert np.array_equal(back, grid)
        # the streams hold the values (or their residuals) in the order and buckets the hand-written contexts give
        expected = reference_streams(grid, level.buckets, level.predictions)
        assert len(expected) == len(streams) == len(decoded)
        assert all(np.array_equal(a.ravel(), b) for a, b in zip(streams, expected))
    if min(shape) >= 9:
        assert len(level.buckets) >= 2


def test_smooth_grids_are_coded_as_residuals_of_their_neighbours_in_fewer_bits():
    """A smooth grid (as a full-size photo's coarse grids are): the coder predicts its sets from
    their neighbours (version 8), in fewer bits than coded as they are, the residuals those of
    the hand-written prediction, and decodes back; noise is not predicted."""
    rows, cols = np.mgrid[0:45, 0:70]
    smooth = np.round(9 * np.sin(rows / 7) * np.cos(cols / 9)).astype(np.int64)
    (level,), streams, limits, models = code_latents([smooth])
    assert level.predicted
    payload = encode_streams(streams, limits, models)
    (back,), _, _, _ = decode_latents(StreamDecoder(payload), ImageInfo(45, 70, 1), [level])
    assert np.array_equal(back, smooth)
    assert all(np.array_equal(a.ravel(), b) for a, b in zip(streams, reference_streams(smooth, level.buckets, level.predictions)))
    plain_streams = reference_streams(smooth, level.buckets)
    plain = [fit_model(stream, level.limit, compact=True) for stream in plain_streams]
    coded = sum(cost_bits(s, m, level.limit) for s, m in zip(streams, models))
    assert coded < 0.8 * sum(cost_bits(s, m, level.limit) for s, m in zip(plain_streams, plain))
    noise = np.random.default_rng(3).integers(-3, 4, (45, 70))
    assert not code_latents([noise])[0][0].predicted


def test_a_latent_model_with_predicted_sets_is_version_8_and_round_trips_to_the_same_bytes():
    model = latent_like(40, 56)
    rows, cols = np.mgrid[0:20, 0:28]
    with torch.no_grad():
        model.latents[1].copy_(torch.from_numpy(np.round(6 * np.sin(rows / 4) * np.cos(cols / 5)))[None, None])
    data = encode_model(model, ImageInfo(40, 56, 3), QuantConfig(8))
    parsed = kimg.read(data)
    assert data[4] == 8 and parsed.levels[1].predicted and kimg.write(parsed) == data
    decoded = decode_model(data).model
    assert all(np.array_equal(a, b) for a, b in zip(decoded.integer_latents(), model.integer_latents()))


def test_predictions_outside_the_format_or_the_grids_range_are_refused():
    parsed = kimg.read(encode_model(latent_like(), ImageInfo(13, 21, 3), QuantConfig(8)))
    level = parsed.levels[0]
    parsed.levels[0] = kimg.LatentLevel(level.limit, [level.models[0]] * 3, [(1, 1)], [(kimg.PREDICTION_CODES + 1, 0)])
    with pytest.raises(KanimgError, match="prediction codes"):
        kimg.read(kimg.write(parsed))
    # before version 8, a bucket count with a prediction code in its high bits is no valid count
    parsed.levels[0] = kimg.LatentLevel(level.limit, [level.models[0]] * 3, [(1, 1)])
    body = bytearray(kimg.write(parsed)[:-4])
    assert body[4] == 5
    position = body.index(bytes([level.limit, 1, 1, 1]), 5) + 2  # the grid's limit, its depth 1, its stage's two counts
    body[position] |= 1 << 4
    with pytest.raises(KanimgError, match="bucket counts"):
        kimg.read(with_checksum(bytes(body)))
    # a residual that the prediction takes beyond the grid's largest magnitude (no encoder writes it)
    limit = 3
    streams = [np.full(4, limit), np.array([limit]), np.zeros(4, dtype=np.int64)]  # 3 × 3: its corners, centre, the rest
    models = [fit_model(s, limit, compact=True) for s in streams]
    payload = encode_streams(streams, [limit] * 3, models)
    crafted = kimg.LatentLevel(limit, models, [(1, 1)], [(4, 0)])  # the centre predicted as its corners' mean, 3
    with pytest.raises(KanimgError, match="beyond its grid's largest magnitude"):
        decode_latents(StreamDecoder(payload), ImageInfo(3, 3, 1), [crafted])


def test_nested_coding_pays_on_clustered_grids_and_keeps_an_empty_grid_one_stream():
    rng = np.random.default_rng(1)
    base = (rng.random((16, 24)) < 0.2) * rng.integers(-6, 7, (16, 24))
    clustered = np.kron(base, np.ones((4, 4), dtype=np.int64))  # 4 × 4 blocks: two stages see them
    (level,), streams, limits, models = code_latents([clustered])
    assert len(level.buckets) >= 2
    nested = sum(cost_bits(s, m, level.limit) for s, m in zip(streams, models))
    assert nested < 0.9 * cost_bits(clustered.ravel(), fit_model(clustered.ravel(), level.limit), level.limit)
    (flat,), *_ = code_latents([np.zeros((64, 96), dtype=np.int64)])
    assert flat.buckets == [] and len(flat.models) == 1  # all zeros: one stream is cheapest


@pytest.mark.parametrize("version", [3, 4, 5, 6, 7, 8])
def test_latent_files_decode_to_the_image_they_decoded_to_when_written(version):
    """A version 3 file (checkerboard contexts), a version 4 one (nested, several stages and
    buckets per grid), a version 5 one (the same grids and weights with one-byte models:
    the same PNG), a version 6 one (version 5's grids under an order-1 KAN synthesis), a
    version 7 one (a KAN synthesis with a grid and a reach per layer) and a version 8 one
    (version 5's grids and weights again, sets predicted from their neighbours: the same PNG), each
    written by kanimg's encoder of its time, decode to the PNG that kanimg
    decoded them to then, and read and write back to the same bytes: a change to the decoder
    that changes an old file's pixels, or to the writer of an old version, fails here."""
    data = (Path(__file__).parent / "data" / f"latent-v{version}.kimg").read_bytes()
    parsed = kimg.read(data)
    assert data[4] == version and any(len(level.models) > 1 for level in parsed.levels)
    assert kimg.write(parsed) == data
    with Image.open(Path(__file__).parent / "data" / f"latent-v{version}.png") as png:
        assert np.array_equal(decode_image(data).integers, np.asarray(png))


def test_version_5_holds_the_same_grids_in_fewer_bytes_than_version_4():
    """Re-encoding a version 4 file's grids and weights: the same pixels, every grid model one
    byte instead of three, and a file smaller by more than the models' two saved bytes each
    (cheaper models let the coder split more buckets)."""
    old = (Path(__file__).parent / "data" / "latent-v4.kimg").read_bytes()
    decoded = decode_model(old)
    new = encode_model(decoded.model, decoded.image, QuantConfig(decoded.bits[0]), bits=decoded.bits)
    assert new[4] >= 5 and np.array_equal(decode_image(new).integers, decode_image(old).integers)
    models = sum(len(level.models) for level in kimg.read(old).levels)
    assert len(new) < len(old) - 2 * models


def test_compressing_a_photo_crop_lands_near_the_rate_and_beats_a_flat_image():
    image = as_image(photo_crop(48))
    result = compress_image(image, 1.5, CompressConfig(model="latent", steps=300))
    decoded = decode_image(result.data)
    assert result.data[4] in (5, 8) and result.bpp == 8 * len(result.data) / (48 * 48)
    assert 0.5 * 1.5 < result.bpp < 1.5 * 1.5  # rate control steers λ towards the target
    flat = 10 * np.log10(1 / np.mean((image.pixels - image.pixels.mean((0, 1))) ** 2))
    assert result.psnr > flat + 3
    assert result.psnr == pytest.approx(10 * np.log10(1 / np.mean((decoded.pixels - image.pixels) ** 2)))
    grids = [latent.detach().numpy()[0, 0] for latent in decode_model(result.data).model.latents]
    assert result.extra["nonzero_per_grid"] == [round(float(np.mean(g != 0)), 4) for g in grids]
    history = result.extra["history"]  # the rate control's trace: one entry per coding of the file
    assert [entry["step"] for entry in history] == [150, 200]  # half-way (the precision chosen), then every 200 steps
    assert all(len(entry["nonzero_per_grid"]) == len(grids) and entry["file_bpp"] > 0 for entry in history)


def test_a_bare_compress_uses_latent_grids_where_the_budget_holds_their_synthesis():
    rgb = lambda height, width: ImageInfo(height, width, 3, 8)
    auto = CompressConfig()
    assert neural.default_model(rgb(256, 256), 0.3, auto) == "latent"
    assert neural.default_model(rgb(256, 256), 0.1, auto) == "latent"  # 6,554 bits
    assert neural.default_model(rgb(256, 256), 0.04, auto) == "latent"  # 2,621 bits
    assert neural.default_model(rgb(64, 64), 0.4, auto) == "kan"  # 1,638 bits: under LATENT_MIN_BITS
    assert neural.default_model(rgb(768, 512), 0.3, replace(auto, bits=16)) == "kan"  # float16: not a latent file
    assert neural.default_model(rgb(256, 256), 0.03, auto) == "latent"  # 246 bytes: under the smallest KAN file, 272
    assert neural.default_model(rgb(256, 256), 0.03, replace(auto, device="cuda")) == "kan"  # latent trains on the CPU
    with pytest.raises(KanimgError, match="smallest latent file"):  # under both: the smaller minimum is named
        neural.check_budget(as_image(photo_crop(256)), 0.005, auto)
    config = CompressConfig(steps=30, qat_steps=0)
    assert config.model == "auto"
    assert compress_image(as_image(photo_crop(48)), 4.0, config).spec["name"] == "latent"  # 9,216 bits
    assert compress_image(as_image(photo_crop(16)), 8.0, config).spec["name"] == "latent"  # 2,048 bits
    assert compress_image(as_image(photo_crop(16)), 7.0, config).spec["name"] == "kan"  # 1,792 bits
    assert compress_image(as_image(photo_crop(48)), 0.5, config).spec["name"] == "latent"  # 144 bytes: no KAN fits


def test_a_small_budget_gets_the_narrower_synthesis_and_its_file_says_so():
    widths = lambda budget: latent_codec.new_model("latent", 32, 32, 3, budget).spec["widths"]
    (tiny, tiny_hidden), (small, small_hidden) = latent_codec.HIDDEN_BY_BUDGET
    assert widths(0) == widths(tiny - 1) == [7, *tiny_hidden, 3] == [7, 12, 3]
    assert widths(tiny) == widths(small - 1) == [7, *small_hidden, 3] == [7, 22, 3]
    assert widths(small) == widths(1e9) == [7, *latent_codec.HIDDEN, 3] == [7, 48, 3]
    assert latent_codec.new_model("latent-kan", 32, 32, 3, 10).spec["widths"] == [7, 10, 3]  # the KAN keeps its shape
    result = compress_image(as_image(photo_crop(48)), 1.0, CompressConfig(model="latent", steps=30))  # 288 bytes
    assert result.spec["widths"] == [7, 12, 3] and decode_model(result.data).model.spec == result.spec


def test_a_file_no_better_than_one_flat_colour_says_so(monkeypatch, caplog):
    """At a budget the header and synthesis all but fill, training can lose every latent (docs/
    compression.md, "The smallest budgets"): the file is one colour, and the user is told."""
    trained = latent_codec.train_latent

    def losing_the_grids(model, *args, **kwargs):
        training = trained(model, *args, **kwargs)
        with torch.no_grad():
            for grid in model.latents:
                grid.zero_()
        return training

    image = as_image(photo_crop(32))
    compress_image(image, 2.0, CompressConfig(model="latent", steps=20))
    assert "no better than one flat colour" not in caplog.text  # a file with grids: no warning
    compress_image(as_image(np.full((16, 16, 3), 90, np.uint8)), 8.0, CompressConfig(model="latent", steps=20))
    assert "no better than one flat colour" not in caplog.text  # an image of one colour: nothing to warn of
    monkeypatch.setattr(latent_codec, "train_latent", losing_the_grids)
    result = compress_image(image, 2.0, CompressConfig(model="latent", steps=20))
    assert "no better than one flat colour" in caplog.text and "ask for more bpp" in caplog.text
    assert np.ptp(decode_image(result.data).pixels.reshape(-1, 3), axis=0).max() == 0  # one colour indeed


def test_a_higher_rate_buys_a_better_image():
    image = as_image(photo_crop(48))
    low = compress_image(image, 0.8, CompressConfig(model="latent", steps=300))
    high = compress_image(image, 3.0, CompressConfig(model="latent", steps=300))
    assert high.bpp > low.bpp and high.psnr > low.psnr


def test_kan_and_siren_files_keep_version_2_so_older_readers_still_read_them():
    kan = build_model("kan", widths=[2, 4, 3], grids=[6, 3], grid_kind="uniform", directions=0, levels=0)
    assert encode_model(kan, ImageInfo(6, 5, 3), QuantConfig(7))[4] == 2


def with_checksum(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_damaged_and_crafted_latent_files_are_refused_with_one_line():
    data = encode_model(latent_like(), ImageInfo(13, 21, 3), QuantConfig(8))
    body = bytearray(data[:-4])
    header = kimg.read(data)
    crafted = []
    as_version_2 = bytearray(body)
    as_version_2[4] = 2  # the latent family did not exist in version 2
    crafted.append(with_checksum(bytes(as_version_2)))
    position = body.index(bytes([header.spec["widths"][0], 8, 3]), 5) - 1  # layers u8, then the widths
    too_wide = bytearray(body)
    too_wide[position + 2] = 0x7F  # a 127-wide hidden layer but no matching tensors: fails later
    crafted.append(with_checksum(bytes(too_wide)))
    crafted.append(with_checksum(bytes(body) + b"\x00\x00\x00\x00"))  # bytes after the coded data
    for position in range(0, len(data), 3):
        flipped = bytearray(data)
        flipped[position] ^= 0x04
        crafted.append(bytes(flipped))
    for bad in crafted:
        with pytest.raises(KanimgError) as info:
            decode_image(bad)
        assert "\n" not in str(info.value)


def test_a_grid_with_an_empty_alphabet_is_refused():
    data = encode_model(latent_like(), ImageInfo(13, 21, 3), QuantConfig(8))
    header = kimg.read(data)
    body = bytearray(data[:-4])
    position = body.index(bytes([header.spec["widths"][0], 8, 3]), 5) + 3  # the first grid's largest magnitude
    assert body[position] == header.levels[0].limit
    body[position] = 0
    with pytest.raises(KanimgError, match="latent range 0"):
        decode_image(with_checksum(bytes(body)))


@pytest.mark.parametrize("buckets, message", [([(7, 1)], "bucket counts"), ([(1, 0)], "bucket counts"),
                                              ([(1, 1)] * 17, "17 nested stages"),
                                              ([(1, 1)] * 6, "6 nested stages for a latent grid of side 21")])
def test_nesting_outside_the_format_is_refused(buckets, message):
    parsed = kimg.read(encode_model(latent_like(), ImageInfo(13, 21, 3), QuantConfig(8)))
    model = parsed.levels[0].models[0]
    parsed.levels[0] = kimg.LatentLevel(parsed.levels[0].limit, [model] * (1 + sum(map(sum, buckets))), buckets)
    with pytest.raises(KanimgError, match=message):
        kimg.read(kimg.write(parsed))


def test_too_many_levels_or_a_huge_synthesis_is_refused_before_decoding():
    for widths in ([11, 4, 3], [4, 300, 3], [4] + [4] * 9 + [3]):
        body = bytearray(b"KIMG\x03") + bytes([8, 8, 3, 8, 0, 3, len(widths) - 1]) + bytes()
        body += b"".join(kimg._varint(w) for w in widths)
        with pytest.raises(KanimgError, match="malformed .kimg file"):
            kimg.read(with_checksum(bytes(body)))


def test_cli_compresses_and_decodes_with_the_latent_model(tmp_path):
    from unittest import mock

    from kanimg.compress.bitstream import DecodedImage

    source = tmp_path / "crop.png"
    Image.fromarray(photo_crop(40)).save(source)
    out = tmp_path / "crop.kimg"
    assert main(["compress", str(source), "--model", "latent", "--bpp", "2", "--steps", "100", "-o", str(out), "-q"]) == 0
    no_floats = property(lambda self: pytest.fail("decode made a float copy of the image to write it"))
    with mock.patch.object(DecodedImage, "pixels", no_floats):  # the PNG is written from the integers
        assert main(["decode", str(out), "-o", str(tmp_path / "back.png")]) == 0
    with Image.open(tmp_path / "back.png") as back:
        assert back.size == (40, 40)
        assert np.array_equal(np.asarray(back), decode_image(out.read_bytes()).integers)


def test_a_latent_file_decodes_the_same_in_a_fresh_process(tmp_path):
    data = encode_model(latent_like(), ImageInfo(13, 21, 3), QuantConfig(8))
    path = tmp_path / "x.kimg"
    path.write_bytes(data)
    code = ("import sys, torch; torch.set_num_threads(1); from kanimg.compress.api import decode; "
            "sys.stdout.buffer.write(decode(sys.argv[1]).tobytes())")
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True).stdout
    assert other == decode_image(data).pixels.tobytes()


def test_float16_weights_are_refused_for_the_latent_model():
    with pytest.raises(KanimgError, match="integer weights"):
        CompressConfig(model="latent", bits=16)


def test_the_synthesis_precision_keeps_the_file_within_the_budget_when_it_can(monkeypatch):
    from kanimg.compress import latent_codec

    model = latent_like()
    image = as_image(np.random.default_rng(0).random((13, 21, 3)).astype(np.float32))
    info = ImageInfo(13, 21, 3)
    sizes = {bits: len(encode_model(model, info, QuantConfig(bits))) for bits in latent_codec.WEIGHT_BITS}
    budget = sorted(sizes.values())[2]  # only the three smallest files fit
    data, bits, _ = latent_codec.best_synthesis_bits(model, image, info, 0.0, budget)  # λ = 0: quality alone
    assert len(data) <= budget and sizes[bits] <= budget
    assert data == encode_model(model, info, QuantConfig(bits))  # the grids coded once for every candidate: the same file
    data, bits, _ = latent_codec.best_synthesis_bits(model, image, info, 0.0, 10)  # nothing fits: the smallest file
    assert len(data) == min(sizes.values())


def test_rate_control_counts_the_whole_file_header_included(monkeypatch):
    """On a small image the header (entropy models, tensor headers) is a large share of the
    file: the controller must steer the file's own size, not the differentiable rate alone
    (which lands this file at 1.05-1.09 bpp)."""
    monkeypatch.setattr(latent_codec, "LAMBDA_RATE", 0.1)  # settle within a short run
    monkeypatch.setattr(latent_codec, "CALIBRATE_EVERY", 50)
    image = as_image(photo_crop(64))
    info = ImageInfo(64, 64, 3)
    model = LatentImage(64, 64, [5, 8, 3])
    training = latent_codec.train_latent(model, image, 1.0, steps=800)
    actual = latent_codec.file_bpp(model, info, training.synthesis_bits)
    weights = training.synthesis_bits * sum(p.numel() for p in model.synthesis_parameters())
    estimate = latent_codec.rounded_rate(model, info.pixels) + weights / info.pixels
    assert actual > estimate + 0.05  # the header is there, and the differentiable rate leaves it out
    assert 0.85 <= actual <= 1.0


def test_lambda_moves_at_its_own_rate_in_the_rounding_phase(monkeypatch):
    """By the rounding phase the learning rate has decayed and the rate answers λ slowly, so λ
    moves ROUNDING_LAMBDA_RATE per step there: with LAMBDA_RATE at 0 it stays put through the
    noise phase and climbs in the rounding phase on a file far over its budget."""
    monkeypatch.setattr(latent_codec, "LAMBDA_RATE", 0.0)
    monkeypatch.setattr(latent_codec, "ROUNDED_FRACTION", 0.2)
    image, finals, default = as_image(photo_crop(16)), {}, latent_codec.ROUNDING_LAMBDA_RATE
    for rate in (0.0, default):
        monkeypatch.setattr(latent_codec, "ROUNDING_LAMBDA_RATE", rate)
        model = LatentImage(16, 16, [5, 8, 3])  # 2 bpp of synthesis weights alone: far over 0.01 bpp
        finals[rate] = latent_codec.train_latent(model, image, 0.01, steps=50, measure_files=False).lambda_final
    assert finals[0.0] == latent_codec.LAMBDA_START
    assert finals[default] > 5 * latent_codec.LAMBDA_START  # 10 steps of e^(0.05 · log(> 100))


def test_lambda_stops_at_its_ceiling_on_a_budget_it_cannot_meet(monkeypatch):
    """Where the header and the synthesis all but fill the budget, λ grew without bound and
    training lost every latent (docs/compression.md, "The smallest budgets"): it stops at LAMBDA_MAX."""
    image, finals = as_image(photo_crop(16)), {}
    for ceiling in (0.05, float("inf")):
        monkeypatch.setattr(latent_codec, "LAMBDA_MAX", ceiling)
        model = LatentImage(16, 16, [5, 8, 3])  # 2 bpp of synthesis weights alone: far over 0.01 bpp
        finals[ceiling] = latent_codec.train_latent(model, image, 0.01, steps=50, measure_files=False).lambda_final
    assert finals[0.05] == 0.05 < finals[float("inf")]


def test_the_rounding_phase_trains_through_the_precision_the_file_will_choose(monkeypatch):
    """At 0.1 bpp the file's choice (MSE + λ · rate) often falls on 6 or 6.5 bits: training
    picks it half-way and fake-quantises to it in the rounding phase."""
    picked, seen = [], []
    real_choice = latent_codec.best_synthesis_bits

    def choice(*args):
        data, _, decoded = real_choice(*args)
        picked.append(args[3:])  # λ, budget
        return data, 9, decoded

    monkeypatch.setattr(latent_codec, "best_synthesis_bits", choice)
    model = LatentImage(16, 16, [5, 8, 3])
    real_quantized = model.quantized_synthesis
    monkeypatch.setattr(model, "quantized_synthesis", lambda bits: seen.append(bits) or real_quantized(bits))
    training = latent_codec.train_latent(model, as_image(photo_crop(16)), 2.0, steps=50)
    assert len(picked) == 1 and picked[0][1] == float("inf")  # chosen once, by λ alone
    rounding_steps = sum(step >= (1 - latent_codec.ROUNDED_FRACTION) * 50 for step in range(50))
    assert rounding_steps > 0 and seen == [9] * rounding_steps and training.synthesis_bits == 9  # the rounding phase


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_latents_learn_at_their_own_rate(scale, monkeypatch):
    """Adam's first step moves every parameter with a gradient by its rate (m / √v = ±1): the
    grids by LATENT_LR_SCALE · LR, the synthesis and the rate model by LR."""
    monkeypatch.setattr(latent_codec, "LATENT_LR_SCALE", scale)
    torch.manual_seed(0)
    model = LatentImage(16, 16, [5, 8, 3])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    latent_codec.train_latent(model, as_image(photo_crop(16)), 1.0, steps=1, measure_files=False)
    moves = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    lr = latent_codec.LR
    for name, move in moves.items():
        assert move == pytest.approx(lr * scale if name.startswith("latents.") else lr, rel=1e-3), name


@pytest.mark.parametrize("model, bpp", [("latent", "2"), ("kan", "8")])
def test_an_interrupted_compress_continues_from_its_kept_state_to_the_same_bytes(model, bpp, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a kill) after step 60 of 100: the state kept beside the output brings the
    same command back to that step, and the file is byte for byte the uninterrupted one's."""
    source = tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)).save(source)
    args = ["compress", str(source), "--model", model, "--bpp", bpp, "--steps", "100", "--qat-steps", "0", "-q"]
    assert main(args + ["-o", str(tmp_path / "whole.kimg")]) == 0
    state = tmp_path / ".cut.kimg.partial.pt"
    assert not (tmp_path / ".whole.kimg.partial.pt").exists()  # removed once the file is written

    monkeypatch.setattr(resume, "CHECKPOINT_SECONDS", 0.0)  # kept after every step
    real_keep, kept = resume.keep_state, []

    def keep_then_stop_at_60(*a, **k):
        assert real_keep(*a, **k)
        kept.append(1)
        if len(kept) == 60:
            raise KeyboardInterrupt
        return True

    monkeypatch.setattr(resume, "keep_state", keep_then_stop_at_60)
    assert main(args + ["-o", str(tmp_path / "cut.kimg")]) == 130
    assert not (tmp_path / "cut.kimg").exists() and state.is_file()
    capsys.readouterr()
    kept.clear()
    monkeypatch.setattr(resume, "keep_state", lambda *a, **k: kept.append(1) or real_keep(*a, **k))
    assert main(args[:-1] + ["-o", str(tmp_path / "cut.kimg")]) == 0
    assert len(kept) == 40 + (model == "kan")  # steps 61 … 100 (the first 60 were not trained again); the KAN's bit allocation
    assert "stopped at step 60 of 100" in capsys.readouterr().err
    assert (tmp_path / "cut.kimg").read_bytes() == (tmp_path / "whole.kimg").read_bytes()
    assert not state.exists()

    state.write_bytes(b"damaged")  # a state that is not this training's is trained over
    assert main(args + ["-o", str(tmp_path / "cut.kimg"), "--force"]) == 0
    assert (tmp_path / "cut.kimg").read_bytes() == (tmp_path / "whole.kimg").read_bytes()


@pytest.mark.parametrize("model, bpp", [("latent", "2"), ("kan", "8")])
def test_ctrl_c_keeps_the_step_it_came_in_and_the_same_command_goes_on_from_there(model, bpp, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the first 30 s of an encode had kept nothing (the state is kept every 30 s):
    now it stops at the end of the step it came in, once that step's state is kept."""
    import os
    import signal

    from kanimg.train import Trainer

    source = tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)).save(source)
    args = ["compress", str(source), "--model", model, "--bpp", bpp, "--steps", "100", "--qat-steps", "0", "-q"]
    assert main(args + ["-o", str(tmp_path / "whole.kimg")]) == 0
    calls = []

    def ctrl_c_on_the_third(real):
        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # arrives inside a step
            return real(*a, **k)
        return wrapped

    if model == "latent":  # called every 10 steps: the third at step 20 (of 0 … 99)
        monkeypatch.setattr(latent_codec, "rounded_rate", ctrl_c_on_the_third(latent_codec.rounded_rate))
        stopped_at = 21
    else:  # called before every step: the third before step 3 (of 1 … 100)
        monkeypatch.setattr(Trainer, "_before_step", ctrl_c_on_the_third(Trainer._before_step))
        stopped_at = 3
    assert main(args + ["-o", str(tmp_path / "cut.kimg")]) == 130
    assert not (tmp_path / "cut.kimg").exists() and (tmp_path / ".cut.kimg.partial.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's own again
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args[:-1] + ["-o", str(tmp_path / "cut.kimg")]) == 0
    assert f"stopped at step {stopped_at} of 100" in capsys.readouterr().err
    assert (tmp_path / "cut.kimg").read_bytes() == (tmp_path / "whole.kimg").read_bytes()


def test_a_ctrl_c_after_the_last_step_still_stops_and_an_ignored_one_stays_ignored(tmp_path):
    """Ctrl-C held for the end of a step that never comes (a resumed training with no step left
    warms up, then returns) stops the encode when the training ends, instead of being lost; a
    process that ignores SIGINT (a background job) goes on ignoring it."""
    import os
    import signal

    keeper = resume.StateKeeper(None, {})
    with pytest.raises(KeyboardInterrupt):
        with keeper.holding_interrupts():
            os.kill(os.getpid(), signal.SIGINT)  # held: no keeper call follows
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        keeper = resume.StateKeeper(None, {})
        with keeper.holding_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            keeper(False, dict)
        assert not keeper.interrupted and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_is_held_to_the_step_end_where_the_command_line_handles_it(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (before its SIGKILL) keeps the step it came in, as Ctrl-C does."""
    import os
    import signal

    source = tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)).save(source)
    args = ["compress", str(source), "--bpp", "2", "--steps", "100", "-q", "-o", str(tmp_path / "cut.kimg")]
    real, calls = latent_codec.rounded_rate, []

    def terminate_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(latent_codec, "rounded_rate", terminate_on_the_third)
    assert main(args) == 130
    state = torch.load(tmp_path / ".cut.kimg.partial.pt", weights_only=True)
    assert state["step"] == 21 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----------------------------------------------------------------------------- the order-1 KAN synthesis (latent-kan)
def kan_latent_like(seed=0) -> LatentImage:
    """latent_like's grids under an order-1 KAN synthesis 5 → 6 → 3 on 4 then 3 intervals of
    ±2.5 and ±1.5, values at the knots far from linear and inputs reaching past the knots."""
    grids = latent_like(seed=seed)
    torch.manual_seed(seed)
    model = LatentImage(13, 21, [5, 6, 3], "kan", (4, 3), (2.5, 1.5))
    with torch.no_grad():
        for ours, theirs in zip(model.latents, grids.latents):
            ours.copy_(theirs * 3)
        for layer in model.synthesis:
            layer.values.normal_(0, 0.5)
    return model


def test_the_order_1_kan_layer_is_linear_interpolation_of_its_knot_values_per_edge():
    torch.manual_seed(0)
    layer = latent.HatKANLayer(3, 2, 4, 2.0)
    x = torch.tensor([[-3.0, -2.0, 0.3], [-0.7, 1.99, 2.5], [0.0, 1.0, -1.25]])  # pixels: outside, on and between knots
    knots, values = np.linspace(-2, 2, 5), layer.values.detach().numpy()
    weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    expected = np.array([[bias[o] + sum(np.interp(float(row[i]), knots, values[o, i]) + weight[o, i] * float(row[i]) for i in range(3))
                          for o in range(2)] for row in x])  # np.interp is constant beyond the ends, as the layer's splines are
    assert np.allclose(layer(x.T).detach().numpy().T, expected, atol=1e-6)  # channels first


def hat_basis(x: torch.Tensor, grid: int, reach: float) -> torch.Tensor:
    """The reference: (I, N) → (I, grid + 1, N), every hat traced by autograd through clamp,
    abs and relu: max(0, 1 − |clamp(x, −reach, reach) − knot| / spacing)."""
    step = 2 * reach / grid
    knots = torch.tensor([-reach + g * step for g in range(grid + 1)], dtype=x.dtype)
    return torch.relu(1 - (x.clamp(-reach, reach)[:, None, :] - knots[:, None]).abs() / step)


def test_the_training_hats_are_the_traced_hats_and_their_gradient_is_the_finite_difference():
    """The training's hats (written in place, gradient read from the two nonzero ones) against
    every hat traced by autograd, and their gradient against finite differences (torch's
    gradcheck), inputs between knots, inside and beyond the reach, on two grids."""
    torch.manual_seed(0)
    for grid, reach in ((2, 3.0), (6, 2.0)):
        x = torch.empty(4, 301, dtype=torch.float64).uniform_(-1.5 * reach, 1.5 * reach)
        step = 2 * reach / grid
        away = ((x + reach) / step - ((x + reach) / step).round()).abs() > 1e-3  # finite differences straddle no kink
        x = torch.where(away, x, x + 0.01).requires_grad_()
        assert torch.equal((x.abs() > reach).any(1), torch.ones(4, dtype=torch.bool))  # some inputs beyond the reach
        hats = latent.training_hats(x, grid, reach)
        assert torch.allclose(hats, hat_basis(x, grid, reach), atol=1e-12)
        assert torch.autograd.gradcheck(lambda v: latent.training_hats(v, grid, reach), (x,), eps=1e-6, atol=1e-6)
        weights = torch.randn_like(hats)
        ours, = torch.autograd.grad((hats * weights).sum(), x)
        traced, = torch.autograd.grad((hat_basis(x, grid, reach) * weights).sum(), x)
        assert torch.allclose(ours, traced, atol=1e-12) and ours.abs().max() > 0


def test_the_kan_edges_as_linear_pieces_are_numpys_interp_plus_the_linear_term():
    """Each edge's piece (looked up once per input) as slope · x + intercept, against w·x plus
    numpy's piecewise-linear interp through the knot values (constant beyond the reach), at
    inputs between the knots, exactly on them, on the reach and beyond it, on two grids."""
    torch.manual_seed(0)
    for grid, reach in ((2, 3.0), (6, 2.0)):
        weight = torch.randn(4, 3, dtype=torch.float64)
        values = torch.randn(4, 3, grid + 1, dtype=torch.float64)
        knots = np.linspace(-reach, reach, grid + 1)
        x = torch.cat([torch.empty(3, 200, dtype=torch.float64).uniform_(-2 * reach, 2 * reach),
                       torch.tensor(knots).expand(3, -1)], 1)
        slopes, intercepts = latent.kan_pieces(weight, values, grid, reach)
        piece = latent.kan_piece(x, grid, reach)
        assert piece.min() == 0 and piece.max() == grid + 1  # both ends beyond the reach are used
        for o in range(4):
            for i in range(3):
                ours = slopes[o, i][piece[i]] * x[i] + intercepts[o, i][piece[i]]
                expected = weight[o, i].item() * x[i].numpy() + np.interp(x[i].numpy(), knots, values[o, i].numpy())
                assert np.allclose(ours.numpy(), expected, atol=1e-12)


def test_training_the_synthesis_slice_by_slice_gives_the_whole_images_output_and_gradients(monkeypatch):
    """Slices of 50 pixels (273 in all, the last slice short), recomputed in the backward pass,
    against plain autograd over the whole image, for both syntheses, with the straight-through
    rounding and the fake-quantised weights of the rounding phase; an MLP of two hidden layers and a
    synthesis of two Linear layers with no ReLU between them (not relu_mlp's, so not the
    written-out ReLU backward)."""
    linear = latent_like()
    linear.synthesis = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 3))
    for model in (latent_like(), latent_like(widths=(5, 6, 4, 3)), kan_latent_like(), linear):
        weights = model.quantized_synthesis(8) if model is not linear else {}  # a synthesis no file stores
        results = []
        for pixels in (10**9, 50):
            monkeypatch.setattr(latent, "SLICE_PIXELS", pixels)
            model.zero_grad()
            torch.manual_seed(1)
            out, bits = model("ste", weights)
            ((out - 0.3).square().mean() + bits / 1e4).backward(retain_graph=True)
            results.append([out.detach(), *(p.grad.clone() for p in model.parameters())])
        for whole, sliced in zip(*results):
            assert whole.abs().max() > 0 and torch.allclose(whole, sliced, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("like", ["latent_like", "kan_latent_like"])
def test_the_decoder_synthesises_a_tile_of_pixels_at_a_time_to_the_same_integers(like, monkeypatch):
    """The decoder holds one tile's activations, not the whole image's (a 6-megapixel file
    decoded in 1.3 GB instead of 5.9), however wide the image: each pixel is computed on its
    own, so every tile size gives the same image."""
    data = encode_model(globals()[like](), ImageInfo(13, 21, 3), QuantConfig(9))
    whole, model = decode_image(data).integers, decode_model(data).model
    for tile in (21, 50, 7, 1):  # a row, two rows and a part, a third of a row, a pixel
        monkeypatch.setattr(latent, "LATENT_TILE_PIXELS", tile)
        tiles = [pixels for pixels, _ in latent.synthesis_tiles(model.integer_latents(), stored_arrays(model), 13, 21,
                                                                model.spec.get("grids"), model.spec.get("reaches"))]
        assert len(tiles) == -(-13 * 21 // tile) and max(t.stop - t.start for t in tiles) == tile and tiles[-1].stop == 13 * 21
        assert np.array_equal(decode_image(data).integers, whole)


def test_an_image_too_large_for_the_latent_decoder_is_refused_before_training_and_auto_takes_the_kan():
    """A latent file of a 24-megapixel photo would need 3.1 GiB to decode: refused before any
    training (the decoder would refuse the file at the end), and a bare compress takes the
    KAN codec, whose network is sized to what its decoder may run."""
    from kanimg.compress import kimg, sizing

    huge, phone = ImageInfo(4000, 6000, 3, 8), ImageInfo(3024, 4032, 3, 8)
    with pytest.raises(KanimgError, match="too large for a latent file: decoding it would take 3.1 GiB"):
        latent_codec.check_latent_budget("latent", huge, 0.3, CompressConfig(model="latent"))
    assert latent_codec.too_large("latent", phone, 0.3) == ""  # a 12-megapixel phone photo is not
    assert neural.default_model(huge, 0.3, CompressConfig()) == "kan"
    assert neural.default_model(phone, 0.3, CompressConfig()) == "latent"
    for family, bits in (("kan", 8), ("siren", 16.0)):
        for bpp in (0.3, 4.0):
            sized = sizing.size_model(family, huge, bpp, QuantConfig(bits))
            macs, memory = kimg.decode_cost(sized.spec, 4000, 6000, 3)
            assert macs <= kimg.DECODE_LIMITS.macs and memory <= kimg.DECODE_LIMITS.bytes
            assert macs > 0.9 * kimg.DECODE_LIMITS.macs  # the largest network the decoder takes, not a smaller one
            assert sized.capped and sized.estimated_bytes < 0.5 * sized.budget_bytes  # said with a warning
        assert not sizing.size_model(family, ImageInfo(512, 768, 3, 8), 4.0, QuantConfig(bits)).capped


def test_the_kan_synthesis_decoder_is_an_independent_piecewise_linear_evaluation_at_any_thread_count():
    """Each edge of an order-1 KAN layer is w·x plus the piecewise-linear function through its
    values at the knots, constant beyond them: numpy's interp written out per edge."""
    model = kan_latent_like()
    data = encode_model(model, ImageInfo(13, 21, 3), QuantConfig(9))
    decoded = decode_model(data)
    grids, tensors = decoded.model.integer_latents(), stored_arrays(decoded.model)
    x = np.stack([keys_bicubic(g, 13, 21) for g in grids], -1).reshape(-1, 5)
    for layer, reach in enumerate((2.5, 1.5)):
        assert np.abs(x).max() > reach  # some inputs lie beyond the knots
        weight, values, bias = tensors[3 * layer : 3 * layer + 3]
        knots = np.linspace(-reach, reach, values.shape[-1])
        out = x @ weight.T + bias
        for o in range(weight.shape[0]):
            for i in range(weight.shape[1]):
                out[:, o] += np.interp(x[:, i], knots, values[o, i])
        x = out
    ours = synthesise(grids, tensors, 13, 21, (4, 3), (2.5, 1.5))
    assert np.allclose(ours.reshape(-1, 3), x, atol=1e-12)
    trained, _ = decoded.model("round")  # the training forward (float64 here) is the decoder
    assert np.allclose(trained.detach().numpy().T, x, atol=1e-12)
    images = decoded_at_one_and_two_threads(data)
    assert np.array_equal(images[0], images[1])
    assert np.array_equal(images[0], np.round(np.clip((x.reshape(13, 21, 3) + 1) / 2, 0, 1) * 255))


def test_a_kan_synthesis_file_is_version_7_and_round_trips_to_the_same_bytes():
    model = kan_latent_like()
    data = encode_model(model, ImageInfo(13, 21, 3), QuantConfig(8))
    assert data[4] == 7 and encode_model(latent_like(), ImageInfo(13, 21, 3), QuantConfig(8))[4] == 5
    decoded = decode_model(data)
    assert decoded.model.spec == model.spec == {"name": "latent", "widths": [5, 6, 3], "synthesis": "kan", "grids": [4, 3], "reaches": [2.5, 1.5]}
    for original, restored in zip(stored_arrays(model), stored_arrays(decoded.model)):
        assert np.array_equal(restored, quantize_tensor(original, QuantConfig(8)).dequantize())
    assert encode_model(decoded.model, ImageInfo(13, 21, 3), QuantConfig(8)) == data


def test_a_kan_synthesis_of_one_grid_and_the_first_reaches_is_still_written_as_version_6():
    """The lowest version that holds a file: version 6's one grid and fixed reaches."""
    model = LatentImage(13, 21, [5, 6, 3], "kan", (4, 4), kimg.V6_KAN_REACHES)
    with torch.no_grad():
        for ours, theirs in zip(model.latents, latent_like().latents):
            ours.copy_(theirs)
    data = encode_model(model, ImageInfo(13, 21, 3), QuantConfig(8))
    assert data[4] == 6 and decode_model(data).model.spec == model.spec


@pytest.mark.parametrize("header, message", [(bytes([2, 4, 10]), "latent synthesis kind"), (bytes([1, 0, 10]), "KAN synthesis grid 0"),
                                             (bytes([1]) + kimg._varint(kimg.MAX_KAN_GRID + 1) + bytes([10]), "KAN synthesis grid"),
                                             (bytes([1, 4, 0]), "KAN synthesis reach 0"), (bytes([0]), "malformed")],
                         ids=["kind 2", "grid 0", "grid 65", "reach 0", "an MLP"])
def test_a_crafted_kan_synthesis_header_is_refused_with_one_line(header, message):
    data = encode_model(kan_latent_like(), ImageInfo(13, 21, 3), QuantConfig(8))
    body = bytearray(data[:-4])
    position = body.index(bytes([5, 6, 3]), 5) + 3  # after the widths: the synthesis kind, then each layer's grid and reach
    assert body[position : position + 5] == bytes([1, 4, 10, 3, 6])
    body[position : position + 3] = header  # 0: an MLP, then garbage
    with pytest.raises(KanimgError, match=message) as info:
        decode_image(with_checksum(bytes(body)))
    assert "\n" not in str(info.value)
    as_version_5 = bytearray(data[:-4])
    as_version_5[4] = 5  # version 5 has no synthesis kind: its bytes are read as the first grid's
    with pytest.raises(KanimgError, match="malformed"):
        decode_image(with_checksum(bytes(as_version_5)))


def test_cli_compresses_with_the_kan_synthesis_and_rd_runs_it(tmp_path):
    source = tmp_path / "crop.png"
    Image.fromarray(photo_crop(40)).save(source)
    out = tmp_path / "crop.kimg"
    assert main(["compress", str(source), "--model", "latent-kan", "--bpp", "2", "--steps", "60", "-o", str(out), "-q"]) == 0
    data = out.read_bytes()
    assert data[4] in (7, 8) and kimg.read(data).spec["widths"] == [latent_codec.LEVELS, *latent_codec.KAN_HIDDEN, 3]
    assert main(["decode", str(out), "-o", str(tmp_path / "back.png")]) == 0
    with Image.open(tmp_path / "back.png") as back:
        assert np.array_equal(np.asarray(back), decode_image(data).integers)
    assert main(["rd", str(source), "--models", "latent-kan", "--codecs", "jpeg", "--bpp", "2", "--steps", "30",
                 "-o", str(tmp_path / "rd"), "-q"]) == 0


def test_the_kan_codecs_allocation_and_fine_tuning_continue_after_an_interruption(tmp_path, monkeypatch, capsys):
    """The KAN codec's phases after training (the bit allocation, the fine-tuning) took minutes
    on a 768×512 photo and started over after a kill: now a kill in the fine-tuning brings the
    same command back to its kept step, without allocating again, to the uninterrupted file's bytes."""
    from kanimg.compress import neural

    source = tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)).save(source)
    args = ["compress", str(source), "--model", "kan", "--bpp", "8", "--steps", "30", "--qat-steps", "20", "-q"]
    assert main(args + ["-o", str(tmp_path / "whole.kimg")]) == 0
    state = tmp_path / ".cut.kimg.partial.pt"

    monkeypatch.setattr(resume, "CHECKPOINT_SECONDS", 0.0)  # kept after every step
    real_keep, real_allocate, allocations = resume.keep_state, neural.allocate, []
    monkeypatch.setattr(neural, "allocate", lambda *a, **k: allocations.append(1) or real_allocate(*a, **k))

    def keep_then_stop_in_fine_tuning(*a, **k):
        assert real_keep(*a, **k)
        if "qat" in k and k["qat"]["trainer"]["step"] == 12:
            raise KeyboardInterrupt
        return True

    monkeypatch.setattr(resume, "keep_state", keep_then_stop_in_fine_tuning)
    assert main(args + ["-o", str(tmp_path / "cut.kimg")]) == 130
    assert not (tmp_path / "cut.kimg").exists() and state.is_file() and allocations == [1]

    steps = []
    monkeypatch.setattr(resume, "keep_state", lambda *a, **k: steps.append(k.get("qat", {}).get("trainer", {}).get("step")) or real_keep(*a, **k))
    assert main(args + ["-o", str(tmp_path / "cut.kimg")]) == 0
    assert allocations == [1]  # the kept allocation was taken back
    assert steps == list(range(13, 21))  # fine-tuning from step 12 of 20; no write in between that lacks its state
    assert (tmp_path / "cut.kimg").read_bytes() == (tmp_path / "whole.kimg").read_bytes()
    assert not state.exists()

    # Other fine-tuning settings (more steps) do not take the kept fine-tuning's state.
    monkeypatch.setattr(resume, "keep_state", keep_then_stop_in_fine_tuning)
    assert main(args + ["-o", str(tmp_path / "cut.kimg"), "--force"]) == 130
    steps.clear()
    monkeypatch.setattr(resume, "keep_state", lambda *a, **k: steps.append(k.get("qat", {}).get("trainer", {}).get("step")) or real_keep(*a, **k))
    assert main(args[:-2] + ["25", "-q", "-o", str(tmp_path / "cut.kimg"), "--force"]) == 0
    assert steps == list(range(1, 26))
