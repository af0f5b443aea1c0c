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

import torch

from .errors import KanimgError
from .export import (error_map, load_checkpoint, plot_curves, save_checkpoint, save_rgb8, versions, write_json)
from .files import RunFolder, staging_folder
from .io import ImageData, load_image, save_png
from .metrics import reconstruction_metrics
from .models import build_model, get_entry, param_count
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
    Options an entry sizes to the image (a KAN's grids, a hash grid's finest resolution) are
    filled in when the user left them unset.
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
    if entry.for_image is not None and size is not None:
        for key, value in entry.for_image(widths, *size).items():
            if key not in spec and entry.defaults[key] is None:
                spec[key] = value
    return spec


# A GPU is far from busy at the CPU's batch sizes (4,096–16,384 pixels): on CUDA a batch size the
# user did not choose is this many times the family's default (capped by the image's pixel count
# in the sampler), so a step sees more pixels at about the same time per step.
GPU_BATCH_FACTOR = 16


def train_config_for(name: str, overrides: dict[str, Any], size: tuple[int, int] | None = None,
                     device: torch.device | None = None) -> TrainConfig:
    """The family's training defaults (e.g. SIREN's lr 1e-4) updated with the user's choices;
    with the image's ``size`` = (H, W), steps left unset grow with it (:func:`steps_for_image`);
    on a CUDA ``device`` the default batch size grows by GPU_BATCH_FACTOR."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    values = {**get_entry(name).train_defaults, **chosen}
    if size is not None and "steps" not in values:
        values["steps"] = steps_for_image(*size)
    if device is not None and device.type == "cuda" and "batch_size" not in chosen:
        values["batch_size"] = values.get("batch_size", TrainConfig.batch_size) * GPU_BATCH_FACTOR
    return TrainConfig.from_dict(values)


# Steps of a fit that names none: 2,000 up to 256×256 pixels (125 passes over them in
# batches of 4,096), then growing with the square root of the pixel count, so a larger photo
# trains longer without its time growing as fast as its size; at most MAX_DEFAULT_STEPS.
DEFAULT_STEPS_PIXELS = 256 * 256
MAX_DEFAULT_STEPS = 20_000


def steps_for_image(height: int, width: int) -> int:
    """Default training steps for an image of height × width pixels (multiples of 100)."""
    scale = max(1.0, (height * width / DEFAULT_STEPS_PIXELS) ** 0.5)
    return int(min(MAX_DEFAULT_STEPS, round(TrainConfig.steps * scale, -2)))


@dataclass
class FitResult:
    out: Path
    metrics: dict[str, Any]
    interrupted: bool


# A running fit writes a checkpoint into its staging folder this often (seconds of wall time),
# so a kill -9 or a power cut loses at most this much training: ``--resume`` continues from it.
CHECKPOINT_SECONDS = 30.0
# Settings a resumed run may change; every other one it keeps (and a different value is refused).
CHANGEABLE_ON_RESUME = ("steps", "eval_every", "compile")
# Largest model fit() builds: parameters, gradients and two Adam moments take 16 bytes each.
MAX_PARAMETERS = 200_000_000


class ResumeMismatch(KanimgError):
    """``--resume`` was given settings that differ from the run it continues."""


def fit_image(
    image: str | Path | None = None,
    *,
    model: str | None = None,
    spec: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    resume: str | Path | bool | None = None,
    device: str = "auto",
    grey: bool = False,
    coords: str | None = None,
    progress: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> FitResult:
    """Fit ``image`` with a registered model and write the run folder.

    Args:
        image: image file; None uses the bundled photograph (or, on resume, the checkpoint's image).
        model, spec: registry name (default "kan") and model options (None values take the defaults).
        train: TrainConfig fields to override (None values take the family's defaults).
        out: run folder; default runs/<image>-<model>. Refused if it exists unless ``force``.
        resume: continue a run: True = from the latest checkpoint of ``out`` (its staging
            folder's, after a crash or kill, else its finished one); a checkpoint file or a run
            folder = from that. The run keeps its settings: only ``train["steps"]`` (to extend
            it), ``train["eval_every"]`` and ``train["compile"]`` may change, and other values that differ are refused.
            The run folder it continues is updated in place; another ``out`` needs ``force``.
        device: "auto", "cpu" or "cuda".
        grey: fit the luminance only.
        coords: pixel coordinate convention, "centers" (default) or "linspace".
        progress: show a progress bar.
        checkpoint_seconds: period of the checkpoints written while training.
    Returns:
        FitResult; ``interrupted`` is True when Ctrl-C stopped training early (the folder then
        holds the best result so far and a checkpoint to resume from).
    Raises:
        KanimgError: any problem with the inputs, detected before training starts; a diverged
            run (nothing is kept); ResumeMismatch for settings that differ from a resumed run.
    """
    dev = resolve_device(device)
    state, checkpoint, replace = None, None, force
    if resume:
        if resume is True:
            if out is None:
                out = Path("runs") / f"{Path(image).stem if image is not None else default_image().stem}-{model or 'kan'}"
            checkpoint = latest_checkpoint(Path(out))
            if checkpoint is None:
                raise KanimgError(f"{out}: nothing to resume (no checkpoint in it or in {staging_folder(Path(out))})")
        else:
            checkpoint = Path(resume)
            if checkpoint.is_dir():
                checkpoint = latest_checkpoint(checkpoint) or checkpoint / "checkpoint.pt"
        state = load_checkpoint(checkpoint)
        config = state["config"]
        _refuse_changes({"--model": (model, config["model"]["name"]), "--coords": (coords, config["coords"]),
                         "--grey": (grey or None, config["grey"])}, checkpoint)
        model, grey, coords = config["model"]["name"], config["grey"], config["coords"]
        if image is None and config["image"]["path"] is None:
            raise KanimgError(f"{checkpoint}: this run was fitted from an array, not a file; give the image to resume it")
        image = image if image is not None else config["image"]["path"]
        own_run = run_folder_of(checkpoint)
        out = Path(out) if out is not None else own_run
        replace = force or out.resolve() == own_run.resolve()  # continuing a run updates its own folder
    model, coords = model or "kan", coords or "centers"
    if coords not in COORDINATES:
        raise KanimgError(f"unknown coordinate convention {coords!r}; choose from {', '.join(COORDINATES)}")
    image_path = Path(image) if image is not None else default_image()
    data = load_image(image_path, grey=grey)

    if state is None:
        spec = model_spec_for(model, spec or {}, data.channels, (data.height, data.width))
        cfg = train_config_for(model, train or {}, (data.height, data.width), dev)
    else:
        saved = state["config"]
        if [data.height, data.width, data.channels] != [saved["image"][k] for k in ("height", "width", "channels")]:
            raise KanimgError(f"{image_path} is not the image {checkpoint} was trained on "
                              f"({saved['image']['width']}x{saved['image']['height']}, {saved['image']['channels']} channels)")
        saved_spec = {k: v for k, v in state["trainer"]["spec"].items() if k != "name"}
        given = {k: v for k, v in (spec or {}).items() if v is not None}
        resolved = model_spec_for(model, given, data.channels) if given else {}
        overrides = {k: v for k, v in (train or {}).items() if v is not None}
        wanted = TrainConfig.from_dict({**saved["train"], **overrides}).to_dict()
        _refuse_changes({**{_flag(k): (resolved[k], saved_spec.get(k)) for k in given},
                         **{_flag(k): (wanted[k], saved["train"][k]) for k in overrides if k not in CHANGEABLE_ON_RESUME}},
                        checkpoint)
        spec = saved_spec
        cfg = TrainConfig.from_dict({**saved["train"], **{k: v for k, v in overrides.items() if k in CHANGEABLE_ON_RESUME}})
    check_model_size(model, spec, cfg)
    folder = RunFolder(Path(out) if out is not None else Path("runs") / f"{data.name}-{model}", "fit", replace=replace)
    trainer = new_trainer(model, spec, cfg, data, coords, dev, progress)
    if state is not None:
        try:
            trainer.load_state_dict(_to_device(state["trainer"], dev))
            best_model(state["trainer"])  # the best weights are what the run exports: check them now, not after training
        except (KeyError, TypeError, ValueError, RuntimeError, KanimgError) as exc:
            raise KanimgError(f"{checkpoint}: its training state does not fit its model ({_first_line(exc)})") from None

    config = run_config(trainer, data, str(image_path.resolve()), grey, coords)
    with folder as staging:
        _settle_leftover(folder, checkpoint, force)
        periodic = PeriodicCheckpoint(staging / "checkpoint.pt", config, checkpoint_seconds)
        started = time.perf_counter()
        interrupted = False
        try:
            trainer.train(on_step=periodic)
        except KeyboardInterrupt:
            interrupted = True
            trainer.evaluate_if_stale()
        except KanimgError:
            if checkpoint is None or checkpoint.parent != folder.staging:
                folder.clear()  # a diverged run: its checkpoints are not worth resuming (one it resumed from stays)
            raise
        resumed_from = None if state is None else int(state["trainer"]["step"])
        metrics = _export(staging, data, trainer, config, time.perf_counter() - started, interrupted, resumed_from)
    return FitResult(folder.final, metrics, interrupted)


def new_trainer(model: str, spec: dict[str, Any], cfg: TrainConfig, data: ImageData, coords: str, device: torch.device,
                progress: bool) -> Trainer:
    """A Trainer of a freshly built ``model`` on ``data``, its initialisation seeded by ``cfg.seed``
    (without touching the caller's random state)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        net = build_model(model, **spec).to(device)
    return Trainer(net, ImageTarget(data.pixels, coords, device), cfg, progress=progress)


def run_config(trainer: Trainer, data: ImageData, image_path: str | None, grey: bool, coords: str) -> dict:
    """What a run folder and its checkpoints record about how the run was made."""
    return {
        "model": trainer.model.spec, "train": trainer.config.to_dict(), "device": str(trainer.device), "grey": grey, "coords": coords,
        "image": {"path": image_path, "name": data.name, "height": data.height, "width": data.width,
                  "channels": data.channels, "mode": data.mode, "bit_depth": data.bit_depth},
    }


class PeriodicCheckpoint:
    """Trainer ``on_step`` hook: a checkpoint every ``seconds`` of wall time (atomic writes, so
    a kill during one leaves the previous)."""

    def __init__(self, path: Path, config: dict, seconds: float) -> None:
        self.path, self.config, self.seconds = path, config, seconds
        self.last = time.monotonic()

    def __call__(self, trainer: Trainer) -> None:
        if time.monotonic() - self.last >= self.seconds:
            save_checkpoint(self.path, checkpoint_payload(self.config, trainer))
            self.last = time.monotonic()


def checkpoint_payload(config: dict, trainer: Trainer) -> dict:
    return {"config": config, "trainer": trainer.state_dict(), "versions": versions()}


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint of a run folder: its staging folder's (a run killed or still
    training), else its finished one; None if it has neither."""
    for candidate in (staging_folder(run) / "checkpoint.pt", Path(run) / "checkpoint.pt"):
        if candidate.is_file():
            return candidate
    return None


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (also for one in a ``.NAME.partial`` staging folder)."""
    folder = Path(checkpoint).parent
    if folder.name.startswith(".") and folder.name.endswith(".partial"):
        return folder.parent / folder.name[1 : -len(".partial")]
    return folder


def _settle_leftover(folder: RunFolder, checkpoint: Path | None, force: bool) -> None:
    """Decide about work an earlier, dead run left in the staging folder: keep it when it is
    what we resume, drop it when it holds no checkpoint or ``force`` says so, refuse otherwise."""
    if not folder.leftover:
        return
    left = folder.staging / "checkpoint.pt"
    if checkpoint is not None and checkpoint.resolve() == left.resolve():
        return
    if left.is_file() and not force:
        try:
            step = f" at step {int(load_checkpoint(left)['trainer']['step']):,}"
        except (KanimgError, KeyError, TypeError, ValueError):
            step = ""
        raise KanimgError(f"{folder.final}: an interrupted run{step} is waiting in {folder.staging}; continue it with "
                          f"--resume (no path), or pass --force to start over")
    folder.clear()


def _refuse_changes(pairs: dict[str, tuple[Any, Any]], checkpoint: Path) -> None:
    """ResumeMismatch for the first flag whose given value differs from the resumed run's."""
    for flag, (given, saved) in pairs.items():
        if given is not None and given != saved:
            raise ResumeMismatch(f"{flag} {_show(given)} differs from the run in {checkpoint} ({_show(saved)}); a resumed run "
                                 f"keeps its settings (only --steps, --eval-every and --compile may change): start a new run with -o")


def _flag(option: str) -> str:
    return {"num_features": "--features"}.get(option, "--" + option.replace("_", "-"))


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check_model_size(model: str, spec: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse models (also after scheduled grid extensions) too large to train, before allocating."""
    family = get_entry(model).family
    if cfg.grid_schedule and family != "kan":
        raise KanimgError(f"--grid-schedule extends KAN grids; {model} is a {family} model")
    shapes = [spec] + [{**spec, "grids": grids} for _, grids in cfg.grid_schedule]
    for option in shapes:
        count = param_count(model, option)
        if count > MAX_PARAMETERS:
            raise KanimgError(f"{model} with {_describe(option)} has {count:,} parameters, over the limit of "
                              f"{MAX_PARAMETERS:,}; choose smaller widths or grids")


def _describe(spec: dict[str, Any]) -> str:
    return f"widths {_show(spec['widths'])}" + (f", grids {_show(spec['grids'])}" if "grids" in spec else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


def _to_device(value: Any, dev: torch.device) -> Any:
    """Move a checkpoint's tensors (not RNG states, which live on the CPU) to ``dev``."""
    if isinstance(value, dict):
        return {k: (v if k == "generator" else _to_device(v, dev)) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, dev) for v in value]
    return value.to(dev) if isinstance(value, torch.Tensor) else value


def _export(folder: Path, data: ImageData, trainer: Trainer, config: dict, wall: float, interrupted: bool,
            resumed_from: int | None) -> dict:
    """Render the best weights and write every output of the run into ``folder``."""
    best = best_model(trainer.state_dict(), trainer.device)
    recon = render(best, data.height, data.width, config["coords"], trainer.device)
    save_png(folder / "reconstruction.png", recon, data.bit_depth)
    save_rgb8(folder / "error.png", error_map(data.pixels, recon))
    metrics = reconstruction_metrics(data.pixels, recon, data.bit_depth)
    params = sum(p.numel() for p in best.parameters())
    steps_done = trainer.step
    result = {
        "image": config["image"]["path"],
        "model": best.spec,
        "params": params,
        "metrics": metrics,
        "best_step": trainer.best_step,
        "steps_done": steps_done,
        "interrupted": interrupted,
        "resumed_from_step": resumed_from,
        "wall_seconds": round(wall, 3),
        "train_seconds": round(trainer.train_seconds, 3),
        "warmup_seconds": round(trainer.warmup_seconds, 3),
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
    save_checkpoint(folder / "checkpoint.pt", checkpoint_payload(config, trainer))
    return result


def best_model(trainer_state: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The best evaluated model of a Trainer.state_dict() (the latest weights if none was
    evaluated), rebuilt from its own spec since grids may have been extended after it."""
    spec = dict(trainer_state["best_spec"] or trainer_state["spec"])
    model = build_model(spec.pop("name"), **spec)
    try:
        model.load_state_dict(trainer_state["best_model"] or trainer_state["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise KanimgError(f"the checkpoint's weights do not fit its model ({_first_line(exc)})") from None
    return model.to(device)
