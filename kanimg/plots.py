"""Every figure kanimg draws: error maps, training curves, the comparison gallery, PSNR
against time, rate–distortion curves.

matplotlib's object API (Figure + Agg canvas) throughout, so no global backend or state is
touched; files are written atomically.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import atomic_path
from .results import fmt

ERROR_MAP_MAX = 0.1  # error maps use one fixed colour scale: |error| from 0 to 0.1 (10 % of range)
RD_MARKERS = {"kan": "o", "siren": "s", "jpeg": "^", "webp": "v", "avif": "D"}


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
    """Batch loss (with the learning rate, where recorded) and full-image PSNR against step, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_psnr = fig.subplots(1, 2)
    ax_loss.semilogy(history["step"], history["loss"], lw=1)
    ax_loss.set(xlabel="step", ylabel="batch MSE ([-1, 1] values)", title="training loss")
    rates = [(step, lr) for step, lr in zip(history["step"], history.get("lr", [])) if lr is not None]
    if rates:  # spikes in the loss come while the rate is high: the two on one plot
        ax_lr = ax_loss.twinx()
        ax_lr.semilogy(*zip(*rates), color="tab:orange", lw=1)
        ax_lr.set_ylabel("learning rate", color="tab:orange")
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


def _display(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) [0, 1] → something imshow shows as the image looks (grey, RGB; alpha dropped)."""
    pixels = np.clip(pixels, 0, 1)
    return pixels[..., 0] if pixels.shape[2] <= 2 else pixels[..., :3]


def error_scale(original: np.ndarray, reconstructions: Sequence[np.ndarray]) -> float:
    """One colour scale for every error map: the 99.5th percentile error over all models."""
    errors = np.concatenate([np.abs(np.clip(r, 0, 1) - original).mean(axis=2).ravel() for r in reconstructions])
    return float(max(np.percentile(errors, 99.5), 1e-3))


def gallery_png(path: Path, original: np.ndarray, records: list[dict], reconstructions: list[np.ndarray],
                title: str, crop: tuple[int, int, int, int] | None = None) -> None:
    """Original + labelled reconstructions, a row of error maps on one shared scale, and an
    optional zoomed crop (x, y, width, height) of each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(records) + 1
    rows = 3 if crop else 2
    height, width = original.shape[:2]
    panel = 2.6
    fig = Figure(figsize=(panel * n, panel * rows * height / width + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, n, squeeze=False)
    vmax = error_scale(original, reconstructions)
    grey = original.shape[2] <= 2
    images = [original, *reconstructions]
    labels = ["original"] + [f"{r['model']}\n{r['params']:,} params · {fmt(r['psnr'], '{:.2f}')} dB" for r in records]
    for col, (img, label) in enumerate(zip(images, labels)):
        ax = axes[0, col]
        ax.imshow(_display(img), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        if crop:
            ax.add_patch(Rectangle((crop[0] - 0.5, crop[1] - 0.5), crop[2], crop[3], fill=False, ec="yellow", lw=1))
            x, y, w, h = crop
            zoom = axes[2, col]
            zoom.imshow(_display(img[y : y + h, x : x + w]), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        err_ax = axes[1, col]
        if col == 0:
            err_ax.text(0.5, 0.5, f"|error|, shared scale\n0 … {vmax:.3f}", ha="center", va="center", fontsize=8)
        else:
            shown = err_ax.imshow(np.abs(np.clip(img, 0, 1) - original).mean(axis=2), cmap="inferno", vmin=0, vmax=vmax,
                                  interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, 0].set_axis_off()
    if len(records):
        fig.colorbar(shown, ax=axes[1, :].tolist(), shrink=0.8, label="mean |error| per pixel")
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def psnr_time_svg(histories: dict[str, dict]) -> str:
    """Inline SVG of full-image PSNR against training time, one line per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for model, hist in histories.items():
        ax.plot(hist["eval_seconds"], hist["eval_psnr"], "o-", ms=2.5, lw=1.2, label=model)
    ax.set(xlabel="training time (s)", ylabel="PSNR (dB)", title="PSNR against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]


def plot_rd(path: Path, curves: dict[str, dict], title: str, targets: Sequence[float]) -> None:
    """PSNR against bpp, one curve per codec (matplotlib object API, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = max(targets) * 1.15
    drawn = 0
    for name, curve in curves.items():
        pairs = sorted((b, p) for b, p in zip(curve["bpp"], curve["psnr"]) if b <= top)
        if pairs:
            ax.plot([b for b, _ in pairs], [p for _, p in pairs], marker=RD_MARKERS.get(name, "."), ms=4, lw=1.4, label=name)
            drawn += 1
    for target in targets:
        ax.axvline(target, color="0.85", lw=0.8, zorder=0)
    ax.set(xlabel="bits per pixel (file size × 8 / pixels)", ylabel="PSNR (dB, decoded 8-bit image)", title=title, xlim=(0, top))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="lower right")
    else:  # an empty frame would look like a failed plot: say why it is empty
        ax.text(0.5, 0.5, f"no file of at most {top:.3g} bpp", transform=ax.transAxes, ha="center", va="center", color="0.4")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
