"""Bjøntegaard metrics against cases with known answers."""
import numpy as np
import pytest

from kanimg.compress.bd import bd_psnr, bd_rate

RATES = np.array([0.1, 0.2, 0.3, 0.5, 1.0])


def curve(rates):
    return 18 + 4 * np.log(rates) - 0.3 * np.log(rates) ** 2  # concave, like real RD curves


def test_a_constant_rate_factor_gives_that_bd_rate():
    for factor in (0.8, 0.5, 1.25):
        assert bd_rate(RATES, curve(RATES), RATES * factor, curve(RATES)) == pytest.approx((factor - 1) * 100, abs=1e-6)


def test_a_constant_psnr_offset_gives_that_bd_psnr():
    assert bd_psnr(RATES, curve(RATES), RATES, curve(RATES) + 1.5) == pytest.approx(1.5, abs=1e-9)
    assert bd_psnr(RATES, curve(RATES), RATES, curve(RATES) - 0.7) == pytest.approx(-0.7, abs=1e-9)


def test_rate_shift_on_a_log_linear_curve_gives_the_analytic_psnr_gain():
    line = lambda r: 20 + 6 * np.log2(r)  # 6 dB per doubling
    assert bd_psnr(RATES, line(RATES), RATES / 2, line(RATES)) == pytest.approx(6.0, abs=1e-9)
    assert bd_rate(RATES, line(RATES), RATES / 2, line(RATES)) == pytest.approx(-50.0, abs=1e-9)


def test_only_the_overlap_is_integrated_and_identical_curves_give_zero():
    wide = np.geomspace(0.05, 2.0, 9)
    assert bd_psnr(wide, curve(wide), RATES, curve(RATES)) == pytest.approx(0.0, abs=1e-6)
    assert bd_rate(RATES, curve(RATES), RATES, curve(RATES)) == pytest.approx(0.0, abs=1e-9)


def test_too_few_points_or_no_overlap_give_none():
    assert bd_rate(RATES[:3], curve(RATES[:3]), RATES, curve(RATES)) is None
    assert bd_psnr(RATES, curve(RATES), RATES * 100, curve(RATES * 100)) is None
