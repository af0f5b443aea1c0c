"""Quantisation: the analytic error bound, exact dequantisation, float16, straight-through QAT."""
import numpy as np
import pytest
import torch

from kanimg.compress.quantize import QuantConfig, error_bound, fake_quantize, quantize_tensor, round_float16, step_sizes
from kanimg.errors import KanimgError


def weights(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(7, 5, 12)) * rng.uniform(0.01, 2, size=(7, 1, 1))  # heavy tails, rows of different scale
    w[3] = 0.0  # an all-zero channel
    return w


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [4, 4.5, 5, 6, 6.5, 7, 8, 9, 10, 11, 11.5, 12])
def test_error_is_within_half_a_step(bits, granularity):
    w = weights(int(bits))
    q = quantize_tensor(w, QuantConfig(bits, granularity))
    err = np.abs(q.dequantize() - w)
    bound = np.broadcast_to(error_bound(q), w.shape)
    assert np.all(err <= bound * (1 + 1e-12))
    assert np.abs(q.ints).max() == QuantConfig(bits).levels
    assert q.steps.dtype == np.float32 and q.steps.size == (7 if granularity == "channel" else 1)
    # the bound is tight: some element comes close to half a step
    assert err.max() > 0.4 * bound.max()


def test_channel_steps_adapt_to_each_row_and_zero_rows_stay_zero():
    w = weights()
    per_tensor = quantize_tensor(w, QuantConfig(6, "tensor"))
    per_channel = quantize_tensor(w, QuantConfig(6, "channel"))
    assert np.abs(per_channel.dequantize() - w).mean() < np.abs(per_tensor.dequantize() - w).mean()
    assert np.all(per_channel.dequantize()[3] == 0) and per_channel.steps[3] == 0


def test_dequantisation_is_exact_in_float64():
    q = quantize_tensor(weights(), QuantConfig(12, "channel"))
    exact = [float(i) * float(s) for i, s in zip(q.ints[:, 0, 0], q.steps)]  # Python floats: one rounding each
    assert list(q.dequantize()[:, 0, 0]) == exact


def test_half_bits_sit_between_whole_bits():
    whole = [QuantConfig(n).levels for n in range(4, 13)]
    assert whole == [2 ** (n - 1) - 1 for n in range(4, 13)]
    half = [QuantConfig(n + 0.5).levels for n in range(4, 12)]
    assert half == [10, 22, 44, 90, 180, 361, 723, 1447]  # round(2^(n-1/2)) - 1: steps √2 apart
    assert all(a < b < c for a, b, c in zip(whole, half, whole[1:]))
    assert str(QuantConfig(7.5)) == "7.5-bit per tensor"


def test_steps_are_rounded_up_so_the_peak_never_clips():
    w = np.array([0.1, -0.3, 0.7000001])
    for bits in np.arange(4, 12.5, 0.5):
        config = QuantConfig(bits)
        step = step_sizes(w, config)[0]
        assert float(step) * config.levels >= 0.7000001
        assert quantize_tensor(w, config).ints[2] == config.levels


def test_float16_rounds_and_refuses_overflow():
    assert round_float16(np.array([1 / 3])).dtype == np.float16
    with pytest.raises(KanimgError, match="float16"):
        round_float16(np.array([1e6]))


def test_bad_configs_are_refused():
    for bits in (3, 3.5, 7.25, 12.5, 13, 15, 32):
        with pytest.raises(KanimgError, match="bits"):
            QuantConfig(bits)
    with pytest.raises(KanimgError, match="granularity"):
        QuantConfig(8, "row")
    with pytest.raises(KanimgError, match="NaN"):
        quantize_tensor(np.array([1.0, np.nan]), QuantConfig(8))


@pytest.mark.parametrize("config", [QuantConfig(5, "channel"), QuantConfig(8), QuantConfig(16)])
def test_fake_quantize_forward_is_the_stored_value_and_backward_is_straight_through(config):
    w = torch.tensor(weights(), dtype=torch.float64, requires_grad=True)
    out = fake_quantize(w, config)
    stored = round_float16(w.detach().numpy()).astype(np.float64) if config.is_float16 else quantize_tensor(w.detach().numpy(), config).dequantize()
    assert np.array_equal(out.detach().numpy(), stored)
    (out * torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape)).sum().backward()
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape))
