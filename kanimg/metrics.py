"""Image quality metrics: PSNR, SSIM (scikit-image) and LPIPS (the ``lpips`` package).

PSNR here is 10·log10(1 / MSE) on pixels in [0, 1], which equals the KAN paper's
20·log10(255 / RMSE) on the 0–255 scale. Reconstructions are scored unclipped (as the paper
does) and, separately, as the exported integer image a user would measure from the file.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# torchvision's file name for the ImageNet AlexNet weights that LPIPS uses as its backbone.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB of a mean squared error on a signal of range ``peak`` (inf for mse = 0)."""
    return math.inf if mse <= 0 else 10 * math.log10(peak * peak / mse)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB between two float images in [0, 1] (``test`` is not clipped)."""
    diff = np.asarray(reference, dtype=np.float64) - np.asarray(test, dtype=np.float64)
    return psnr_from_mse(float(np.mean(diff * diff)))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004, scikit-image's implementation) of (H, W, C) images in [0, 1].

    The test image is clipped to [0, 1]; images smaller than SSIM's 7×7 window use the
    largest odd window that fits.
    """
    from skimage.metrics import structural_similarity

    ref = np.asarray(reference, dtype=np.float64)
    tst = np.clip(np.asarray(test, dtype=np.float64), 0, 1)
    win = min(7, min(ref.shape[:2]) - (1 - min(ref.shape[:2]) % 2))
    if win < 3:
        return float("nan")
    return float(structural_similarity(ref, tst, data_range=1.0, channel_axis=-1, win_size=win))


SSIM_WINDOW = 7


def ssim_in_bands(reference: Callable[[int, int], np.ndarray], test: Callable[[int, int], np.ndarray], height: int,
                  band_rows: int) -> float:
    """:func:`ssim` of two (H, W, C) images read as row bands (``reference(start, stop)`` gives
    rows start … stop - 1), never holding either: each band is read with the 3 rows of context
    the 7×7 window needs, and the mean runs over the same pixels as scikit-image's (all but a
    3-pixel border), so the value equals the whole-image one up to rounding. NaN when the
    image is under 7 pixels high or wide."""
    from skimage.metrics import structural_similarity

    pad = SSIM_WINDOW // 2
    total, count = 0.0, 0
    for start in range(pad, height - pad, max(1, band_rows)):
        stop = min(start + band_rows, height - pad)
        ref, tst = reference(start - pad, stop + pad), test(start - pad, stop + pad)
        if ref.shape[1] < SSIM_WINDOW:
            break
        for channel in range(ref.shape[2]):  # one at a time: SSIM's float64 temporaries are ~15 copies of its input
            _, local = structural_similarity(ref[..., channel].astype(np.float64), np.clip(tst[..., channel], 0, 1).astype(np.float64),
                                             data_range=1.0, win_size=SSIM_WINDOW, full=True)
            inner = local[pad:-pad, pad:-pad]
            total, count = total + float(inner.sum(dtype=np.float64)), count + inner.size
    return total / count if count else float("nan")


def lpips_backbone_path() -> Path:
    """Where torchvision keeps (or would keep) the AlexNet weights LPIPS needs."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS


def lpips_distance(reference: np.ndarray, test: np.ndarray, backbone: Path | None = None) -> tuple[float | None, str | None]:
    """LPIPS (AlexNet, v0.1) between (H, W, C) images in [0, 1]: (value, None) or (None, reason).

    LPIPS needs the ImageNet AlexNet weights; they are only read from disk (torchvision's
    cache, or ``backbone``), never downloaded. Grey images are repeated to three channels;
    an alpha channel is ignored.
    """
    path = Path(backbone) if backbone is not None else lpips_backbone_path()
    if not path.is_file():
        return None, f"LPIPS backbone weights not found at {path} (no download attempted)"
    if min(reference.shape[:2]) < 16:
        return None, "image smaller than 16 pixels, too small for LPIPS"
    try:
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
            state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        _load_alexnet_features(metric.net, features)
    except Exception as exc:  # a broken weights file or lpips install: report, don't crash
        return None, f"LPIPS unavailable: {str(exc).splitlines()[0][:160]}"

    def to_tensor(img: np.ndarray) -> torch.Tensor:
        rgb = np.clip(img, 0, 1)[..., :3] if img.shape[2] >= 3 else np.repeat(np.clip(img, 0, 1)[..., :1], 3, axis=2)
        return torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] * 2 - 1

    with torch.no_grad():
        value = metric(to_tensor(reference), to_tensor(test)).item()
    return float(value), None


def _load_alexnet_features(net: torch.nn.Module, features: dict[str, torch.Tensor]) -> None:
    """Copy torchvision AlexNet ``features.*`` weights into lpips' sliced AlexNet."""
    modules = {name.split(".")[-1]: mod for name, mod in net.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    loaded = 0
    for idx, conv in modules.items():
        w, b = features.get(f"{idx}.weight"), features.get(f"{idx}.bias")
        if w is None or b is None or w.shape != conv.weight.shape:
            raise ValueError(f"AlexNet weights do not match LPIPS layer {idx}")
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(b)
        loaded += 1
    if loaded != 5:
        raise ValueError("expected 5 AlexNet convolutions")


def reconstruction_metrics(reference: np.ndarray, reconstruction: np.ndarray, bit_depth: int) -> dict:
    """Every score of a fit: PSNR unclipped and of the exported ``bit_depth``-bit PNG, SSIM, LPIPS
    (None with ``lpips_note`` saying why, where its weights are not on this machine)."""
    top = float(2**bit_depth - 1)
    exported = np.round(np.clip(reconstruction, 0.0, 1.0) * top) / top  # what the PNG holds, read back
    lpips_value, lpips_note = lpips_distance(reference, reconstruction)
    return {
        "psnr": psnr(reference, reconstruction),
        "psnr_png": psnr(reference, exported.astype(np.float32)),
        "ssim": ssim(reference, reconstruction),
        "lpips": lpips_value,
        "lpips_note": lpips_note,
    }
