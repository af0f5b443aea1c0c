"""Bjøntegaard delta metrics: the average PSNR gain (BD-PSNR) and the average bit-rate change
at equal PSNR (BD-rate) of one rate–distortion curve against another.

Each curve is reduced to its Pareto frontier (a setting that another beats on both rate and
PSNR is one nobody would pick) and interpolated piecewise by monotone cubics (PCHIP, as in the
JCT-VC / JVET common test conditions): PSNR as a function of log-rate for BD-PSNR, log-rate
as a function of PSNR for BD-rate. The difference is integrated over the interval both
curves cover. VCEG-M33's single cubic per curve is not used: fitted to a classic codec's
25-setting quality sweep it strays from the points at the ends of a short overlap, where it
gave a BD-rate and a BD-PSNR of opposite signs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

MIN_POINTS = 4  # measured settings a curve needs, as in VCEG-M33


def frontier(rates: Sequence[float], psnrs: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """The curve's Pareto frontier as (log-rate, PSNR), both strictly increasing; None when
    fewer than MIN_POINTS distinct rates were measured or fewer than two settings remain."""
    rates, psnrs = np.asarray(rates, dtype=np.float64), np.asarray(psnrs, dtype=np.float64)
    keep = np.isfinite(rates) & np.isfinite(psnrs) & (rates > 0)
    rates, psnrs = rates[keep], psnrs[keep]
    if np.unique(rates).size < MIN_POINTS:
        return None
    order = np.lexsort((-psnrs, rates))  # by rate, the best PSNR first among equal rates
    kept_rates, kept_psnrs = [], []
    for rate, psnr in zip(rates[order], psnrs[order]):
        if not kept_psnrs or psnr > kept_psnrs[-1]:
            kept_rates.append(rate)
            kept_psnrs.append(psnr)
    if len(kept_rates) < 2:
        return None
    return np.log(kept_rates), np.array(kept_psnrs)


def _overlap_mean_difference(x_ref: np.ndarray, y_ref: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float | None:
    """Mean over the common x-interval of (interpolated test) − (interpolated reference)."""
    low, high = max(x_ref[0], x_test[0]), min(x_ref[-1], x_test[-1])
    if not high > low:
        return None
    areas = [PchipInterpolator(x, y).integrate(low, high) for x, y in ((x_ref, y_ref), (x_test, y_test))]
    return float((areas[1] - areas[0]) / (high - low))


def bd_psnr(rates_ref: Sequence[float], psnr_ref: Sequence[float], rates_test: Sequence[float], psnr_test: Sequence[float]) -> float | None:
    """Average PSNR difference (dB, test − reference) over the common bit-rate range; None
    when a curve has fewer than MIN_POINTS measured rates or fewer than two settings on its
    frontier, or the ranges do not overlap. A frontier of two or three settings (the others
    dominated) is interpolated between those: the dominated settings were measured too."""
    ref, test = frontier(rates_ref, psnr_ref), frontier(rates_test, psnr_test)
    if ref is None or test is None:
        return None
    return _overlap_mean_difference(ref[0], ref[1], test[0], test[1])


def bd_rate(rates_ref: Sequence[float], psnr_ref: Sequence[float], rates_test: Sequence[float], psnr_test: Sequence[float]) -> float | None:
    """Average bit-rate difference (%, test relative to reference; negative = fewer bits for
    the same PSNR) over the common PSNR range; None as for :func:`bd_psnr`."""
    ref, test = frontier(rates_ref, psnr_ref), frontier(rates_test, psnr_test)
    if ref is None or test is None:
        return None
    diff = _overlap_mean_difference(ref[1], ref[0], test[1], test[0])
    return None if diff is None else float((np.exp(diff) - 1) * 100)
