"""kanimg from Python: fit, compare, compress and decode, on files or on arrays.

    >>> import numpy as np, kanimg
    >>> image = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    >>> result = kanimg.fit(image, steps=20, widths=[2, 8, 3], grids=[8, 4], progress=False)
    >>> result.reconstruction.shape, result.metrics["psnr"] > 20
    ((16, 16, 3), True)
    >>> result.render(size=(32, 24)).shape        # any size: (width, height)
    (24, 32, 3)
    >>> data = kanimg.compress(image, bpp=8.0, steps=20, qat_steps=0)
    >>> kanimg.decode(data).shape
    (16, 16, 3)

The run folder the CLI writes comes from ``result.save(folder)``; ``kanimg.compare`` runs a
comparison over an image file or a folder and writes its tables and gallery (see
:func:`kanimg.compare.compare`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .compress.api import read_kimg_bytes
from .compress.bitstream import decode_image
from .compress.neural import CompressConfig, compress_image
from .errors import KanimgError
from .files import RunFolder
from .fitting import _export, best_model, check_model_size, model_spec_for, new_trainer, resolve_device, run_config, train_config_for
from .io import MAX_PIXELS, ImageData, load_image, to_grey
from .metrics import reconstruction_metrics
from .models import get_entry
from .render import render
from .sampling import COORDINATES
from .train import Trainer, TrainConfig

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, "PIL.Image.Image"]  # noqa: F821
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def as_image(image: ImageLike, grey: bool = False, name: str = "array") -> ImageData:
    """Any image a user holds, as kanimg's ImageData (float32 pixels in [0, 1]).

    Accepts an image file path, a PIL image, or an (H, W) / (H, W, C) array or tensor with C
    from 1 to 4: uint8 (8-bit), uint16 (16-bit), or floats in [0, 1] (kept at 16 bits).
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, grey=grey)
    if hasattr(image, "getbands") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("RGBA" if "A" in image.getbands() else ("L" if image.mode in ("1", "L", "I", "I;16") else "RGB")))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise KanimgError(f"cannot read an image from a {type(image).__name__}; give a path, a PIL image, an array or a tensor")
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


@dataclass
class Fit:
    """A fitted image: the trained model, its reconstruction and scores, and how it was made."""

    image: ImageData
    trainer: Trainer
    config: dict
    wall_seconds: float
    interrupted: bool
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        """The best evaluated network (as the run folder's checkpoint keeps it)."""
        if "model" not in self._cache:
            self._cache["model"] = best_model(self.trainer.state_dict(), self.trainer.device).eval()
        return self._cache["model"]

    @property
    def reconstruction(self) -> np.ndarray:
        """(H, W, C) float32 pixels of the model on the image's own grid (unclipped)."""
        if "reconstruction" not in self._cache:
            self._cache["reconstruction"] = self.render()
        return self._cache["reconstruction"]

    @property
    def metrics(self) -> dict:
        """psnr, psnr_png (of the exported PNG), ssim, lpips (None where its weights are missing)."""
        if "metrics" not in self._cache:
            self._cache["metrics"] = reconstruction_metrics(self.image.pixels, self.reconstruction, self.image.bit_depth)
        return self._cache["metrics"]

    @property
    def history(self) -> dict:
        """Training curves: step/loss every 10 steps, eval_step/eval_psnr/eval_seconds per evaluation."""
        return dict(self.trainer.history.__dict__)

    def render(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The model on a width × height grid (default: the image's size), as (H, W, C) floats."""
        width, height = size or (self.image.width, self.image.height)
        if width < 1 or height < 1 or width * height > MAX_PIXELS:
            raise KanimgError(f"cannot render {width}x{height}: sizes run from 1x1 to {MAX_PIXELS / 1e6:.0f} megapixels")
        return render(self.model, height, width, self.config["coords"], self.trainer.device)

    def save(self, folder: str | os.PathLike, force: bool = False) -> Path:
        """Write the run folder ``kanimg fit`` writes (reconstruction, error map, metrics.json,
        curves, checkpoint); an existing folder only with ``force`` (and only one kanimg wrote)."""
        run = RunFolder(Path(folder), "fit", replace=force)
        with run as staging:
            _export(staging, self.image, self.trainer, self.config, self.wall_seconds, self.interrupted, None)
        return run.final


def fit(image: ImageLike, model: str = "kan", *, steps: int | None = None, device: str = "auto", grey: bool = False,
        coords: str = "centers", progress: bool = True, **options: Any) -> Fit:
    """Fit an image with a registered model and return the result (nothing is written).

    ``options`` are the model's options (e.g. ``widths``, ``grids``, ``directions``) and
    TrainConfig's fields (e.g. ``lr``, ``batch_size``, ``budget_seconds``, ``precision``,
    ``compile``); left out, they take the same defaults as ``kanimg fit``. Ctrl-C stops
    training early and returns what was reached (``result.interrupted``).
    """
    data = as_image(image, grey=grey)
    if coords not in COORDINATES:
        raise KanimgError(f"unknown coordinate convention {coords!r}; choose from {', '.join(COORDINATES)}")
    model_options, train_options = _split_options(model, options)
    dev = resolve_device(device)
    spec = model_spec_for(model, model_options, data.channels, (data.height, data.width))
    cfg = train_config_for(model, {**train_options, "steps": steps}, (data.height, data.width), dev)
    check_model_size(model, spec, cfg)
    trainer = new_trainer(model, spec, cfg, data, coords, dev, progress)
    path = str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else None
    started, interrupted = time.perf_counter(), False
    try:
        trainer.train()
    except KeyboardInterrupt:
        interrupted = True
        trainer.evaluate_if_stale()
    return Fit(data, trainer, run_config(trainer, data, path, grey, coords), time.perf_counter() - started, interrupted)


def _split_options(model: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_keys = set(get_entry(model).defaults)
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - model_keys - train_keys)
    if unknown:
        raise KanimgError(f"unknown option(s) for {model}: {', '.join(unknown)} (model options: {', '.join(sorted(model_keys))}; "
                          f"training options: {', '.join(sorted(train_keys))})")
    return ({k: v for k, v in options.items() if k in model_keys}, {k: v for k, v in options.items() if k in train_keys})


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
