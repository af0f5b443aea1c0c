"""Images too large to hold as floats: integer samples in a memory map, read by row bands or
at pixel indices.

A 20,000 × 20,000 RGB photo is 4.8 GB as float32 but 1.2 GB as bytes, and mapped from disk
a process holds only the pages it reads. Uncompressed TIFF/BigTIFF files are mapped as they
are (tifffile.memmap); non-interlaced PNGs are decoded once, row by row, into an unnamed
temporary file (gone when the process ends, kill -9 included) that is then mapped. Other
formats and layouts (compressed TIFF, interlaced PNG …) are decoded into memory as before, up
to io.MAX_PIXELS.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from .errors import KanimgError
from .io import CHANNELS, MAX_PIXELS, ImageData, _orient, load_image, to_grey

# Images with more pixels than this are streamed (fit reads them through a MappedImage) rather
# than decoded into float32 pixels: 16.8 megapixels, whose float32 RGB pixels and coordinates
# would take 336 MB.
STREAM_PIXELS = 1 << 24
# The largest streamed image: 2.1 gigapixels (6.4 GB of 8-bit RGB samples on disk).
MAX_STREAM_PIXELS = 1 << 31
RELEASE_BYTES = 4 << 20  # bytes of the map's pages a process keeps before handing them back
MAX_STREAM_SIDE = 1 << 20  # a row of a streamed image is read, rendered and written at once
STREAMED_SUFFIXES = (".png", ".tif", ".tiff")
_MODES = {count: mode for mode, count in CHANNELS.items()}


@dataclass
class MappedImage:
    """An image whose integer samples stay on disk; floats are made only for the rows or pixels
    read. Same descriptive attributes as :class:`kanimg.io.ImageData` (no ``pixels``).

    Attributes:
        samples: (H, W, C) uint8 or uint16, a np.memmap (or a view of one) over ``file``.
        mode: the mode read ("L", "LA", "RGB", "RGBA"), "L" when ``grey``.
        bit_depth: 8 or 16.
        name: file stem.
        grey: reads give the luminance (as :func:`kanimg.io.to_grey`).
    """

    samples: np.ndarray
    mode: str
    bit_depth: int
    name: str
    grey: bool = False
    file: IO[bytes] | None = field(default=None, repr=False)  # the open file under ``samples``' map
    _unreleased: int = field(default=0, repr=False)
    _origin: int | None = field(default=None, repr=False)  # file offset of samples[0, 0, 0], found on the first take

    @property
    def height(self) -> int:
        return self.samples.shape[0]

    @property
    def width(self) -> int:
        return self.samples.shape[1]

    @property
    def channels(self) -> int:
        return 1 if self.grey else self.samples.shape[2]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start … stop - 1 as (rows, W, C) float32 in [0, 1]."""
        samples = self.samples[start:stop]
        self._read(samples.nbytes)
        return self._floats(samples)

    def take(self, index: np.ndarray) -> np.ndarray:
        """The pixels at row-major indices ``index`` (N,) as (N, C) float32 in [0, 1].

        Read from the file, pixel by pixel (~0.6 µs each), not through the map: a random pixel
        read through a map brings its neighbours' pages in too (the kernel's fault-around), so
        a few random batches would put the whole file in the process."""
        row, col = np.divmod(np.asarray(index, dtype=np.int64), self.width)
        if self.file is None:
            return self._floats(self.samples[row, col])
        if self._origin is None:
            self._origin = _file_origin(self.samples)
        stride_row, stride_col, _ = self.samples.strides
        offsets = (self._origin + row * stride_row + col * stride_col).tolist()
        size, fd = self.samples.shape[2] * self.samples.itemsize, self.file.fileno()
        data = b"".join([os.pread(fd, size, offset) for offset in offsets])
        return self._floats(np.frombuffer(data, self.samples.dtype).reshape(row.size, -1))

    def write_rows(self, start: int, samples: np.ndarray) -> None:
        """Store integer ``samples`` (rows, W, C) from row ``start`` on (a writable map, e.g. a
        :func:`scratch_image`)."""
        self.samples[start : start + samples.shape[0]] = samples
        self._read(samples.nbytes)

    def _read(self, nbytes: int) -> None:
        """Count what a read or write brought into memory; past RELEASE_BYTES, hand the map's pages
        back (they stay in the OS's file cache, and written ones are kept by the file, so reading
        them again is cheap), so that a pass over the image holds a bounded part of it."""
        self._unreleased += nbytes
        if self._unreleased > RELEASE_BYTES:
            self._unreleased = 0
            for view in _maps(self.samples):
                view.madvise(mmap.MADV_DONTNEED)

    def _floats(self, samples: np.ndarray) -> np.ndarray:
        pixels = samples.astype(np.float32) / float(2**self.bit_depth - 1)
        source_mode = _MODES[self.samples.shape[2]]
        return to_grey(pixels, source_mode) if self.grey and source_mode != "L" else pixels


