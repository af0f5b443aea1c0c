"""The .kimg container: a compressed image as bytes, parsed with ``struct`` only.

Layout (docs/kimg-format.md has the full specification):

    magic "KIMG" · version u8 · image (height, width, channels, bit depth, coordinates)
    · model (family, widths, KAN grids and grid ranges | SIREN ω0 | per latent grid: its
    largest magnitude, nesting depth, bucket counts and entropy models) · quantisation (float16 or integers, granularity) · per stored tensor: bits (in
    half bits; version 1: whole bits), step sizes, transform, entropy models · payload
    · CRC-32 of every byte before it

A file carries the lowest version that holds it: 2 for KAN and SIREN, 5 for latent grids
(family 3, new in version 3, whose grids version 4 codes nested and version 5 with one-byte
entropy models) with a ReLU synthesis, 7 for latent grids with an order-1 KAN synthesis (a
grid and a reach per layer; version 6 had one grid and fixed reaches), 8 for latent grids
whose nested sets are coded as residuals of a prediction from their neighbours (either
synthesis), so older readers still read every network file they can.

Integers are little-endian; "varint" is unsigned LEB128. Reading checks, in this order: the
magic, the version, the checksum, then every field against hard limits, so a truncated,
corrupted, tampered or future file is refused with one clear message before anything is
built from it. Nothing read is ever executed (no pickle, no eval).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import KanimgError
from ..io import MAX_PIXELS
from ..models import MAX_GRID
from .entropy import FAMILIES as ENTROPY_FAMILIES
from .entropy import StreamModel
from .quantize import FLOAT16, GRANULARITIES, MAX_BITS, MIN_BITS, QuantConfig
from .tensors import Slot, parameter_count, slots

SYNTHESIS_IDS = {"mlp": 0, "kan": 1}  # version 6: the latent family's synthesis

MAGIC = b"KIMG"
VERSION = 8  # the newest this module reads
BITS_UNIT = {1: 1, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.5, 7: 0.5, 8: 0.5}  # per version: tensor bits are stored in whole (1) or half (2) bits
CHECKSUM_BYTES = 4
MODEL_IDS = {"kan": 1, "siren": 2, "latent": 3}
FIRST_VERSION = {"kan": 1, "siren": 1, "latent": 3}  # the version that introduced each family
COORDS_IDS = {"centers": 0, "linspace": 1}
MAX_TRANSFORM = 2  # differences of order 0, 1, 2 along a smooth tensor's last axis
# A decoder allocates nothing bigger than these, whatever a (crafted) header claims.
MAX_LAYERS, MAX_WIDTH, MAX_PARAMETERS = 64, 4096, 20_000_000
# Latent grids: at most this many levels, (version 3) entropy models per level, values within ±MAX_LATENT.
MAX_LEVELS, MAX_CONTEXTS, MAX_LATENT = 10, 7, 1 << 15  # contexts (version 3): 1 + len(latent.CONTEXT_EDGES)
MAX_DEPTH, MAX_BUCKETS = 16, 6  # version 4: nested stages per grid (the encoder's most; a file's also ≤ its grid's halvings), buckets per set
PREDICTION_CODES = 4  # version 8: a nested set's values predicted as code/4 × the mean of its context's four neighbours, code 0 … 4
MAX_SYNTHESIS_LAYERS, MAX_SYNTHESIS_WIDTH = 8, 256
MAX_KAN_GRID = 64  # version 6: an order-1 KAN synthesis's intervals per edge
# Version 7 stores each KAN synthesis layer's reach (its knots span ±reach) in a byte of REACH_UNITs;
# version 6 had one grid for every layer and these reaches, first layer, then every later one.
REACH_UNIT, V6_KAN_REACHES = 0.25, (12.0, 4.0)
MAX_FILE_BYTES = 2 * MAX_PARAMETERS + (16 << 20)  # float16 weights of the largest network, plus headers


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one file may cost, checked from the header before anything is built.

    Each field limit above (size, widths, grids, parameters) holds alone; these bound their
    product: ``macs`` the multiply-adds of evaluating the network at every pixel (see
    :func:`decode_cost`), ``bytes`` the memory the decoder holds at once.
    """

    macs: float = 1e13
    bytes: int = 2 << 30

    def admits(self, macs: float, memory: float) -> bool:
        """Whether a decode of this cost (:func:`decode_cost`) is within the limits."""
        return macs <= self.macs and memory <= self.bytes


