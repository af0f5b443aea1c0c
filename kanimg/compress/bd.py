"""Bjøntegaard delta metrics (VCEG-M33): the average PSNR gain (BD-PSNR) and the average
bit-rate change at equal PSNR (BD-rate) of one rate–distortion curve against another.

Each curve is fitted by a cubic polynomial — PSNR as a function of log-rate for BD-PSNR,
log-rate as a function of PSNR for BD-rate — and the difference is integrated over the
interval both curves cover.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.polynomial import Polynomial

MIN_POINTS = 4  # a cubic needs four points


def _overlap_mean_difference(x_ref: np.ndarray, y_ref: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float | None:
    """Mean over the common x-interval of (cubic fit of test) - (cubic fit of ref)."""
    low, high = max(x_ref.min(), x_test.min()), min(x_ref.max(), x_test.max())
    if not high > low:
        return None
    # Polynomial.fit maps x to [-1, 1] first: well conditioned however narrow the range.
    areas = []
    for x, y in ((x_ref, y_ref), (x_test, y_test)):
        integral = Polynomial.fit(x, y, 3).integ()
        areas.append(integral(high) - integral(low))
    return float((areas[1] - areas[0]) / (high - low))


def _valid(rates: Sequence[float], psnrs: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    rates, psnrs = np.asarray(rates, dtype=np.float64), np.asarray(psnrs, dtype=np.float64)
    keep = np.isfinite(rates) & np.isfinite(psnrs) & (rates > 0)
    rates, psnrs = rates[keep], psnrs[keep]
    unique = np.unique(rates)  # equal sizes (a codec's lowest qualities): keep the best PSNR once
    if unique.size < MIN_POINTS:
        return None
    return np.log(unique), np.array([psnrs[rates == r].max() for r in unique])


def bd_psnr(rates_ref: Sequence[float], psnr_ref: Sequence[float], rates_test: Sequence[float], psnr_test: Sequence[float]) -> float | None:
    """Average PSNR difference (dB, test − reference) over the common bit-rate range; None
    when a curve has fewer than four points or the ranges do not overlap."""
    ref, test = _valid(rates_ref, psnr_ref), _valid(rates_test, psnr_test)
    if ref is None or test is None:
        return None
    return _overlap_mean_difference(ref[0], ref[1], test[0], test[1])


def bd_rate(rates_ref: Sequence[float], psnr_ref: Sequence[float], rates_test: Sequence[float], psnr_test: Sequence[float]) -> float | None:
    """Average bit-rate difference (%, test relative to reference; negative = fewer bits for
    the same PSNR) over the common PSNR range; None as for :func:`bd_psnr`."""
    ref, test = _valid(rates_ref, psnr_ref), _valid(rates_test, psnr_test)
    if ref is None or test is None:
        return None
    diff = _overlap_mean_difference(ref[1], ref[0], test[1], test[0])
    return None if diff is None else float((np.exp(diff) - 1) * 100)