def _file_origin(view: np.ndarray) -> int:
    """The offset in its file of ``view``'s first element, ``view`` being a np.memmap or a view
    of one (its strides may be negative: EXIF orientations)."""
    owner = view
    while not isinstance(getattr(owner, "_mmap", None), mmap.mmap):
        owner = owner.base
    start = owner.offset - owner.offset % mmap.ALLOCATIONGRANULARITY  # where np.memmap began the mapping
    mapped = np.frombuffer(owner._mmap, np.uint8)
    try:
        return view.__array_interface__["data"][0] - mapped.__array_interface__["data"][0] + start
    finally:
        del mapped


def _maps(array: np.ndarray) -> list[mmap.mmap]:
    """The mmap objects under a np.memmap (or a view of one)."""
    found = []
    while array is not None:
        if isinstance(getattr(array, "_mmap", None), mmap.mmap) and all(array._mmap is not m for m in found):
            found.append(array._mmap)
        array = array.base if isinstance(array.base, np.ndarray) else None
    return found


def streamed_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) from the header of a PNG or TIFF file, None for other formats or files
    whose header cannot be read (load_image then reports them)."""
    path = Path(path)
    if path.suffix.lower() not in STREAMED_SUFFIXES or not path.is_file():
        return None
    try:
        if path.suffix.lower() == ".png":
            import png  # pypng

            with open(path, "rb") as f:
                reader = png.Reader(file=f)
                reader.preamble()
                return reader.height, reader.width
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return int(page.imagelength), int(page.imagewidth)
    except Exception:  # noqa: BLE001 - any unreadable header: not ours to report here
        return None


def open_image(path: str | os.PathLike, grey: bool = False) -> ImageData | MappedImage:
    """An image file as fit reads it: decoded into floats (:func:`kanimg.io.load_image`) up to
    STREAM_PIXELS, mapped (:func:`open_mapped`) above that for PNG and TIFF files of a layout
    that streams (else decoded into memory up to io.MAX_PIXELS, refused above)."""
    size = streamed_size(path)
    if size is None or size[0] * size[1] <= STREAM_PIXELS:
        return load_image(path, grey=grey)
    try:
        return open_mapped(path, grey)
    except NotStreamable as exc:
        if size[0] * size[1] <= MAX_PIXELS:
            return load_image(path, grey=grey)
        raise KanimgError(f"{exc}; convert it to an uncompressed TIFF or a non-interlaced PNG to fit it streamed") from None


class NotStreamable(KanimgError):
    """A PNG or TIFF whose layout the streaming reader does not handle."""


def open_mapped(path: str | os.PathLike, grey: bool = False) -> MappedImage:
    """A PNG or TIFF file as a :class:`MappedImage`.

    Raises:
        KanimgError: not a PNG/TIFF, over MAX_STREAM_PIXELS, an unsupported layout (planar,
            more than 4 channels, float or 32-bit samples), a truncated file, or too little
            free space for the temporary decoded copy.
    """
    path = Path(path)
    if not path.is_file():
        raise KanimgError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in STREAMED_SUFFIXES:
        raise KanimgError(f"{path}: large images are read from PNG or TIFF files only; convert it")
    try:
        image = _map_png(path) if suffix == ".png" else _map_tiff(path)
    except KanimgError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder's error on a broken file: one line
        raise KanimgError(f"{path}: cannot decode image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if grey and image.mode != "L":
        image.mode, image.grey = "L", True
    return image


def _check_size(path: Path, height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise KanimgError(f"{path}: image has zero size ({width}x{height})")
    if height * width > MAX_STREAM_PIXELS or max(height, width) > MAX_STREAM_SIDE:
        raise KanimgError(f"{path}: {width}x{height} is {height * width / 1e6:,.0f} megapixels, over the limit of "
                          f"{MAX_STREAM_PIXELS / 1e6:,.0f} (sides up to {MAX_STREAM_SIDE:,}) for streamed images")


def scratch_image(shape: tuple[int, int, int], bit_depth: int, name: str, folder: str | os.PathLike | None = None,
                  purpose: str = "a temporary image") -> MappedImage:
    """A writable MappedImage over an unnamed temporary file in ``folder`` (default: the system's
    temporary folder), deleted by the OS when it is closed or the process dies; refused in one
    line naming ``purpose`` when the folder lacks the space."""
    dtype = np.dtype(np.uint8 if bit_depth == 8 else np.uint16)
    size = int(np.prod(shape)) * dtype.itemsize
    folder = str(folder) if folder is not None else tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if size > free - (1 << 30):  # leave a GiB to everything else
        raise KanimgError(f"{purpose} needs {size / 2**30:.1f} GiB of temporary space in {folder}, which has "
                          f"{free / 2**30:.1f} GiB free (set TMPDIR to a larger disk)")
    file = tempfile.TemporaryFile(dir=folder)
    if hasattr(os, "posix_fallocate"):  # reserve the space now: a full disk later would kill the process (SIGBUS)
        os.posix_fallocate(file.fileno(), 0, size)
    samples = np.memmap(file, dtype=dtype, mode="w+", shape=shape)
    return MappedImage(samples, _MODES[shape[2]], bit_depth, name, file=file)


def _map_png(path: Path) -> MappedImage:
    """Decode a non-interlaced PNG row by row (pypng) into a temporary map; palettes (and their
    transparency) expanded as Pillow does."""
    import png  # pypng

    with open(path, "rb") as f:
        reader = png.Reader(file=f)
        reader.preamble()
        _check_size(path, reader.height, reader.width)
        if reader.interlace:
            raise NotStreamable(f"{path}: an interlaced PNG cannot be read row by row")
        if reader.sbit is not None or (reader.trns is not None and not reader.colormap):
            raise NotStreamable(f"{path}: a PNG with sBIT or a non-palette tRNS chunk is not streamed (read as Pillow does)")
        width, height, rows, info = reader.asDirect()
        planes, depth = info["planes"], info["bitdepth"]
        image = scratch_image((height, width, planes), 16 if depth > 8 else 8, path.stem, purpose=f"{path}: decoding it")
        top = 2**image.bit_depth - 1
        count = 0
        for count, row in enumerate(rows, start=1):
            values = np.asarray(row, dtype=np.uint32)
            if depth not in (8, 16):  # 1, 2, 4 bits: rescale to the full range
                values = (values * top + (2**depth - 1) // 2) // (2**depth - 1)
            image.write_rows(count - 1, values.reshape(1, width, planes))
    if count != height:
        raise KanimgError(f"{path}: cannot decode image (truncated: {count} of {height} rows)")
    return image


def _map_tiff(path: Path) -> MappedImage:
    """Map a TIFF's first image in place: uncompressed, contiguous, grey or RGB samples (with
    unassociated alpha) of 8 or 16 bits. Other layouts are NotStreamable."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        _check_size(path, int(page.imagelength), int(page.imagewidth))
        series = tif.series[0]
        shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
        orientation = int(page.tags.valueof(274, 1) or 1)
        layout = (int(page.compression), int(page.photometric), int(page.planarconfig), tuple(np.atleast_1d(page.extrasamples)))
    if dtype not in (np.uint8, np.uint16):
        raise NotStreamable(f"{path}: unsupported TIFF sample type {dtype} (8- or 16-bit unsigned integers)")
    compression, photometric, planar, extra = layout
    if compression != 1 or photometric not in (1, 2) or planar != 1 or 1 in extra or axes not in ("YX", "YXS") \
            or (len(shape) == 3 and shape[2] > 4):
        raise NotStreamable(f"{path}: a TIFF is streamed only uncompressed, grey or RGB, interleaved, without premultiplied "
                            f"alpha (this one: compression {compression}, photometric {photometric}, {axes} {shape})")
    channels = shape[2] if len(shape) == 3 else 1
    try:
        samples = tifffile.memmap(path, mode="r")
    except ValueError:
        raise NotStreamable(f"{path}: its strips are not stored contiguously, so it cannot be mapped") from None
    oriented = _orient(samples.reshape(shape[0], shape[1], channels), orientation)  # a view: nothing is copied
    return MappedImage(oriented, _MODES[channels], 8 if dtype == np.uint8 else 16, path.stem, file=open(path, "rb"))