DECODE_LIMITS = DecodeLimits()
TILE_VALUES = 1 << 24  # activations or spline features a decoder holds per tile (bitstream.tile_pixels)
LATENT_TILE_PIXELS = 1 << 16  # pixels a latent file's synthesis evaluates at once (latent.synthesis_tiles)
LATENT_GRID_BYTES = 64  # per pixel, a latent file's decoded grids (4/3 values a pixel) in their copies at once (34–41 measured)


def decode_cost(spec: dict, height: int, width: int, channels: int) -> tuple[float, int]:
    """(multiply-adds, bytes) to decode an image of ``spec``: every layer as a dense product of
    its feature rows and weights (an upper bound of the fused kernel's work), float64 and
    float32 copies of the network, a KAN's first-layer tables on the W + H coordinates, one
    tile of activations and the integer image."""
    widths, pixels = spec["widths"], height * width
    pairs = list(zip(widths[:-1], widths[1:]))
    if spec["name"] == "latent":  # 16-tap bicubic per level, then the synthesis tile by tile, float64
        kan = spec.get("synthesis") == "kan"  # an order-1 KAN edge: its piece's slope · x + intercept, and the sum
        macs = pixels * (16 * widths[0] + (2 if kan else 1) * sum(i * o for i, o in pairs))
        activations = (3 if kan else 2) * max(widths)  # the KAN's looked-up slopes and intercepts too
        per_pixel = LATENT_GRID_BYTES + 8 * (widths[0] + 1) + 2 * channels  # the grids, the features and one level's upsampling, the integers
        tile = 8 * LATENT_TILE_PIXELS * (3 * activations + 6 * channels)  # a tile's activations and temporaries, values, conversion
        return float(macs), int(per_pixel * pixels + tile + 16 * parameter_count(spec))
    if spec["name"] == "kan":
        grids = spec["grids"]
        first = (height + width) * (grids[0] + 4) * widths[1]
        per_pixel = widths[1] + sum(i * (g + 4) * o for (i, o), g in zip(pairs[1:], grids[1:]))
        tables = 2 * (height + width) * widths[1] * 12
    else:
        first, per_pixel, tables = 0, sum(i * o for i, o in pairs), 0
    macs = first + 2 * pixels * per_pixel  # float32 pass, then (at worst) float64 for every pixel
    memory = 12 * parameter_count(spec) + tables + 4 * 8 * TILE_VALUES + 2 * pixels * channels
    return float(macs), int(memory)


@dataclass
class ImageInfo:
    """What the decoder must know about the image: size, channels, bit depth, coordinates."""

    height: int
    width: int
    channels: int
    bit_depth: int = 8
    coords: str = "centers"

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass
class TensorHeader:
    """How one stored tensor is coded: its bits, step sizes, differencing order, one model
    per stream."""

    bits: float  # a multiple of quantize.BIT_STEP
    steps: np.ndarray  # float32, (1,) or (rows,)
    transform: int = 0
    models: list[StreamModel] = field(default_factory=list)


@dataclass
class LatentLevel:
    """One latent grid's coding (:mod:`latent`): its largest magnitude, its entropy models and,
    version 4, each nested stage's two bucket counts, coarsest first (None: version 3's
    checkerboard, whose first model is the anchors', then one per context), and, version 8,
    each stage's two prediction codes (0: none; None: none anywhere)."""

    limit: int
    models: list[StreamModel] = field(default_factory=list)
    buckets: list[tuple[int, int]] | None = None
    predictions: list[tuple[int, int]] | None = None

    @property
    def stage_codes(self) -> list[tuple[int, int]]:
        """Each nested stage's two prediction codes, 0 where none (every stage before version 8)."""
        return self.predictions or [(0, 0)] * len(self.buckets or ())

    @property
    def predicted(self) -> bool:
        return any(code for codes in self.stage_codes for code in codes)


