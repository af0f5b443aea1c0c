"""Image decoding and encoding: any common file in, float pixels in [0, 1] out.

Decoding goes through Pillow (PNG, JPEG, TIFF, WebP, GIF, BMP …). Pillow keeps 16 bits per
channel only for grey images, so 16-bit colour PNGs are decoded with pypng and 16-bit colour
TIFFs with tifffile (through imageio). Every image ends up as one of four modes:

- "L" grey, "RGB" colour: fitted as 1 or 3 channels;
- "LA", "RGBA": the alpha channel is kept and fitted as one more channel, and the exported
  reconstruction carries it too (output channels follow the image);
- palette images become RGB (or RGBA when they have transparency), 1-bit images grey,
  CMYK/YCbCr/LAB colour.

EXIF orientation is applied, so pixels are fitted the way viewers show them.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import KanimgError
from .files import atomic_path

# Refuse images above Pillow's own decompression-bomb threshold (~89.5 megapixels) before
# decoding them.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
log = logging.getLogger(__name__)


@dataclass
class ImageData:
    """A decoded image.

    Attributes:
        pixels: (H, W, C) float32 in [0, 1].
        mode: "L", "LA", "RGB" or "RGBA".
        bit_depth: 8 or 16 bits per channel in the source file.
        name: file stem, used to name run folders.
    """

    pixels: np.ndarray
    mode: str
    bit_depth: int
    name: str

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]


IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")  # what a folder of images is read for


def list_images(path: str | os.PathLike) -> list[Path]:
    """``path`` itself, or the image files directly inside a folder (sorted, not recursive).

    Raises:
        KanimgError: missing path, or a folder without images.
    """
    path = Path(path)
    if not path.exists():
        raise KanimgError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise KanimgError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    seen: dict[str, Path] = {}
    for image in images:  # results are named by the file's stem: two files must not share one
        name = safe_name(image.stem)
        if name in seen:
            raise KanimgError(f"{path}: {seen[name].name} and {image.name} share the name {name!r}, "
                              f"which names their results; rename one")
        seen[name] = image
    return images


def safe_name(name: str) -> str:
    """``name`` as output files are named after it: letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def load_image(path: str | os.PathLike, grey: bool = False, max_pixels: int = MAX_PIXELS) -> ImageData:
    """Decode an image file into float pixels.

    Args:
        path: image file.
        grey: convert to luminance (ITU-R 601-2, as Pillow's "L"), dropping colour and alpha.
        max_pixels: refuse larger images (decompression bombs) before decoding them.
    Raises:
        KanimgError: missing file, directory, not an image, truncated, empty or too large.
    """
    path = Path(path)
    if not path.exists():
        raise KanimgError(f"{path}: no such file")
    if path.is_dir():
        raise KanimgError(f"{path}: is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width == 0 or height == 0:
                    raise KanimgError(f"{path}: image has zero size ({width}x{height})")
                if width * height > max_pixels:
                    raise KanimgError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
                                      f"limit of {max_pixels / 1e6:.0f} (possible decompression bomb)")
                frames = getattr(im, "n_frames", 1)  # an animated GIF, WebP or PNG, a multi-page TIFF
                if frames > 1:
                    log.warning("%s has %d frames; kanimg reads the first only", path, frames)
                array, mode, depth = _decode(path, im)
                orientation = im.getexif().get(0x0112, 1)  # after decoding: Pillow applies a TIFF's itself and drops the tag
    except KanimgError:
        raise
    except UnidentifiedImageError:
        raise KanimgError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise KanimgError(f"{path}: image is too large (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise KanimgError(f"{path}: cannot decode image ({exc})") from None
    pixels = _orient(array, orientation).astype(np.float32) / float(2**depth - 1)
    if grey and mode != "L":
        pixels, mode = to_grey(pixels, mode), "L"
    return ImageData(np.ascontiguousarray(pixels), mode, depth, path.stem)


# What kanimg.as_image accepts: a file path, a PIL image, an array or a tensor.
ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, Image.Image, "ImageData"]
_MODES = {count: mode for mode, count in CHANNELS.items()}
DEFAULT_IMAGE_NAME = "astronaut.png"


