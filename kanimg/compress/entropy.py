"""Entropy coding of quantised integers: constriction's range coder with one fitted model per
stream of integers.

Each stream gets a discrete Laplace, p(k) ∝ θ^|k-c|, or a discrete Gaussian, p(k) ∝ θ^((k-c)²),
whichever codes it in fewer bits; the model costs 3 bytes: the centre c and θ as a 16-bit
mini-float of 1 - θ (5-bit exponent, 11-bit mantissa: 1/2048 relative precision from very
peaked to very wide distributions). A latent grid's models (version 5) are compact: centre 0
and one byte, the family and 128 of those codes (θ from 2^-12 to 1 - 2^-8 at 3–12 % steps:
what a grid's streams of small integers need; their 3-byte models were up to 9 % of a file). The
probability tables are built in exact integer arithmetic — no exp() from the platform's maths
library — so encoder and decoder build the very same table on any machine, which the range
coder needs to decode at all.

zlib / bz2 / lzma on the raw integers are measured as the baseline to beat
(``general_purpose_sizes``).
"""
from __future__ import annotations

import bz2
import functools
import lzma
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import KanimgError

LAPLACE, GAUSSIAN = 0, 1
FAMILIES = {LAPLACE: "laplace", GAUSSIAN: "gaussian"}
CODE_BITS = 16  # θ's code: 1 - θ = (2048 + m) · 2^(-12-e), e = code >> 11, m = code & 2047
_MANTISSA = 11
_TOP = 1 << 52  # table weight of the centre symbol: exact in float64
_FRACTION = 48  # fixed-point fraction bits of θ and of the recurrences
MIN_PROBABILITY = 2.0**-24  # constriction's floor for symbols the table gives (almost) nothing


@dataclass(frozen=True)
class StreamModel:
    """A fitted model: family (LAPLACE or GAUSSIAN), integer centre c and θ's 16-bit code."""

    family: int
    centre: int
    code: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES or not 0 <= self.code < 1 << CODE_BITS:
            raise KanimgError(f"malformed entropy model ({self.family}, {self.centre}, {self.code})")

    @property
    def theta_fixed(self) -> int:
        """θ in units of 2^-48, exactly."""
        exponent, mantissa = self.code >> _MANTISSA, self.code & ((1 << _MANTISSA) - 1)
        return (1 << _FRACTION) - ((1 << _MANTISSA) + mantissa << (_FRACTION - _MANTISSA - 1 - exponent))

    @property
    def theta(self) -> float:
        return self.theta_fixed / 2.0**_FRACTION

    @property
    def compact(self) -> bool:
        """Whether one byte holds this model (:meth:`compact_byte`)."""
        return self.centre == 0 and self.code in _COMPACT_INDEX

    def compact_byte(self) -> int:
        return self.family << 7 | _COMPACT_INDEX[self.code]

    @classmethod
    def from_compact_byte(cls, byte: int) -> "StreamModel":
        return cls(byte >> 7, 0, int(COMPACT_CODES[byte & 0x7F]))


def _theta_codes() -> np.ndarray:
    """1 - θ of every code (float64), for choosing the code nearest a fitted θ."""
    codes = np.arange(1 << CODE_BITS)
    return ((1 << _MANTISSA) + (codes & ((1 << _MANTISSA) - 1))) * 2.0 ** (-_MANTISSA - 1 - (codes >> _MANTISSA))


_ONE_MINUS_THETA = _theta_codes()
_LOG_ONE_MINUS_THETA = np.log(_ONE_MINUS_THETA)  # once, not per fit


def _compact_codes() -> np.ndarray:
    """The 128 θ codes a compact model can hold, 1 - θ falling with the index, in exact
    integers: θ = t / 4096 for t = 1 … 7 and k · 2^s (k = 8 … 15, s = 0 … 7) and 1/2 (exponent
    0: the peaked streams of a grid's zeros), then 1 - θ at 8 steps per octave from 1/2 down
    to 2^-8 (exponents 1 … 7: the wide ones)."""
    peaked = sorted([*range(1, 8), *(k << s for s in range(8) for k in range(8, 16)), 2048])
    codes = [(1 << _MANTISSA) - t for t in peaked]  # exponent 0: θ = (2048 - m) / 4096
    codes += [e << _MANTISSA | m << (_MANTISSA - 3) for e in range(1, 8) for m in reversed(range(8))]
    return np.array(codes)


COMPACT_CODES = _compact_codes()
_COMPACT_INDEX = {int(code): index for index, code in enumerate(COMPACT_CODES)}


def _decay(model: StreamModel, length: int) -> list[int]:
    """Integer weights w[d] ∝ θ^d (Laplace) or θ^(d²) (Gaussian) for d = 0 … length-1."""
    weights = [0] * length
    w, theta = _TOP, model.theta_fixed
    if model.family == LAPLACE:
        for d in range(length):
            if w == 0:
                break
            weights[d] = w
            w = (w * theta) >> _FRACTION
    else:
        ratio, ratio_step = theta, (theta * theta) >> _FRACTION  # θ^(2d+1) and θ²
        for d in range(length):
            if w == 0:
                break
            weights[d] = w
            w = (w * ratio) >> _FRACTION
            ratio = (ratio * ratio_step) >> _FRACTION
    return weights


def probability_table(model: StreamModel, limit: int) -> np.ndarray:
    """Unnormalised probabilities (float64, exact integers) of the symbols -limit … limit."""
    if not -limit <= model.centre <= limit:
        raise KanimgError(f"malformed entropy model: centre {model.centre} outside ±{limit}")
    decay = np.array(_decay(model, 2 * limit + 1), dtype=np.float64)
    distance = np.abs(np.arange(-limit, limit + 1) - model.centre)
    return decay[distance]


