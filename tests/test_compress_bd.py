"""Bjøntegaard metrics against cases with known answers and against the FAU reference
implementation (the `bjontegaard` package, PCHIP as in the JVET common test conditions)."""
import warnings

import numpy as np
import pytest

from kanimg.compress.bd import bd_psnr, bd_rate, frontier

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
    line = lambda r: 20 + 6 * np.log2(r)
    wide = np.array([0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0])
    bent = line(wide) + np.array([-6, -3, 0, 0, 0, 0, 0, 0, 0, 1, 3])  # off the line only away from the overlap
    assert bd_psnr(wide, bent, RATES, line(RATES)) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(wide, bent, RATES, line(RATES)) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(RATES, curve(RATES), RATES, curve(RATES)) == pytest.approx(0.0, abs=1e-9)


def knee(rates):
    return 20 + 3 * np.log(rates / 0.15) + 4 * np.tanh(3 * np.log(rates / 0.2))  # a classic codec's bend at low rates


def test_a_short_curve_against_a_long_sweep_reads_its_own_part_of_the_sweep():
    """Four settings of a 25-setting sweep at 10 % fewer bits are a BD-rate of −10 % wherever
    they sit; one cubic fitted to the whole sweep gave −4.7 … −16.9 % here."""
    sweep = np.geomspace(0.15, 3.0, 25)
    for start in range(0, 22, 3):
        part = sweep[start:start + 4]
        assert bd_rate(sweep, knee(sweep), part * 0.9, knee(part)) == pytest.approx(-10.0, abs=0.1)
        assert bd_psnr(sweep, knee(sweep), part * 0.9, knee(part)) > 0


def test_dominated_settings_are_left_out():
    rates, psnrs = np.append(RATES, [0.4, 0.5]), np.append(curve(RATES), [curve(0.2), curve(0.5) - 1])
    assert bd_rate(RATES, curve(RATES), rates, psnrs) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATES, curve(RATES), rates, psnrs) == pytest.approx(0.0, abs=1e-9)
    log_rates, kept = frontier(rates, psnrs)
    assert np.all(np.diff(log_rates) > 0) and np.all(np.diff(kept) > 0) and kept.size == RATES.size


def test_matches_the_reference_implementation():
    bjontegaard = pytest.importorskip("bjontegaard")  # the test extra installs it
    rng = np.random.default_rng(0)
    for _ in range(50):
        ref_rates = np.sort(rng.uniform(0.05, 2.0, rng.integers(4, 26)))
        test_rates = np.sort(rng.uniform(0.05, 2.0, rng.integers(4, 9)))
        ref_psnr = 20 + np.cumsum(rng.uniform(0.1, 2.0, ref_rates.size))  # strictly increasing: every setting on the frontier
        test_psnr = 20 + np.cumsum(rng.uniform(0.1, 2.0, test_rates.size))
        args = (ref_rates, ref_psnr, test_rates, test_psnr)
        ours = bd_rate(*args), bd_psnr(*args)
        with warnings.catch_warnings():  # it warns of short overlaps
            warnings.simplefilter("ignore")
            theirs = [f(*args, method="pchip", require_matching_points=False, min_overlap=0) for f in (bjontegaard.bd_rate, bjontegaard.bd_psnr)]
        for mine, reference in zip(ours, theirs):
            if mine is None:
                assert np.isnan(reference)
            else:
                assert mine == pytest.approx(reference, rel=1e-9, abs=1e-9)


def test_too_few_points_or_no_overlap_give_none():
    assert bd_rate(RATES[:3], curve(RATES[:3]), RATES, curve(RATES)) is None
    assert bd_psnr(RATES, curve(RATES), RATES * 100, curve(RATES * 100)) is None
    # more PSNR for fewer bits everywhere: one setting dominates the others, no curve is left
    assert bd_rate(RATES, curve(RATES), RATES, curve(RATES)[::-1]) is None
    # unmeasured settings (NaN, inf, zero rate) are left out, and with them the fourth point
    broken = np.array([0.1, 0.2, np.nan, 0.0, np.inf])
    assert bd_psnr(RATES, curve(RATES), broken, curve(RATES)) is None
    assert bd_psnr(RATES, curve(RATES), np.r_[RATES, np.nan], np.r_[curve(RATES), 40.0]) == pytest.approx(0.0, abs=1e-12)
