"""File in, file out: what the ``compress`` and ``decode`` verbs do."""
from __future__ import annotations

from pathlib import Path

from ..errors import KanimgError
from ..files import atomic_write_bytes
from ..io import load_image, save_png
from .bitstream import DecodedImage, decode_image
from .neural import CompressConfig, CompressResult, compress_image


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise KanimgError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise KanimgError(f"{out} is a folder, not a file")
    if not out.parent.is_dir():
        raise KanimgError(f"{out.parent}: no such folder")


def compress_file(image: Path, out: Path, bpp: float, config: CompressConfig, force: bool = False) -> CompressResult:
    """Fit ``image`` at about ``bpp`` and write the .kimg file ``out`` (checked before fitting)."""
    out = Path(out)
    _check_output(out, force)
    result = compress_image(load_image(image), bpp, config)
    atomic_write_bytes(out, result.data)
    return result


def read_kimg_bytes(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise KanimgError(f"{path}: no such file" if not path.exists() else f"{path}: is a folder, not a .kimg file")
    return path.read_bytes()


def decode_file(path: Path, out: Path, force: bool = False) -> DecodedImage:
    """Decode the .kimg file ``path`` into the PNG ``out`` (same bytes on every decode)."""
    out = Path(out)
    _check_output(out, force)
    decoded = decode_image(read_kimg_bytes(path))
    save_png(out, decoded.pixels, decoded.image.bit_depth)
    return decoded
