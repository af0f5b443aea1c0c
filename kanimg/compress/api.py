"""The codec from Python and from the command line: ``kanimg.compress`` / ``kanimg.decode``
(images and bytes in memory) and the ``compress`` / ``decode`` verbs (file in, file out).

    >>> import numpy as np, kanimg
    >>> image = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    >>> data = kanimg.compress(image, bpp=8.0, steps=20, qat_steps=0)
    >>> kanimg.decode(data).shape
    (16, 16, 3)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KanimgError
from ..files import atomic_write_bytes, claimed_output_file
from ..io import ImageLike, as_image, load_image, save_png
from .bitstream import DecodedImage, decode_image
from .kimg import MAX_FILE_BYTES
from .neural import CompressConfig, CompressResult, compress_image
from .resume import resumable

log = logging.getLogger(__name__)


def compress(image: ImageLike, bpp: float, **options: Any) -> bytes:
    """The .kimg bytes of ``image`` at about ``bpp`` bits per pixel (header included).

    ``options`` are CompressConfig's fields (``model``, ``steps``, ``qat_steps``, ``bits``, …).
    """
    try:
        config = CompressConfig(**options)
    except TypeError as exc:
        raise KanimgError(f"unknown compression option ({exc})") from None
    return compress_image(as_image(image), bpp, config).data


def decode(data: bytes | str | os.PathLike) -> np.ndarray:
    """The pixels of a .kimg file (its bytes or its path) as (H, W, C) float64 in [0, 1]; the
    same numbers on every machine."""
    if isinstance(data, (str, os.PathLike)):
        data = read_kimg_bytes(Path(data))
    return decode_image(bytes(data)).pixels


def compress_file(image: Path, out: Path, bpp: float, config: CompressConfig, force: bool = False) -> CompressResult:
    """Fit ``image`` at about ``bpp`` and write the .kimg file ``out`` (checked before fitting).

    The training keeps its state beside ``out`` (``.NAME.partial.pt``) every 30 s, so the same
    command after Ctrl-C or a kill continues where it stopped. ``out`` is locked from the check
    to the write: a second kanimg writing it gets an error, not a silent race."""
    out, image = Path(out), Path(image)
    with claimed_output_file(out, force, source=image):
        state = out.with_name(f".{out.name}.partial.pt")
        with resumable(state):
            result = compress_image(load_image(image), bpp, config)
        atomic_write_bytes(out, result.data)
        try:
            state.unlink(missing_ok=True)
        except OSError as exc:  # the file is written: a state left behind is not worth failing for
            log.warning("%s is written, but its training state %s could not be removed (%s)", out, state, exc.strerror or exc)
    return result


def read_kimg_bytes(path: Path) -> bytes:
    """The bytes of a .kimg file; never more than any .kimg file can hold."""
    path = Path(path)
    if not path.is_file():
        raise KanimgError(f"{path}: no such file" if not path.exists() else
                          f"{path}: is a folder, not a .kimg file" if path.is_dir() else f"{path}: not a regular file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KanimgError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise KanimgError(f"{path}: too large to be a .kimg file (over {MAX_FILE_BYTES:,} bytes)")
    return data


def decode_file(path: Path, out: Path, force: bool = False) -> DecodedImage:
    """Decode the .kimg file ``path`` into the PNG ``out`` (same bytes on every decode)."""
    out = Path(out)
    with claimed_output_file(out, force, source=Path(path)):
        decoded = decode_image(read_kimg_bytes(path))
        save_png(out, decoded.integers, decoded.image.bit_depth)  # no float copy of a large image
    return decoded
