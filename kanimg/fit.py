"""Fit one image end to end: decode → build → train → render → measure → export a run folder.

This is the library behind ``kanimg fit``; ``fit_image`` can be called from Python as well.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import KanimgError
from .export import (error_map, load_checkpoint, plot_curves, save_checkpoint, save_rgb8, versions, write_json)
from .files import RunFolder
from .io import ImageData, load_image, quantize, save_png
from .metrics import lpips_distance, psnr, ssim
from .models import build_model, get_entry, kan_grids_for
from .render import render
from .sampling import COORDINATES, ImageTarget
from .train import Trainer, TrainConfig

log = logging.getLogger(__name__)
DEFAULT_IMAGE_NAME = "astronaut.png"


def default_image() -> Path:
    """The bundled photograph: assets/ beside the package (source checkout or editable install),
    else where setup.py's data_files put it (<prefix>/share/kanimg/assets)."""
    for folder in (Path(__file__).resolve().parent.parent / "assets", Path(sys.prefix) / "share" / "kanimg" / "assets"):
        if (folder / DEFAULT_IMAGE_NAME).is_file():
            return folder / DEFAULT_IMAGE_NAME
    raise KanimgError(f"the bundled image {DEFAULT_IMAGE_NAME} is missing from this installation; pass an image file")
OUTPUT_FILES = ("reconstruction.png", "error.png", "curves.png", "metrics.json", "checkpoint.pt")


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KanimgError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if name not in ("cpu", "cuda"):
        raise KanimgError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def model_spec_for(name: str, spec: dict[str, Any], channels: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The model options for an image with ``channels`` channels (and ``size`` = (H, W)).

    Widths run from 2 (x, y) to the channel count. Default widths end in it; user widths
    ending in 1 (written for a grey image) get one output per channel, with a log line.
    A KAN without grids gets grids sized to the image (see models.kan_grids_for).
    """
    spec = {k: v for k, v in spec.items() if v is not None}
    entry = get_entry(name)
    if "widths" not in spec:
        widths = list(entry.default_spec()["widths"])
        spec["widths"] = widths[:-1] + [channels]
    widths = list(spec["widths"])
    if widths[0] != 2:
        raise KanimgError(f"widths must start with 2 (the x, y coordinates), got {widths}")
    if widths[-1] == 1 and channels > 1:
        spec["widths"] = widths = widths[:-1] + [channels]
        log.info("the image has %d channels: output width set to %d (widths %s)", channels, channels, ",".join(map(str, widths)))
    if widths[-1] != channels:
        kind = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}[channels]
        raise KanimgError(f"widths end in {widths[-1]} but the image has {channels} channel(s) ({kind}): end them in {channels}")
    if entry.family == "kan" and "grids" not in spec and entry.defaults["grids"] is None and size is not None:
        spec["grids"] = kan_grids_for(widths, *size)
    return spec


def train_config_for(name: str, overrides: dict[str, Any]) -> TrainConfig:
    """The family's training defaults (e.g. SIREN's lr 1e-4) updated with the user's choices."""
    values = {**get_entry(name).train_defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values)


@dataclass
class FitResult:
    out: Path
    metrics: dict[str, Any]
    interrupted: bool