def default_image() -> Path:
    """The bundled photograph: assets/ beside the package (source checkout or editable install),
    else where setup.py's data_files put it (<prefix>/share/kanimg/assets)."""
    for folder in (Path(__file__).resolve().parent.parent / "assets", Path(sys.prefix) / "share" / "kanimg" / "assets"):
        if (folder / DEFAULT_IMAGE_NAME).is_file():
            return folder / DEFAULT_IMAGE_NAME
    raise KanimgError(f"the bundled image {DEFAULT_IMAGE_NAME} is missing from this installation; pass an image file")


def as_image(image: ImageLike, grey: bool = False, name: str = "array") -> ImageData:
    """Any image a user holds, as kanimg's ImageData (float32 pixels in [0, 1]).

    Accepts an image file path, a PIL image, or an (H, W) / (H, W, C) array or tensor with C
    from 1 to 4: uint8 (8-bit), uint16 (16-bit), or floats in [0, 1] (kept at 16 bits); an
    ImageData (what this returns) as it is.
    """
    if isinstance(image, ImageData):
        if grey and image.mode != "L":
            return ImageData(to_grey(image.pixels, image.mode), "L", image.bit_depth, image.name)
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, grey=grey)
    if hasattr(image, "getbands") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("RGBA" if "A" in image.getbands() else ("L" if image.mode in ("1", "L", "I", "I;16") else "RGB")))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise KanimgError(f"cannot read an image from a {type(image).__name__}; give a path, a PIL image, an array, a tensor or kanimg.as_image's result")
    array = image[..., None] if image.ndim == 2 else image
    if array.ndim != 3 or array.shape[2] not in _MODES:
        raise KanimgError(f"an image array must be (H, W) or (H, W, C) with 1 to 4 channels, got shape {tuple(image.shape)}")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise KanimgError(f"the image is empty ({width}x{height})")
    if height * width > MAX_PIXELS:
        raise KanimgError(f"{width}x{height} is {height * width / 1e6:.0f} megapixels, over the limit of {MAX_PIXELS / 1e6:.0f}")
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        depth = 8 if array.dtype == np.uint8 else 16
        pixels = array.astype(np.float32) / float(2**depth - 1)
    elif np.issubdtype(array.dtype, np.floating):
        pixels, depth = array.astype(np.float32), 16
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise KanimgError("float image values must be finite and in [0, 1]")
    else:
        raise KanimgError(f"unsupported image dtype {array.dtype}; use uint8, uint16 or floats in [0, 1]")
    mode = _MODES[pixels.shape[2]]
    if grey and mode != "L":
        pixels, mode = to_grey(pixels, mode), "L"
    return ImageData(np.ascontiguousarray(pixels), mode, depth, name)


def _decode(path: Path, im: Image.Image) -> tuple[np.ndarray, str, int]:
    """(H, W, C) integer array, mode, bit depth; forces a full decode so truncation shows."""
    if im.format == "PNG" and _png_is_16bit_colour(path):
        return _decode_png16(path)
    if im.format == "TIFF" and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I") and _tiff_bits(im) > 8:
        return _decode_tiff16(path)
    im.load()
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(im).astype(np.int64)
        if array.min() < 0 or array.max() > 65535:
            raise KanimgError(f"{path}: 32-bit integer images are not supported")
        return array[..., None].astype(np.uint16), "L", 16
    if mode == "F":
        raise KanimgError(f"{path}: floating-point images are not supported")
    if mode == "P":
        target = "RGBA" if "transparency" in im.info else "RGB"
    elif mode == "PA":
        target = "RGBA"
    elif mode == "1":
        target = "L"
    elif mode in ("La",):
        target = "LA"
    elif mode in ("RGBa",):
        target = "RGBA"
    elif mode in CHANNELS:
        target = mode
    else:  # CMYK, YCbCr, LAB, HSV, RGBX …
        target = "RGB"
    if target != mode:
        im = im.convert(target)
    array = np.asarray(im, dtype=np.uint8)
    return array.reshape(array.shape[0], array.shape[1], CHANNELS[target]), target, 8