def code_lengths(model: StreamModel, limit: int) -> np.ndarray:
    """Bits of each symbol -limit … limit under ``model`` (ideal code length, the coder's floor)."""
    table = probability_table(model, limit)
    return -np.log2(np.maximum(table / table.sum(), MIN_PROBABILITY))


def cost_bits(symbols: np.ndarray, model: StreamModel, limit: int) -> float:
    """Bits the range coder needs for ``symbols`` under ``model`` (ideal code length)."""
    counts = np.bincount(np.asarray(symbols).ravel() + limit, minlength=2 * limit + 1)
    used = counts > 0
    return float((counts[used] * code_lengths(model, limit)[used]).sum())


@functools.lru_cache(maxsize=8)
def _compact_lengths(limit: int) -> tuple[list[StreamModel], np.ndarray]:
    """Every compact model (Laplaces first) and its code lengths, one row each: a file's grids
    have one limit each (their largest magnitude, a few units), so each table is built once."""
    models = [StreamModel(family, 0, int(code)) for family in (LAPLACE, GAUSSIAN) for code in COMPACT_CODES]
    return models, np.stack([code_lengths(model, limit) for model in models])


def fit_model(symbols: np.ndarray, limit: int, compact: bool = False) -> StreamModel:
    """The Laplace or Gaussian (centre at the median, θ by maximum likelihood) coding
    ``symbols`` in the fewest bits; ``compact``: the model one byte holds (centre 0) that codes
    them in the fewest bits, every one of the 256 tried (a product with a cached table: the
    latent coder fits thousands of streams per file)."""
    symbols = np.asarray(symbols).ravel()
    if symbols.size == 0:
        return StreamModel(LAPLACE, 0, 0)
    counts = np.bincount(symbols + limit, minlength=2 * limit + 1).astype(np.float64)
    if compact:
        models, lengths = _compact_lengths(limit)
        return models[int(np.argmin(lengths @ counts))]
    centre = int(np.clip(np.round(np.median(symbols)), -limit, limit))
    distance = np.abs(np.arange(-limit, limit + 1) - centre).astype(np.float64)
    from scipy.optimize import minimize_scalar  # here, not at the top: the encoder's alone, and 0.45 s of every decode's start

    best = None
    for family, power in ((LAPLACE, 1), (GAUSSIAN, 2)):
        d = distance**power

        def nats(log_rate: float) -> float:  # -log-likelihood with θ = exp(-exp(log_rate))
            rate = math.exp(log_rate)
            shifted = -rate * d
            return float(-(counts * shifted).sum() + counts.sum() * np.log(np.exp(shifted).sum()))

        found = minimize_scalar(nats, bounds=(-14.0, 3.0), method="bounded", options={"xatol": 1e-4})
        log_fitted = math.log(-math.expm1(-math.exp(found.x)))
        model = StreamModel(family, centre, int(np.argmin(np.abs(_LOG_ONE_MINUS_THETA - log_fitted))))
        bits = cost_bits(symbols, model, limit)
        if best is None or bits < best[0]:
            best = (bits, model)
    return best[1]


def _categorical(model: StreamModel, limit: int):
    import constriction

    return constriction.stream.model.Categorical(probability_table(model, limit), perfect=False)


def encode_streams(streams: Sequence[np.ndarray], limits: Sequence[int], models: Sequence[StreamModel]) -> bytes:
    """Range-code every stream (integers within ±limit) with its model into one bitstream."""
    import constriction

    encoder = constriction.stream.queue.RangeEncoder()
    for symbols, limit, model in zip(streams, limits, models):
        symbols = np.asarray(symbols).ravel()
        if symbols.size:
            if np.abs(symbols).max() > limit:
                raise ValueError(f"symbol outside ±{limit}")
            encoder.encode((symbols + limit).astype(np.int32), _categorical(model, limit))
    return encoder.get_compressed().astype("<u4").tobytes()


class StreamDecoder:
    """Decodes the streams of one payload in order, one call per stream, so a stream's model
    may depend on what was decoded before it (context modelling)."""

    def __init__(self, payload: bytes) -> None:
        import constriction

        if len(payload) % 4:
            raise KanimgError("malformed .kimg payload: not a whole number of 32-bit words")
        self._decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))

    def decode(self, length: int, limit: int, model: StreamModel) -> np.ndarray:
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        try:
            symbols = self._decoder.decode(_categorical(model, limit), length)
        except Exception as exc:  # a payload that does not decode under its own models
            raise KanimgError(f"malformed .kimg payload ({' '.join(str(exc).split())})") from None
        return np.asarray(symbols, dtype=np.int64) - limit


def decode_streams(payload: bytes, lengths: Sequence[int], limits: Sequence[int], models: Sequence[StreamModel]) -> list[np.ndarray]:
    """Inverse of :func:`encode_streams`, given each stream's length."""
    decoder = StreamDecoder(payload)
    return [decoder.decode(length, limit, model) for length, limit, model in zip(lengths, limits, models)]


def general_purpose_sizes(streams: Sequence[np.ndarray]) -> dict[str, int]:
    """Bytes that zlib, bz2 and lzma (at their strongest) need for the same integers, stored
    as the narrowest little-endian type that holds them: the baseline the range coder must beat."""
    flat = np.concatenate([np.asarray(s).ravel() for s in streams]) if streams else np.zeros(0, np.int64)
    wide = flat.size and np.abs(flat).max() > 127
    raw = flat.astype("<i2" if wide else "i1").tobytes()
    return {
        "zlib": len(zlib.compress(raw, 9)),
        "bz2": len(bz2.compress(raw, 9)),
        "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    }