@dataclass
class KimgFile:
    image: ImageInfo
    spec: dict  # {"name", "widths", and "grids" (KAN) or "omega0" (SIREN)}
    quant: QuantConfig  # float16, or integers (then ``quant.bits`` = the most bits of any tensor)
    grid_ranges: list[np.ndarray | None] = field(default_factory=list)  # KAN: (I, 2) float32, None = [-1, 1]
    tensors: list[TensorHeader] = field(default_factory=list)  # empty for float16
    payload: bytes = b""
    levels: list[LatentLevel] = field(default_factory=list)  # latent grids, finest first


def stream_count(slot: Slot, transform: int) -> int:
    return transform + 1


# ----------------------------------------------------------------------------- writing
def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _zigzag(value: int) -> int:
    return 2 * value if value >= 0 else -2 * value - 1


def _model_bytes(model: StreamModel) -> bytes:
    return _varint(2 * _zigzag(model.centre) + model.family) + struct.pack("<H", model.code)


def level_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(rows, columns) of each latent grid, finest first: ⌈H/2^k⌉ × ⌈W/2^k⌉."""
    return [(-(-height // 2**k), -(-width // 2**k)) for k in range(levels)]


def v6_reaches(layers: int) -> list[float]:
    return [V6_KAN_REACHES[min(k, 1)] for k in range(layers)]


def reach_units(reach: float) -> int:
    """A KAN synthesis layer's reach as version 7 stores it: whole REACH_UNITs, 1 … 255."""
    units = reach / REACH_UNIT
    if units != round(units) or not 1 <= units <= 255:
        raise KanimgError(f"KAN synthesis reach {reach}: a multiple of {REACH_UNIT} up to {255 * REACH_UNIT}")
    return round(units)


def write_version(kimg: KimgFile) -> int:
    """The lowest version that holds ``kimg``: 2 for KAN and SIREN, 3 for latent grids coded
    as version 3 did, 4 for nested ones, 5 for nested ones whose models are all compact, 6
    for those with an order-1 KAN synthesis of one grid and version 6's reaches, 7 for any
    other KAN synthesis, 8 where a nested set's values are predicted (either synthesis)."""
    spec = kimg.spec
    if spec["name"] != "latent":
        return min(VERSION, 2)  # VERSION: 1 in the test that writes version 1 files
    compact = all(m.compact for level in kimg.levels for m in level.models)
    if any(level.predicted for level in kimg.levels):
        if not compact or any(level.buckets is None for level in kimg.levels):
            raise ValueError("predicted latent sets need nested grids with compact models")
        return 8
    if spec.get("synthesis", "mlp") != "mlp":
        return 6 if len(set(spec["grids"])) == 1 and spec["reaches"] == v6_reaches(len(spec["grids"])) else 7
    nested = {level.buckets is not None for level in kimg.levels}
    if len(nested) > 1:
        raise ValueError("latent levels coded both as version 3 and as version 4")
    if nested != {True}:
        return 3
    return 5 if compact else 4


