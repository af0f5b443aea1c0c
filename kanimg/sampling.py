"""Pixel coordinates and the coordinate-sampling data loader.

Coordinates are (x, y) in [-1, 1]², x along the width, y along the height. Two conventions:

- "centers" (default): pixel j of N sits at its centre, (2j + 1)/N - 1. The image is the
  square [-1, 1]² whatever its resolution, so a fit rendered at any other size samples the
  same picture, aligned.
- "linspace": pixel j sits at -1 + 2j/(N - 1), as in the KAN paper's script (corner pixels on
  the border). Renders at other sizes also use linspace, which keeps corners aligned.

All tensor work happens on the target's device; there is no Python loop over pixels.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .errors import KanimgError

COORDINATES = ("centers", "linspace")


def axis_coords(n: int, convention: str, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """n coordinates in [-1, 1] along one axis, computed in ``dtype``."""
    if convention == "centers":
        return (2 * torch.arange(n, device=device, dtype=dtype) + 1) / n - 1
    if convention == "linspace":
        return torch.linspace(-1, 1, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype)
    raise ValueError(f"unknown coordinate convention {convention!r}; choose from {COORDINATES}")


def pixel_coords(height: int, width: int, convention: str = "centers", device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """(H·W, 2) coordinates (x, y) of every pixel in row-major order."""
    ys = axis_coords(height, convention, device, dtype)
    xs = axis_coords(width, convention, device, dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


class CoordinateSampler:
    """Random minibatches of (coordinates, colours) without replacement.

    Each epoch is a fresh permutation of all pixels cut into batches of ``batch_size`` (the
    last one smaller when it does not divide), so every pixel is visited exactly once per
    epoch. A batch size of 0 or ≥ the pixel count gives the full image every step.

    Data-parallel training (``share`` = (rank, world size)): every rank draws the same
    permutation and takes every size-th pixel of each batch, so the ranks' batches together
    are exactly the one-process batch of ``batch_size`` pixels.

    Args:
        coords: (N, 2) coordinates on the training device.
        values: (N, C) target values on the same device.
        batch_size: pixels per step (all ranks together).
        seed: seeds the sampler's own generator (not the global RNG).
        share: (rank, world size) of data-parallel training; (0, 1) alone.
    """

    def __init__(self, coords: Tensor, values: Tensor, batch_size: int, seed: int = 0, share: tuple[int, int] = (0, 1)) -> None:
        self.coords, self.values = coords, values
        self.rank, self.ranks = share
        self.n = coords.shape[0]
        self.batch_size = self.n if batch_size <= 0 else min(batch_size, self.n)
        self.generator = torch.Generator(device=coords.device)
        self.generator.manual_seed(seed)
        self.perm: Tensor | None = None
        self.pos = 0
        self.whole_count = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()

    def next_batch(self, whole: bool = False) -> tuple[Tensor, Tensor]:
        """This rank's share of the next batch (the whole batch with ``whole``, e.g. for grid
        updates, which every rank must compute alike)."""
        if self.batch_size == self.n:
            idx = None
        else:
            if self.perm is None or self.n - self.pos < self.ranks:  # (a tail too short to give every rank a pixel is skipped)
                self.perm = torch.randperm(self.n, generator=self.generator, device=self.coords.device)
                self.pos = 0
            idx = self.perm[self.pos : self.pos + self.batch_size]
            self.pos += idx.numel()
        self.whole_count = self.n if idx is None else idx.numel()  # pixels in the batch, all ranks together
        if self.ranks > 1 and not whole:
            idx = torch.arange(self.rank, self.n, self.ranks, device=self.coords.device) if idx is None else idx[self.rank :: self.ranks]
        return (self.coords, self.values) if idx is None else (self.coords[idx], self.values[idx])

    def state_dict(self) -> dict:
        """Where the sampler is, so that a resumed run draws the same batches."""
        return {"generator": self.generator.get_state(), "perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.coords.device)
        self.pos = int(state["pos"])


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class ImageTarget:
    """An image as training data: every pixel's coordinates and its colour on one device.

    Colours are mapped from [0, 1] to [-1, 1] (value = 2·pixel - 1), the range the KAN paper
    trains on (p/128 - 1) and SIREN's reference code uses; :mod:`kanimg.render` maps back.

    Args:
        pixels: (H, W, C) float in [0, 1].
        convention: "centers" or "linspace" (see :func:`axis_coords`).
    """

    def __init__(self, pixels, convention: str = "centers", device: torch.device | str = "cpu") -> None:
        self.height, self.width, self.channels = pixels.shape
        self.convention = convention
        self.coords = pixel_coords(self.height, self.width, convention, device)  # (N, 2)
        values = torch.as_tensor(pixels, dtype=torch.float32, device=device).reshape(-1, self.channels)
        self.values = values * 2 - 1  # (N, C) in [-1, 1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def count(self) -> int:
        return self.values.shape[0]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates and values of the pixels at row-major ``index``."""
        return self.coords[index], self.values[index]

    def share(self, rank: int = 0, ranks: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """Rank ``rank`` of ``ranks``'s part of every pixel (one contiguous slice), for evaluations."""
        rows = slice(rank * self.count // ranks, (rank + 1) * self.count // ranks)
        if rows.stop > rows.start:
            yield self.coords[rows], self.values[rows]

    def sampler(self, batch_size: int, seed: int = 0, share: tuple[int, int] = (0, 1)) -> CoordinateSampler:
        return CoordinateSampler(self.coords, self.values, batch_size, seed, share)


BAND_PIXELS = 1 << 16  # pixels a streamed target reads per evaluation band (whole rows; ~100 bytes a pixel while in use)


class MappedTarget:
    """A :class:`kanimg.mapped.MappedImage` as training data: colours are read from the map when
    a batch or an evaluation band needs them and coordinates are computed from the pixel
    indices, so nothing is held per pixel (an ImageTarget holds 4·(2 + C) bytes a pixel).
    Same interface as :class:`ImageTarget`; batches are drawn with replacement
    (:class:`RandomPixelSampler`)."""

    def __init__(self, image, convention: str = "centers", device: torch.device | str = "cpu") -> None:
        self.image = image
        self.height, self.width, self.channels = image.height, image.width, image.channels
        self.convention = convention
        self.xs = axis_coords(self.width, convention, device)
        self.ys = axis_coords(self.height, convention, device)

    @property
    def device(self) -> torch.device:
        return self.xs.device

    @property
    def count(self) -> int:
        return self.height * self.width

    def coords_at(self, index: Tensor) -> Tensor:
        """(N, 2) coordinates of row-major pixel ``index``, equal to :func:`pixel_coords`' rows."""
        index = index.to(self.device)
        return torch.stack([self.xs[index % self.width], self.ys[index // self.width]], dim=1)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        values = torch.from_numpy(self.image.take(index.cpu().numpy())).to(self.device)
        return self.coords_at(index), values * 2 - 1

    def share(self, rank: int = 0, ranks: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """Rank ``rank`` of ``ranks``'s rows of the image, read in bands of whole rows."""
        first, last = rank * self.height // ranks, (rank + 1) * self.height // ranks
        band = max(1, BAND_PIXELS // self.width)
        for start in range(first, last, band):
            stop = min(start + band, last)
            values = torch.from_numpy(self.image.rows(start, stop)).to(self.device).reshape(-1, self.channels)
            yield self.coords_at(torch.arange(start * self.width, stop * self.width)), values * 2 - 1

    def sampler(self, batch_size: int, seed: int = 0, share: tuple[int, int] = (0, 1)) -> "RandomPixelSampler":
        return RandomPixelSampler(self, batch_size, seed, share)


class RandomPixelSampler:
    """Random minibatches of a streamed target, drawn with replacement: a permutation of every
    pixel (CoordinateSampler's epochs) would itself take 8 bytes a pixel. Indices are sorted
    within a batch, so reads from the map run forward. Same interface as CoordinateSampler,
    the same data-parallel shares (every rank draws the same batch and takes every size-th
    pixel of it)."""

    def __init__(self, target: MappedTarget, batch_size: int, seed: int = 0, share: tuple[int, int] = (0, 1)) -> None:
        if batch_size <= 0:
            raise KanimgError(f"a streamed {target.width}x{target.height} image trains on batches of pixels; "
                              f"batch size 0 (the whole image every step) is refused")
        self.target, (self.rank, self.ranks) = target, share
        self.batch_size = min(batch_size, target.count)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.whole_count = 0

    def next_batch(self, whole: bool = False) -> tuple[Tensor, Tensor]:
        index = torch.randint(self.target.count, (self.batch_size,), generator=self.generator).sort().values
        self.whole_count = index.numel()
        return self.target.batch(index if whole else index[self.rank :: self.ranks])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