def fit_image(
    image: str | Path | None = None,
    *,
    model: str = "kan",
    spec: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    resume: str | Path | None = None,
    device: str = "auto",
    grey: bool = False,
    coords: str = "centers",
    progress: bool = True,
) -> FitResult:
    """Fit ``image`` with a registered model and write the run folder.

    Args:
        image: image file; None uses the bundled photograph (or, on resume, the checkpoint's image).
        model, spec: registry name and model options (None values take the defaults).
        train: TrainConfig fields to override (None values take the family's defaults).
        out: run folder; default runs/<image>-<model>. Refused if it exists unless ``force``.
        resume: checkpoint to continue from; its model and training options are used
            (``train["steps"]`` may extend the run) and its folder is the default ``out``.
        device: "auto", "cpu" or "cuda".
        grey: fit the luminance only.
        coords: pixel coordinate convention, "centers" or "linspace".
        progress: show a progress bar.
    Returns:
        FitResult; ``interrupted`` is True when Ctrl-C stopped training early (the folder then
        holds the best result so far and a checkpoint to resume from).
    Raises:
        KanimgError: any problem with the inputs, detected before a folder is created, or a
            diverged run (its folder is removed).
    """
    dev = resolve_device(device)
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        config = state["config"]
        model, grey, coords = config["model"]["name"], config["grey"], config["coords"]
        image = image if image is not None else config["image"]["path"]
        out = out if out is not None else Path(resume).parent
        force = True  # a resumed run replaces the folder it continues
    if coords not in COORDINATES:
        raise KanimgError(f"unknown coordinate convention {coords!r}; choose from {', '.join(COORDINATES)}")
    image_path = Path(image) if image is not None else default_image()
    data = load_image(image_path, grey=grey)

    if state is None:
        spec = model_spec_for(model, spec or {}, data.channels, (data.height, data.width))
        cfg = train_config_for(model, train or {})
    else:
        saved = state["config"]
        if [data.height, data.width, data.channels] != [saved["image"][k] for k in ("height", "width", "channels")]:
            raise KanimgError(f"{image_path} is not the image {resume} was trained on "
                              f"({saved['image']['width']}x{saved['image']['height']}, {saved['image']['channels']} channels)")
        spec = {k: v for k, v in state["trainer"]["spec"].items() if k != "name"}
        cfg = TrainConfig(**{**saved["train"], **{k: v for k, v in (train or {}).items() if k == "steps" and v is not None}})
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        net = build_model(model, **spec).to(dev)
    target = ImageTarget(data.pixels, coords, dev)
    trainer = Trainer(net, target, cfg, progress=progress)
    if state is not None:
        trainer.load_state_dict(_to_device(state["trainer"], dev))

    out = Path(out) if out is not None else Path("runs") / f"{data.name}-{model}"
    config = {
        "model": net.spec, "train": cfg.to_dict(), "device": str(dev), "grey": grey, "coords": coords,
        "image": {"path": str(image_path.resolve()), "name": data.name, "height": data.height, "width": data.width,
                  "channels": data.channels, "mode": data.mode, "bit_depth": data.bit_depth},
    }
    with RunFolder(out, replace=force) as staging:
        started = time.perf_counter()
        interrupted = False
        try:
            trainer.train()
        except KeyboardInterrupt:
            interrupted = True
            if not trainer.history.eval_step or trainer.history.eval_step[-1] != trainer.step:
                trainer.evaluate()
        metrics = _export(staging, data, trainer, config, time.perf_counter() - started, interrupted)
    return FitResult(out, metrics, interrupted)


def _to_device(value: Any, dev: torch.device) -> Any:
    """Move a checkpoint's tensors (not RNG states, which live on the CPU) to ``dev``."""
    if isinstance(value, dict):
        return {k: (v if k == "generator" else _to_device(v, dev)) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, dev) for v in value]
    return value.to(dev) if isinstance(value, torch.Tensor) else value


def _export(folder: Path, data: ImageData, trainer: Trainer, config: dict, wall: float, interrupted: bool) -> dict:
    """Render the best weights and write every output of the run into ``folder``."""
    best = best_model(trainer.state_dict(), trainer.device)
    recon = render(best, data.height, data.width, config["coords"], trainer.device)
    ints = quantize(recon, data.bit_depth)
    save_png(folder / "reconstruction.png", recon, data.bit_depth)
    save_rgb8(folder / "error.png", error_map(data.pixels, recon))
    lpips_value, lpips_note = lpips_distance(data.pixels, recon)
    params = sum(p.numel() for p in best.parameters())
    steps_done = trainer.step
    metrics = {
        "psnr": psnr(data.pixels, recon),
        "psnr_png": psnr(data.pixels, ints.astype(np.float32) / float(2**data.bit_depth - 1)),  # as load_image reads it
        "ssim": ssim(data.pixels, recon),
        "lpips": lpips_value,
        "lpips_note": lpips_note,
    }
    result = {
        "image": config["image"]["path"],
        "model": best.spec,
        "params": params,
        "metrics": metrics,
        "best_step": trainer.best_step,
        "steps_done": steps_done,
        "interrupted": interrupted,
        "wall_seconds": round(wall, 3),
        "train_seconds": round(trainer.train_seconds, 3),
        "steps_per_second": round(steps_done / trainer.train_seconds, 3) if trainer.train_seconds > 0 else None,
        "device": config["device"],
        "seed": config["train"]["seed"],
        "config": config,
        "versions": versions(),
        "history": trainer.history.__dict__,
    }
    write_json(folder / "metrics.json", result)
    title = f"{config['image']['name']} · {best.spec['name']} · {params:,} params · {metrics['psnr']:.2f} dB"
    plot_curves(folder / "curves.png", trainer.history.__dict__, title)
    save_checkpoint(folder / "checkpoint.pt", {"config": config, "trainer": trainer.state_dict(), "versions": versions()})
    return result


def best_model(trainer_state: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The best evaluated model of a Trainer.state_dict() (the latest weights if none was
    evaluated), rebuilt from its own spec since grids may have been extended after it."""
    spec = dict(trainer_state["best_spec"] or trainer_state["spec"])
    model = build_model(spec.pop("name"), **spec)
    model.load_state_dict(trainer_state["best_model"] or trainer_state["model"])
    return model.to(device)