def write(kimg: KimgFile) -> bytes:
    """Serialise ``kimg`` (header, payload, checksum)."""
    img, spec, quant = kimg.image, kimg.spec, kimg.quant
    out = bytearray(MAGIC)
    version = write_version(kimg)
    out += struct.pack("<B", version)
    out += _varint(img.height) + _varint(img.width)
    out += struct.pack("<BBBB", img.channels, img.bit_depth, COORDS_IDS[img.coords], MODEL_IDS[spec["name"]])
    widths = spec["widths"]
    out += struct.pack("<B", len(widths) - 1) + b"".join(_varint(w) for w in widths)
    if spec["name"] == "kan":
        out += b"".join(_varint(g) for g in spec["grids"])
        for limits in kimg.grid_ranges:
            if limits is None or np.all(limits == np.array([-1.0, 1.0], dtype=np.float32)):
                out += b"\x00"
            else:
                out += b"\x01" + np.asarray(limits, dtype="<f4").tobytes()
    elif spec["name"] == "latent":
        if version >= 6:
            kind = spec.get("synthesis", "mlp")
            out += struct.pack("<B", SYNTHESIS_IDS[kind])
            if kind == "kan" and version == 6:
                out += _varint(spec["grids"][0])
            elif kind == "kan":
                out += b"".join(_varint(g) + struct.pack("<B", reach_units(r)) for g, r in zip(spec["grids"], spec["reaches"]))
        for level in kimg.levels:
            out += _varint(level.limit)
            if level.buckets is None:
                out += struct.pack("<B", len(level.models))
            else:
                if len(level.models) != 1 + sum(map(sum, level.buckets)):
                    raise ValueError(f"{len(level.models)} entropy models for bucket counts {level.buckets}")
                out += struct.pack("<B", len(level.buckets)) + b"".join(  # codes all 0 below version 8 (write_version)
                    struct.pack("<BB", *(count | code << 4 for count, code in zip(counts, stage)))  # version 8: code in the high bits
                    for counts, stage in zip(level.buckets, level.stage_codes))
            out += bytes(m.compact_byte() for m in level.models) if version >= 5 else b"".join(_model_bytes(m) for m in level.models)
    else:
        out += struct.pack("<f", spec["omega0"])
    out += struct.pack("<BB", FLOAT16 if quant.is_float16 else 0, GRANULARITIES.index(quant.granularity))
    if not quant.is_float16:
        for slot, tensor in zip(slots(spec), kimg.tensors):
            out += struct.pack("<B", round(tensor.bits / BITS_UNIT[VERSION])) + np.asarray(tensor.steps, dtype="<f4").tobytes()
            if slot.smooth:
                out += struct.pack("<B", tensor.transform)
            out += b"".join(_model_bytes(m) for m in tensor.models)
    out += kimg.payload
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


# ----------------------------------------------------------------------------- reading
class _Reader:
    """Sequential reads from the header; running past its end means a malformed file."""

    def __init__(self, data: bytes, end: int) -> None:
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise KanimgError("malformed .kimg file: the header runs past the end of the file")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        values = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return values[0] if len(values) == 1 else values

    def model(self) -> StreamModel:
        packed = self.varint(1 << 20, "entropy model")
        family, zig = packed & 1, packed >> 1
        centre = zig // 2 if zig % 2 == 0 else -(zig + 1) // 2
        _check(family in ENTROPY_FAMILIES, f"entropy model family {family}")
        return StreamModel(family, centre, self.unpack("<H"))

    def varint(self, limit: int, what: str) -> int:
        value, shift = 0, 0
        while True:
            byte = self.unpack("<B")
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                raise KanimgError(f"malformed .kimg file: {what} is not a valid number")
        if value > limit:
            raise KanimgError(f"malformed .kimg file: {what} {value} exceeds the limit {limit}")
        return value


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise KanimgError(f"malformed .kimg file: {message}")


def check_envelope(data: bytes) -> None:
    """Magic, version and checksum, in that order; each failure is one clear message."""
    if data[: len(MAGIC)] != MAGIC[: len(data)] or len(data) == 0:
        raise KanimgError("not a .kimg file (it does not start with the KIMG magic bytes)")
    if len(data) < len(MAGIC) + 1 + CHECKSUM_BYTES:
        raise KanimgError(f"truncated .kimg file: only {len(data)} bytes")
    version = data[len(MAGIC)]
    if version > VERSION:
        raise KanimgError(f".kimg format version {version} is newer than this kanimg reads (version {VERSION}); upgrade kanimg")
    if version < 1:
        raise KanimgError(f"malformed .kimg file: format version {version}")
    (stored,) = struct.unpack("<I", data[-CHECKSUM_BYTES:])
    if zlib.crc32(data[:-CHECKSUM_BYTES]) != stored:
        raise KanimgError("corrupted or truncated .kimg file: checksum mismatch")


