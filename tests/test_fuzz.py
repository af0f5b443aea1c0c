"""Fuzzing the decoders with hypothesis: whatever the bytes, a .kimg file either decodes within
its declared size and the decode limits, or fails with KanimgError; so does an image file."""
import struct
import zlib

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kanimg.compress import kimg
from kanimg.compress.bitstream import decode_image, encode_model
from kanimg.compress.kimg import DecodeLimits, ImageInfo
from kanimg.compress.latent import LatentImage
from kanimg.compress.quantize import QuantConfig
from kanimg.errors import KanimgError
from kanimg.io import load_image
from kanimg.models import build_model

# Small bounds keep each example fast; the decoder must honour whatever bounds it is given.
LIMITS = DecodeLimits(macs=2e8, bytes=1 << 31)
FUZZ = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def valid_files() -> list[bytes]:
    torch.manual_seed(0)
    kan = build_model("kan", widths=[2, 4, 3], grids=[6, 3], grid_kind="uniform", directions=0, levels=0)
    with torch.no_grad():
        for layer in kan.layers:
            layer.spline_weight.normal_(0, 0.3)
    siren = build_model("siren", widths=[2, 6, 1])
    latent = LatentImage(6, 7, [3, 5, 3])
    with torch.no_grad():
        for grid in latent.latents:
            grid.copy_(torch.randint(-3, 4, grid.shape).float())
    kan_latent = LatentImage(6, 7, [3, 4, 3], "kan", (3, 5), (2.0, 1.25))
    with torch.no_grad():
        for ours, theirs in zip(kan_latent.latents, latent.latents):
            ours.copy_(theirs)
    return [encode_model(latent, ImageInfo(6, 7, 3), QuantConfig(8)), encode_model(kan_latent, ImageInfo(6, 7, 3), QuantConfig(7)), encode_model(kan, ImageInfo(6, 5, 3), QuantConfig(7)), encode_model(kan, ImageInfo(4, 4, 3), QuantConfig(16)),
            encode_model(siren, ImageInfo(5, 7, 1, 16), QuantConfig(16)), encode_model(siren, ImageInfo(3, 3, 1), QuantConfig(5.5))]


VALID = valid_files()


def decodes_within_bounds_or_refuses(data: bytes) -> None:
    try:
        decoded = decode_image(data, LIMITS)
    except KanimgError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    info = decoded.image
    assert decoded.integers.shape == (info.height, info.width, info.channels)
    assert decoded.integers.dtype == (np.uint8 if info.bit_depth == 8 else np.uint16)
    assert kimg.decode_cost(decoded.spec, info.height, info.width, info.channels)[0] <= LIMITS.macs


def with_checksum(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


# positions: anywhere, or counted from the end (the payload: weights and coded integers)
edits = st.lists(st.tuples(st.sampled_from(["set", "set", "insert", "delete"]), st.integers(-80, 10_000), st.integers(0, 255)),
                 min_size=1, max_size=6)


@FUZZ
@given(which=st.integers(0, len(VALID) - 1), changes=edits, fix_checksum=st.booleans(), cut=st.integers(0, 10_000) | st.none())
def test_mutated_files_decode_within_bounds_or_fail_cleanly(which, changes, fix_checksum, cut):
    data = bytearray(VALID[which][: -kimg.CHECKSUM_BYTES] if fix_checksum else VALID[which])
    for kind, position, value in changes:
        position = max(0, len(data) + position) if position < 0 else position % (len(data) + 1)
        if kind == "set" and position < len(data):
            data[position] = value
        elif kind == "insert":
            data.insert(position, value)
        elif kind == "delete" and position < len(data):
            del data[position]
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    decodes_within_bounds_or_refuses(with_checksum(bytes(data)) if fix_checksum else bytes(data))


small_or_any = st.one_of(st.integers(1, 12), st.integers(0, 1 << 20))


@FUZZ
@given(height=small_or_any, width=small_or_any, channels=st.one_of(st.integers(1, 4), st.integers(0, 255)),
       bit_depth=st.sampled_from([8, 8, 16, 0, 255]), name=st.sampled_from(["kan", "siren"]),
       hidden=st.lists(st.one_of(st.integers(1, 6), st.integers(0, 5000)), min_size=0, max_size=3),
       grids=st.lists(st.one_of(st.integers(1, 12), st.integers(0, 5000)), min_size=4, max_size=4),
       payload=st.binary(max_size=400), bits=st.one_of(st.integers(8, 24), st.integers(0, 255)), float16=st.booleans())
def test_random_header_fields_decode_within_bounds_or_fail_cleanly(height, width, channels, bit_depth, name, hidden, grids,
                                                                      payload, bits, float16):
    widths = [2, *hidden, channels]
    out = bytearray(kimg.MAGIC) + bytes([kimg.VERSION])
    out += kimg._varint(height) + kimg._varint(width)
    out += struct.pack("<BBBB", channels % 256, bit_depth, 0, kimg.MODEL_IDS[name])
    out += struct.pack("<B", len(widths) - 1) + b"".join(kimg._varint(w) for w in widths)
    if name == "kan":
        out += b"".join(kimg._varint(g) for g in grids[: len(widths) - 1]) + b"\x00" * (len(widths) - 1)
    else:
        out += struct.pack("<f", 30.0)
    out += struct.pack("<BB", 16 if float16 else 0, 0)
    if not float16:
        out += bytes([bits]) + struct.pack("<f", 0.05)  # first tensor's bits and step; the rest comes from the payload
    decodes_within_bounds_or_refuses(with_checksum(bytes(out) + payload))


@FUZZ
@given(prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"II*\0", b"BM"]),
       body=st.binary(max_size=600))
def test_random_image_bytes_load_or_fail_cleanly(tmp_path, prefix, body):
    path = tmp_path / "fuzz.img"
    path.write_bytes(prefix + body)
    try:
        image = load_image(path)
    except KanimgError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert image.pixels.ndim == 3 and image.pixels.dtype == np.float32
    assert np.isfinite(image.pixels).all() and image.pixels.min() >= 0 and image.pixels.max() <= 1


def test_the_valid_files_decode():
    for data in VALID:
        decoded = decode_image(data, LIMITS)
        assert decoded.integers.size > 0