def _png_is_16bit_colour(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[24] == 16 and head[25] in (2, 4, 6)


def _decode_png16(path: Path) -> tuple[np.ndarray, str, int]:
    import png  # pypng

    try:
        _refuse_inflation_bomb(png.Reader(filename=str(path)), path)
        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    except (png.Error, zlib.error) as exc:
        raise KanimgError(f"{path}: cannot decode image ({exc})") from None
    planes = info["planes"]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[planes]
    return array.reshape(height, width, planes), mode, 16


def _refuse_inflation_bomb(reader, path: Path) -> None:
    """pypng inflates each IDAT chunk whole, however large it grows: inflate the image data
    here first, a megabyte at a time, and refuse it when it holds more than the header's size
    needs (interlacing's filter bytes included, with room to spare)."""
    reader.preamble()
    limit = 2 * reader.height * (1 + reader.row_bytes) + 4096
    inflater, total = zlib.decompressobj(), 0
    while True:
        kind, data = reader.chunk()
        if kind == b"IEND":
            return
        while kind == b"IDAT" and data:
            total += len(inflater.decompress(data, 1 << 20))
            if total > limit:
                raise KanimgError(f"{path}: its image data inflates past what a {reader.width}x{reader.height} "
                                  f"image holds (possible decompression bomb)")
            data = inflater.unconsumed_tail


def _tiff_bits(im: Image.Image) -> int:
    bits = im.tag_v2.get(258, 8) if hasattr(im, "tag_v2") else 8
    return max(bits) if isinstance(bits, tuple) else int(bits)


def _decode_tiff16(path: Path) -> tuple[np.ndarray, str, int]:
    import imageio.v3 as iio

    array = iio.imread(path, plugin="tifffile", index=0)
    if array.dtype != np.uint16:
        raise KanimgError(f"{path}: unsupported TIFF sample type {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(array.shape[2])
    if mode is None:
        raise KanimgError(f"{path}: unsupported TIFF with {array.shape[2]} channels")
    return array, mode, 16


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1–8) to an (H, W, C) array, as Pillow's exif_transpose does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return ops[orientation](array) if orientation in ops else array


def to_grey(pixels: np.ndarray, mode: str) -> np.ndarray:
    """(H, W, 1) luminance of float pixels in ``mode``, dropping alpha: ITU-R 601-2 luma (the
    weights Pillow's convert("L") uses) for colour, the grey channel itself for "L"/"LA"."""
    if mode in ("RGB", "RGBA"):
        red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]  # elementwise: the same pixel gives the same grey in any array
        return (red * np.float32(0.299) + green * np.float32(0.587) + blue * np.float32(0.114))[..., None]
    return pixels[..., :1]


def quantize(pixels: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float pixels (any range) to unsigned integers of ``bit_depth`` bits, clipped and rounded."""
    top = 2**bit_depth - 1
    return np.round(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16 if bit_depth > 8 else np.uint8)


def save_png(path: str | os.PathLike, pixels: np.ndarray, bit_depth: int = 8) -> None:
    """Write (H, W, C) pixels as a PNG with 1–4 channels, atomically.

    Args:
        pixels: floats in [0, 1] (values outside are clipped), or the PNG's own integers
            (uint8 for 8 bits, uint16 for 16), written as they are, without a float copy.
        bit_depth: 8 or 16.
    """
    path = Path(path)
    ints = pixels if pixels.dtype == (np.uint16 if bit_depth > 8 else np.uint8) else quantize(pixels, bit_depth)
    channels = ints.shape[2]
    if bit_depth == 8:
        with atomic_path(path) as tmp:
            Image.fromarray(ints[..., 0] if channels == 1 else ints).save(tmp, format="PNG")
    else:  # Pillow cannot write 16-bit colour
        save_png_rows(path, ints.shape[0], ints.shape[1], channels, bit_depth, iter(ints))


def save_png_rows(path: str | os.PathLike, height: int, width: int, channels: int, bit_depth: int, rows) -> None:
    """Write a PNG atomically from an iterable of its rows or row bands, (W, C) or (rows, W, C)
    unsigned integers of ``bit_depth`` bits, without holding the image (pypng streams them)."""
    import png  # pypng

    def flat_rows():
        for part in rows:
            yield from np.asarray(part).reshape(-1, width * channels)

    writer = png.Writer(width, height, greyscale=channels <= 2, alpha=channels in (2, 4), bitdepth=bit_depth)
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            writer.write(f, flat_rows())
