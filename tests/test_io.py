"""Decoding every supported kind of file, and refusing bad ones with a clear message."""
import struct
import zlib

import numpy as np
import png
import pytest
import tifffile
from PIL import Image, ImageOps

from kanimg.errors import KanimgError
from kanimg.io import load_image, quantize, save_png

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "tif", "bmp", "webp", "jpg"])
def test_formats_decode_to_float_rgb(tmp_path, ext):
    path = tmp_path / f"img.{ext}"
    Image.fromarray(RGB8).save(path, **({"lossless": True} if ext == "webp" else {}))
    data = load_image(path)
    assert (data.mode, data.bit_depth, data.pixels.shape, data.pixels.dtype) == ("RGB", 8, (6, 9, 3), np.float32)
    if ext != "jpg":
        assert np.array_equal(np.round(data.pixels * 255).astype(np.uint8), RGB8)


@pytest.mark.parametrize("mode,expected", [("L", "L"), ("LA", "LA"), ("RGBA", "RGBA"), ("1", "L"), ("P", "RGB"), ("CMYK", "RGB")])
def test_modes(tmp_path, mode, expected):
    im = Image.fromarray(RGB8).convert(mode)
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    im.save(path)
    data = load_image(path)
    assert data.mode == expected and data.channels == {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[expected]
    assert 0 <= data.pixels.min() and data.pixels.max() <= 1


def test_palette_with_transparency_keeps_alpha(tmp_path):
    im = Image.fromarray(RGB8).convert("P")
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").mode == "RGBA"


def test_an_animated_image_is_read_from_its_first_frame_with_a_warning(tmp_path, caplog):
    frames = [Image.fromarray(np.full((6, 9, 3), value, dtype=np.uint8)) for value in (10, 200, 90)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    data = load_image(tmp_path / "a.gif")
    assert np.allclose(data.pixels, data.pixels.flat[0]) and round(float(data.pixels.flat[0]) * 255) == 10
    assert "has 3 frames; kanimg reads the first only" in caplog.text
    caplog.clear()
    frames[0].save(tmp_path / "still.gif")
    load_image(tmp_path / "still.gif")
    assert "frames" not in caplog.text


def test_sixteen_bit_grey_and_colour(tmp_path):
    grey = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    colour = RNG.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    png.Writer(7, 5, greyscale=False, bitdepth=16).write(open(tmp_path / "c.png", "wb"), colour.reshape(5, -1))
    tifffile.imwrite(tmp_path / "c.tif", colour)
    for name, expected in [("g.png", grey[..., None]), ("c.png", colour), ("c.tif", colour)]:
        data = load_image(tmp_path / name)
        assert data.bit_depth == 16
        assert np.array_equal(np.round(data.pixels * 65535).astype(np.uint16), expected)


def test_sixteen_bit_png_round_trip(tmp_path):
    pixels = RNG.random((4, 5, 4)).astype(np.float32)
    save_png(tmp_path / "o.png", pixels, 16)
    back = load_image(tmp_path / "o.png")
    assert back.mode == "RGBA" and back.bit_depth == 16
    assert np.array_equal(quantize(back.pixels, 16), quantize(pixels, 16))


@pytest.mark.parametrize("depth, dtype", [(8, np.uint8), (16, np.uint16)])
def test_integer_pixels_are_written_as_they_are(tmp_path, depth, dtype):
    ints = RNG.integers(0, 2**depth, (4, 5, 3), dtype=dtype)
    save_png(tmp_path / "i.png", ints, depth)
    assert np.array_equal(quantize(load_image(tmp_path / "i.png").pixels, depth), ints)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    im = Image.fromarray(RGB8)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "e.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "e.png")).convert("RGB"))
    assert np.array_equal(np.round(load_image(tmp_path / "e.png").pixels * 255).astype(np.uint8), expected)


def test_grey_conversion_matches_pillow(tmp_path):
    Image.fromarray(RGB8).save(tmp_path / "c.png")
    data = load_image(tmp_path / "c.png", grey=True)
    expected = np.asarray(Image.fromarray(RGB8).convert("L"), dtype=np.float32) / 255
    assert data.mode == "L" and np.abs(data.pixels[..., 0] - expected).max() <= 1 / 255


def png_with_header(width: int, height: int, depth: int = 8, colour: int = 0, idat: bytes = zlib.compress(b"\0" * 16)) -> bytes:
    """A PNG whose header claims any size and whose image data is any bytes, every checksum
    right (for zero-size, garbage and decompression-bomb cases)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files(tmp_path):
    Image.fromarray(RGB8).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    files = {
        "missing": (tmp_path / "nope.png", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "not an image": (tmp_path / "notes.txt", "not an image"),
        "truncated": (tmp_path / "trunc.png", "cannot decode"),
        "zero size": (tmp_path / "zero.png", "zero size|cannot decode|not an image"),
        "bomb": (tmp_path / "bomb.png", "decompression bomb"),
        "16-bit colour, garbage data": (tmp_path / "garbage16.png", "cannot decode"),
        "16-bit colour, data inflating past its size": (tmp_path / "inflate16.png", "decompression bomb"),
    }
    (tmp_path / "notes.txt").write_text("hello, not pixels\n")
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "zero.png").write_bytes(png_with_header(0, 10))
    (tmp_path / "bomb.png").write_bytes(png_with_header(30000, 30000))
    (tmp_path / "garbage16.png").write_bytes(png_with_header(10, 10, 16, 2, idat=bytes(range(256)) * 4))
    (tmp_path / "inflate16.png").write_bytes(png_with_header(10, 10, 16, 2, idat=zlib.compress(b"\0" * 50_000_000, 9)))
    return files


def test_bad_files_raise_one_clear_error(tmp_path):
    for kind, (path, message) in bad_files(tmp_path).items():
        with pytest.raises(KanimgError, match=message) as info:
            load_image(path)
        assert "\n" not in str(info.value), kind