def read(data: bytes, limits: DecodeLimits = DECODE_LIMITS) -> KimgFile:
    """Parse and validate a .kimg file.

    Raises:
        KanimgError: wrong magic, newer version, checksum mismatch (truncated or corrupted),
            any field outside what this format allows, or a decode cost over ``limits``.
    """
    data = bytes(data)
    if len(data) > MAX_FILE_BYTES:
        raise KanimgError(f"malformed .kimg file: {len(data):,} bytes, more than any .kimg file holds ({MAX_FILE_BYTES:,})")
    check_envelope(data)
    r = _Reader(data, len(data) - CHECKSUM_BYTES)
    version = r.take(len(MAGIC) + 1)[-1]
    bits_unit = BITS_UNIT[version]
    height, width = r.varint(MAX_PIXELS, "height"), r.varint(MAX_PIXELS, "width")
    _check(height >= 1 and width >= 1 and height * width <= MAX_PIXELS, f"image size {width}x{height}")
    channels, bit_depth, coords_id, model_id = r.unpack("<BBBB")
    _check(1 <= channels <= 4, f"{channels} channels")
    _check(bit_depth in (8, 16), f"bit depth {bit_depth}")
    coords = {v: k for k, v in COORDS_IDS.items()}.get(coords_id)
    _check(coords is not None, f"coordinate convention {coords_id}")
    name = {v: k for k, v in MODEL_IDS.items()}.get(model_id)
    _check(name is not None and FIRST_VERSION[name] <= version, f"model family {model_id}")
    layers = r.unpack("<B")
    _check(1 <= layers <= MAX_LAYERS and (name != "siren" or layers >= 2), f"{layers} layers")
    widths = [r.varint(MAX_WIDTH, "layer width") for _ in range(layers + 1)]
    inputs_ok = widths[0] <= MAX_LEVELS if name == "latent" else widths[0] == 2  # latent: one input per grid
    _check(min(widths) >= 1 and inputs_ok and widths[-1] == channels, f"widths {widths} for {channels} channel(s)")
    spec: dict = {"name": name, "widths": widths}
    ranges: list[np.ndarray | None] = []
    levels: list[LatentLevel] = []
    if name == "latent":
        _check(layers <= MAX_SYNTHESIS_LAYERS and max(widths) <= MAX_SYNTHESIS_WIDTH, f"synthesis widths {widths}")
        if version >= 6:
            kind = {v: k for k, v in SYNTHESIS_IDS.items()}.get(r.unpack("<B"))
            _check(kind is not None, "latent synthesis kind")
            if kind == "kan" and version == 6:  # one grid for every layer, fixed reaches
                grid = r.varint(MAX_KAN_GRID, "KAN synthesis grid")
                spec.update(synthesis="kan", grids=[grid] * layers, reaches=v6_reaches(layers))
            elif kind == "kan":
                pairs = [(r.varint(MAX_KAN_GRID, "KAN synthesis grid"), r.unpack("<B")) for _ in range(layers)]
                spec.update(synthesis="kan", grids=[g for g, _ in pairs], reaches=[units * REACH_UNIT for _, units in pairs])
            if kind == "kan":
                _check(min(spec["grids"]) >= 1, "KAN synthesis grid 0")
                _check(min(spec["reaches"]) > 0, "KAN synthesis reach 0")
        for shape in level_shapes(height, width, widths[0]):
            limit = r.varint(MAX_LATENT, "latent range")
            _check(limit >= 1, "latent range 0")  # the encoder's smallest alphabet is ±1
            if version == 3:
                count = r.unpack("<B")
                _check(1 <= count <= MAX_CONTEXTS, f"{count} entropy models for a latent grid")
                levels.append(LatentLevel(limit, [r.model() for _ in range(count)]))
                continue
            depth = r.unpack("<B")
            side = max(shape)
            _check(depth <= min(MAX_DEPTH, (side - 1).bit_length()), f"{depth} nested stages for a latent grid of side {side}")
            buckets = [r.unpack("<BB") for _ in range(depth)]
            predictions = None
            if version >= 8:  # each byte: the prediction code above the bucket count
                predictions = [tuple(b >> 4 for b in pair) for pair in buckets]
                buckets = [tuple(b & 15 for b in pair) for pair in buckets]
                _check(all(code <= PREDICTION_CODES for codes in predictions for code in codes), f"prediction codes {predictions}")
            _check(all(1 <= n <= MAX_BUCKETS for counts in buckets for n in counts), f"bucket counts {buckets}")
            count = 1 + sum(sum(counts) for counts in buckets)
            models = [StreamModel.from_compact_byte(b) for b in r.take(count)] if version >= 5 else [r.model() for _ in range(count)]
            levels.append(LatentLevel(limit, models, buckets, predictions))
    elif name == "kan":
        spec["grids"] = [r.varint(MAX_GRID, "grid size") for _ in range(layers)]
        spec["directions"] = spec["levels"] = 0  # the format holds KANs on x and y
        _check(min(spec["grids"]) >= 1, f"grid sizes {spec['grids']}")
        for n_in in widths[:-1]:
            flag = r.unpack("<B")
            _check(flag in (0, 1), f"grid range flag {flag}")
            if flag:
                bounds = np.frombuffer(r.take(8 * n_in), dtype="<f4").reshape(n_in, 2).astype(np.float32)
                _check(bool(np.all(np.isfinite(bounds)) and np.all(bounds[:, 0] < bounds[:, 1])), "grid ranges")
                ranges.append(bounds)
            else:
                ranges.append(None)
    else:
        spec["omega0"] = float(r.unpack("<f"))
        _check(np.isfinite(spec["omega0"]) and spec["omega0"] > 0, f"omega0 {spec['omega0']}")
    _check(parameter_count(spec) <= MAX_PARAMETERS, f"{parameter_count(spec)} parameters")
    macs, memory = decode_cost(spec, height, width, channels)
    if not limits.admits(macs, memory):
        raise KanimgError(f".kimg file too costly to decode: {width}x{height} pixels through {parameter_count(spec):,} "
                          f"parameters need {macs:.2g} multiply-adds and {memory / 2**30:.1f} GiB (limits {limits.macs:.2g} "
                          f"and {limits.bytes / 2**30:.1f} GiB)")
    precision, granularity = r.unpack("<BB")
    _check(precision in (0, FLOAT16) and not (name == "latent" and precision), f"precision {precision}")
    _check(granularity < len(GRANULARITIES), f"granularity {granularity}")
    tensors = []
    if precision == 0:
        for slot in slots(spec):
            bits = r.unpack("<B") * bits_unit
            _check(MIN_BITS <= bits <= MAX_BITS, f"{bits:g}-bit quantisation")
            rows = slot.shape[0] if GRANULARITIES[granularity] == "channel" and len(slot.shape) > 1 else 1
            steps = np.frombuffer(r.take(4 * rows), dtype="<f4").astype(np.float32)
            _check(bool(np.all(np.isfinite(steps)) and np.all(steps >= 0)), "step sizes")
            transform = r.unpack("<B") if slot.smooth else 0
            _check(transform <= MAX_TRANSFORM and (transform == 0 or transform < slot.shape[-1]), f"transform {transform}")
            models = [r.model() for _ in range(stream_count(slot, transform))]
            tensors.append(TensorHeader(bits, steps, transform, models))
    quant = QuantConfig(max(t.bits for t in tensors) if tensors else FLOAT16, GRANULARITIES[granularity])
    payload = r.take(r.end - r.pos)
    if quant.is_float16:
        _check(len(payload) == 2 * parameter_count(spec), f"float16 payload of {len(payload)} bytes for {parameter_count(spec)} parameters")
    image = ImageInfo(height, width, channels, bit_depth, coords)
    return KimgFile(image, spec, quant, ranges, tensors, payload, levels)
