"""What a run leaves behind: images, plots, metrics.json and a safe checkpoint, written atomically.

Plots use matplotlib's object API (Figure + Agg canvas), so no global backend is touched.
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import KanimgError
from .files import atomic_path, atomic_write_bytes
from .models import saved_spec

CHECKPOINT_FORMAT = "kanimg-checkpoint"
CHECKPOINT_VERSION = 1
ERROR_MAP_MAX = 0.1  # error maps use one fixed colour scale: |error| from 0 to 0.1 (10 % of range)


def versions() -> dict[str, str]:
    """Library versions recorded with every result."""
    import PIL
    import scipy
    import skimage

    return {
        "kanimg": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
        "numpy": np.__version__, "pillow": PIL.__version__, "scikit-image": skimage.__version__, "scipy": scipy.__version__,
    }


def write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(_jsonable(payload), indent=2) + "\n").encode())


def _jsonable(value: Any) -> Any:
    """Make floats JSON-safe (inf/NaN become null) and tensors plain."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save a dict of tensors and plain Python values, loadable with weights_only=True."""
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp)


# What every kanimg checkpoint holds (and render / resume read), as nested keys.
CHECKPOINT_KEYS = {
    "config": {"model": {"name": None}, "train": None, "grey": None, "coords": None,
               "image": {"path": None, "height": None, "width": None, "channels": None, "bit_depth": None}},
    "trainer": {"step": None, "spec": None, "model": None, "best_model": None, "best_spec": None},
}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a kanimg checkpoint safely (weights_only: no arbitrary objects are unpickled).

    Raises:
        KanimgError: missing, unreadable, not a kanimg checkpoint, or missing what one holds.
    """
    path = Path(path)
    if not path.is_file():
        raise KanimgError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise KanimgError(f"{path}: not a readable kanimg checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise KanimgError(f"{path}: not a kanimg checkpoint")
    if not isinstance(payload.get("version"), int) or payload["version"] > CHECKPOINT_VERSION:
        raise KanimgError(f"{path}: checkpoint version {payload.get('version')!r} is not one this kanimg reads (up to {CHECKPOINT_VERSION})")
    missing = _missing_keys(payload, CHECKPOINT_KEYS)
    if missing:
        raise KanimgError(f"{path}: incomplete kanimg checkpoint (no {missing})")
    trainer = payload["trainer"]
    try:
        payload["config"]["model"] = saved_spec(payload["config"]["model"])
        trainer["spec"] = saved_spec(trainer["spec"])
        trainer["best_spec"] = trainer["best_spec"] and saved_spec(trainer["best_spec"])
    except (TypeError, KeyError):
        raise KanimgError(f"{path}: its model spec is not one kanimg wrote") from None
    return payload


def _missing_keys(value: Any, required: dict, prefix: str = "") -> str | None:
    """The first required nested key that ``value`` lacks, as 'a.b', or None."""
    for key, inner in required.items():
        if not isinstance(value, dict) or key not in value:
            return prefix + key
        if inner is not None:
            missing = _missing_keys(value[key], inner, f"{prefix}{key}.")
            if missing:
                return missing
    return None


def error_map(reference: np.ndarray, test: np.ndarray, vmax: float = ERROR_MAP_MAX) -> np.ndarray:
    """(H, W, 3) uint8 'inferno' picture of the per-pixel mean |error|, scaled 0 … vmax."""
    from matplotlib import colormaps

    err = np.abs(np.clip(test, 0, 1) - reference).mean(axis=2)
    rgba = colormaps["inferno"](np.clip(err / vmax, 0, 1))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def save_rgb8(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def plot_curves(path: Path, history: dict, title: str) -> None:
    """Batch loss and full-image PSNR against step, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_psnr = fig.subplots(1, 2)
    ax_loss.semilogy(history["step"], history["loss"], lw=1)
    ax_loss.set(xlabel="step", ylabel="batch MSE ([-1, 1] values)", title="training loss")
    batch_psnr = [10 * math.log10(4 / v) if v > 0 else float("nan") for v in history["loss"]]
    ax_psnr.plot(history["step"], batch_psnr, lw=0.8, alpha=0.5, label="batch")
    ax_psnr.plot(history["eval_step"], history["eval_psnr"], "o-", ms=3, label="full image")
    ax_psnr.set(xlabel="step", ylabel="PSNR (dB)", title="PSNR")
    ax_psnr.legend(loc="lower right")
    for ax in (ax_loss, ax_psnr):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
