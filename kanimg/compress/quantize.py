"""Quantisation of parameter tensors: float16 (COIN), or uniform symmetric n-bit integers
with one step size per tensor or per output channel; and its straight-through fake version
for quantisation-aware fine-tuning.

A value w becomes q = round(w / s), |q| ≤ L, with s = max|w| / L rounded *up* to float32 and
L = round(2^(n-1)) - 1 for n bits. n goes in half bits (7, 7.5, 8 …: step sizes √2 apart), so
bit allocation can spend a byte budget in finer slices than halving a step. Dequantisation
q·s is exact in float64 (an 11-bit integer times a 24-bit mantissa), so decoders agree bit
for bit, and the error is at most s/2 (``error_bound``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import KanimgError

FLOAT16 = 16  # bits = 16 means IEEE half precision, not integers
MIN_BITS, MAX_BITS = 4, 12
BIT_STEP = 0.5  # bits are multiples of this: 4, 4.5, … 12
GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class QuantConfig:
    """How parameters are stored.

    Attributes:
        bits: 4 … 12 in steps of BIT_STEP for uniform integers, or 16 for float16.
        granularity: "tensor" (one step size per tensor) or "channel" (one per output
            channel, i.e. per row of the tensor's first axis); ignored for float16.
    """

    bits: float = 8
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        if self.bits != FLOAT16 and not (MIN_BITS <= self.bits <= MAX_BITS and float(self.bits / BIT_STEP).is_integer()):
            raise KanimgError(f"quantisation bits must be {MIN_BITS}…{MAX_BITS} in steps of {BIT_STEP} or {FLOAT16} (float16), "
                              f"got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise KanimgError(f"quantisation granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    @property
    def is_float16(self) -> bool:
        return self.bits == FLOAT16

    @property
    def levels(self) -> int:
        """Largest integer magnitude, round(2^(n-1)) - 1: 2^(n-1) - 1 for whole bits (symmetric
        range, zero exactly representable)."""
        return round(2 ** (self.bits - 1)) - 1

    def __str__(self) -> str:
        return "float16" if self.is_float16 else f"{self.bits:g}-bit per {self.granularity}"


@dataclass
class QuantizedTensor:
    """Integers (the tensor's shape) and the float32 step size of each row (or the one step)."""

    ints: np.ndarray
    steps: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float64 values q·s, exact."""
        return self.ints.astype(np.float64) * _rows(self.steps.astype(np.float64), self.ints.ndim)


def _rows(steps: np.ndarray, ndim: int) -> np.ndarray:
    """Steps (1,) or (R,) shaped to broadcast along the first axis of an ndim-array."""
    return steps.reshape((-1,) + (1,) * (ndim - 1)) if steps.size > 1 else steps.reshape(())


def step_sizes(values: np.ndarray, config: QuantConfig) -> np.ndarray:
    """float32 step size(s) for ``values``: max|w| / levels, rounded up so no value clips."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    if config.granularity == "channel" and magnitude.ndim > 1:
        peak = magnitude.reshape(magnitude.shape[0], -1).max(axis=1)
    else:
        peak = np.array([magnitude.max() if magnitude.size else 0.0])
    if not np.all(np.isfinite(peak)):
        raise KanimgError("cannot quantise a tensor with NaN or infinite values")
    exact = peak / config.levels
    steps = exact.astype(np.float32)
    low = steps.astype(np.float64) < exact
    steps[low] = np.nextafter(steps[low], np.float32(np.inf))
    return steps


def quantize_tensor(values: np.ndarray, config: QuantConfig) -> QuantizedTensor:
    """Uniform symmetric quantisation of ``values`` (not float16)."""
    values = np.asarray(values, dtype=np.float64)
    steps = step_sizes(values, config)
    divisor = _rows(steps.astype(np.float64), values.ndim)
    with np.errstate(divide="ignore", invalid="ignore"):
        ints = np.where(divisor > 0, np.round(values / np.where(divisor > 0, divisor, 1.0)), 0.0)
    ints = np.clip(ints, -config.levels, config.levels).astype(np.int32)
    return QuantizedTensor(ints, steps)


def error_bound(quantized: QuantizedTensor) -> np.ndarray:
    """Largest possible |w - q·s| of every element: half its row's step (broadcastable)."""
    return _rows(quantized.steps.astype(np.float64), quantized.ints.ndim) / 2


def round_float16(values: np.ndarray) -> np.ndarray:
    """Values as stored in float16 (round to nearest even), refusing overflow."""
    with np.errstate(over="ignore"):
        half = np.asarray(values, dtype=np.float64).astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise KanimgError("a parameter is too large for float16 (|w| > 65504); use integer quantisation")
    return half


def fake_quantize(weight: Tensor, config: QuantConfig) -> Tensor:
    """The quantised tensor in the forward pass, the identity in the backward pass
    (straight-through estimator), so training can adapt to the rounding."""
    with torch.no_grad():
        if config.is_float16:
            rounded = weight.to(torch.float16).to(weight.dtype)
        else:
            steps = torch.as_tensor(step_sizes(weight.detach().cpu().numpy(), config), dtype=weight.dtype, device=weight.device)
            steps = steps.reshape((-1,) + (1,) * (weight.dim() - 1)) if steps.numel() > 1 else steps.reshape(())
            safe = torch.where(steps > 0, steps, torch.ones_like(steps))
            rounded = torch.clamp(torch.round(weight / safe), -config.levels, config.levels) * steps
    return weight + (rounded - weight).detach()
