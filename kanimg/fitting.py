"""Fit one image: decode → build → train → render → measure, in memory or into a run folder.

``fit`` is ``kanimg.fit`` and what ``kanimg fit`` and ``kanimg compare`` call: nothing is
written unless a run folder (``out``) is given; then the run keeps periodic checkpoints in
its staging folder, survives Ctrl-C and kill -9, and can be resumed. Under torchrun every rank
trains the same model data-parallel (kanimg.train) and rank 0 alone writes the run folder.

    >>> import numpy as np, kanimg
    >>> image = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    >>> result = kanimg.fit(image, steps=20, widths=[2, 8, 3], grids=[8, 4], progress=False)
    >>> result.reconstruction.shape, result.metrics["psnr"] > 20
    ((16, 16, 3), True)
    >>> result.render(size=(32, 24)).shape        # any size: (width, height)
    (24, 32, 3)
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .checkpoints import (CHECKPOINT_SECONDS, PeriodicCheckpoint, best_model, checkpoint_payload, checkpoint_to_device,
                          latest_checkpoint, load_checkpoint, run_folder_of, save_checkpoint)
from .device import resolve_device
from .errors import KanimgError, first_line
from .files import RunFolder, file_sha256, staging_folder, write_json
from .io import ImageData, ImageLike, as_image, default_image, save_png
from .mapped import MappedImage, open_image
from .metrics import reconstruction_metrics
from .models import MAX_PARAMETERS, build_model, get_entry, param_count
from .plots import error_map, plot_curves, save_rgb8
from .render import render
from .results import versions
from .sampling import COORDINATES, ImageTarget, MappedTarget
from .streamed import stream_outputs
from .train import Trainer, TrainConfig

log = logging.getLogger(__name__)


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
        for key, value in entry.for_image({**entry.default_spec(), **spec}, *size).items():
            if key not in spec and entry.defaults[key] is None:
                spec[key] = value
    return spec


# A GPU is far from busy at the CPU's batch sizes (2,048–16,384 pixels): on CUDA a batch size the
# user did not choose is this many times the family's default (capped by the image's pixel count
# in the sampler), so a step sees more pixels at about the same time per step.
GPU_BATCH_FACTOR = 16


def train_config_for(name: str, overrides: dict[str, Any], size: tuple[int, int] | None = None,
                     device: torch.device | None = None) -> TrainConfig:
    """The family's training defaults (e.g. SIREN's lr 3e-4) updated with the user's choices;
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


# Settings a resumed run may change; every other one it keeps (and a different value is refused).
CHANGEABLE_ON_RESUME = ("steps", "eval_every", "compile")


class ResumeMismatch(KanimgError):
    """A resumed run was given settings that differ from the run it continues."""


@dataclass
class Fit:
    """A fitted image: the trained model, its reconstruction and scores, and how it was made.

    ``out`` is the run folder when the fit wrote one (else None); ``interrupted`` is True when
    Ctrl-C stopped training early (the result is the best reached so far). An image file over
    kanimg.mapped.STREAM_PIXELS is a MappedImage: its reconstruction is too large to return,
    and its outputs and scores are streamed (kanimg.streamed).
    """

    image: ImageData | MappedImage
    trainer: Trainer
    config: dict
    wall_seconds: float
    interrupted: bool
    out: Path | None = None
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
            if isinstance(self.image, MappedImage):
                raise KanimgError(f"{self.image.name} is {self.image.width}x{self.image.height}, too large to hold its reconstruction: "
                                  f"save() writes it to reconstruction.png, render(size=...) gives a smaller one")
            self._cache["reconstruction"] = self.render()
        return self._cache["reconstruction"]

    @property
    def metrics(self) -> dict:
        """psnr, psnr_png (of the exported PNG), ssim, lpips (None where its weights are missing)."""
        if "metrics" not in self._cache:
            if isinstance(self.image, MappedImage):
                self._cache["metrics"] = stream_outputs(self.model, self.image, self.config["coords"], self.trainer.device)
            else:
                self._cache["metrics"] = reconstruction_metrics(self.image.pixels, self.reconstruction, self.image.bit_depth)
        return self._cache["metrics"]

    @property
    def history(self) -> dict:
        """Training curves: step/loss/lr every 10 steps, eval_step/eval_psnr/eval_seconds per evaluation."""
        return dict(self.trainer.history.__dict__)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def render(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The model on a width × height grid (default: the image's size), as (H, W, C) floats."""
        width, height = size or (self.image.width, self.image.height)
        return render(self.model, height, width, self.config["coords"], self.trainer.device)

    def save(self, folder: str | os.PathLike, force: bool = False) -> Path:
        """Write the run folder ``kanimg fit`` writes (reconstruction, error map, metrics.json,
        curves, checkpoint); an existing folder only with ``force`` (and only one kanimg wrote)."""
        run = RunFolder(Path(folder), "fit", replace=force, keep_others=True)
        with run as staging:
            self.write(staging)
        return run.final

    def write(self, folder: Path, resumed_from: int | None = None) -> dict:
        """Write every output of the run into the existing ``folder``; return metrics.json's payload."""
        if isinstance(self.image, MappedImage):  # streamed: the images and the scores in one pass
            self._cache["metrics"] = stream_outputs(self.model, self.image, self.config["coords"], self.trainer.device, folder)
        else:
            save_png(folder / "reconstruction.png", self.reconstruction, self.image.bit_depth)
            save_rgb8(folder / "error.png", error_map(self.image.pixels, self.reconstruction))
        metrics = self.metrics
        trainer, config = self.trainer, self.config
        summary = {
            "image": config["image"]["path"],
            "model": self.model.spec,
            "params": self.params,
            "metrics": metrics,
            "best_step": trainer.best_step,
            "steps_done": trainer.step,
            "interrupted": self.interrupted,
            "resumed_from_step": resumed_from,
            "wall_seconds": round(self.wall_seconds, 3),
            "train_seconds": round(trainer.train_seconds, 3),
            "warmup_seconds": round(trainer.warmup_seconds, 3),
            "steps_per_second": round(trainer.step / trainer.train_seconds, 3) if trainer.train_seconds > 0 else None,
            "device": config["device"],
            "world_size": config["world_size"],
            "seed": config["train"]["seed"],
            "config": config,
            "versions": versions(),
            "history": trainer.history.__dict__,
        }
        write_json(folder / "metrics.json", summary)
        title = f"{config['image']['name']} · {self.model.spec['name']} · {self.params:,} params · {metrics['psnr']:.2f} dB"
        plot_curves(folder / "curves.png", trainer.history.__dict__, title)
        save_checkpoint(folder / "checkpoint.pt", checkpoint_payload(config, trainer))
        return summary


def fit(
    image: ImageLike | None = None,
    model: str | None = None,
    *,
    steps: int | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = None,
    force: bool = False,
    device: str = "auto",
    grey: bool = False,
    coords: str | None = None,
    progress: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    **options: Any,
) -> Fit:
    """Fit an image with a registered model (default "kan") and return the result.

    Args:
        image: a file path, PIL image, (H, W[, C]) array or tensor (see :func:`kanimg.io.as_image`);
            None = the bundled photograph, or on resume the image the run was fitted on.
        steps: training steps (default: the family's, grown with the image size).
        out: run folder to write (as ``kanimg fit``): periodic checkpoints while training,
            every output at the end. Refused if it exists, unless ``force`` (and kanimg wrote
            it). None = nothing is written (``result.save(folder)`` can write it later).
        resume: continue a run: True = from the latest checkpoint of ``out`` (its staging
            folder's after a crash or kill, else its finished one); a checkpoint file or a run
            folder = from that (``out`` defaults to that run's folder, updated in place). The run
            keeps its settings: only ``steps`` (to extend it), ``eval_every`` and ``compile`` may
            change; other values that differ raise ResumeMismatch.
        device: "auto", "cpu" or "cuda".
        grey: fit the luminance only.
        coords: pixel coordinates, "centers" (default) or "linspace".
        progress: show a progress bar.
        checkpoint_seconds: period of the checkpoints written into a run folder while training.
        options: the model's options (e.g. ``widths``, ``grids``, ``directions``) and TrainConfig's
            fields (e.g. ``lr``, ``batch_size``, ``budget_seconds``, ``precision``, ``compile``);
            None or left out = the same defaults as ``kanimg fit``.
    Returns:
        Fit; ``interrupted`` is True when Ctrl-C stopped training early (a run folder then holds
        the best result so far and a checkpoint to resume from).
    Raises:
        KanimgError: any problem with the inputs, found before training starts; a diverged run
            (nothing is kept).
    """
    dev = resolve_device(device)
    state, checkpoint, replace = None, None, force
    if resume:
        checkpoint, out = _resume_source(resume, out, image, model)
        state = load_checkpoint(checkpoint)
        saved = state["config"]
        _refuse_changes({"model": (model, saved["model"]["name"]), "coords": (coords, saved["coords"]),
                         "grey": (grey or None, saved["grey"])}, checkpoint)
        model, grey, coords = saved["model"]["name"], saved["grey"], saved["coords"]
        if image is None and saved["image"]["path"] is None:
            raise KanimgError(f"{checkpoint}: this run was fitted from an array, not a file; give the image to resume it")
        image = image if image is not None else saved["image"]["path"]
        replace = force or Path(out).resolve() == run_folder_of(checkpoint).resolve()  # continuing a run updates its own folder
    model, coords = model or "kan", coords or "centers"
    model_options, train_options = split_options(model, {k: v for k, v in {**options, "steps": steps}.items() if v is not None})
    if coords not in COORDINATES:
        raise KanimgError(f"unknown coordinate convention {coords!r}; choose from {', '.join(COORDINATES)}")
    source = Path(image) if isinstance(image, (str, os.PathLike)) else (default_image() if image is None else None)
    data = open_image(source, grey) if source is not None else as_image(image, grey=grey)
    if state is None:
        spec = model_spec_for(model, model_options, data.channels, (data.height, data.width))
        cfg = train_config_for(model, train_options, (data.height, data.width), dev)
    else:
        spec, cfg = _resumed_settings(state, checkpoint, data, model, model_options, train_options)
    check_model_size(model, spec, cfg)
    folder = RunFolder(Path(out), "fit", replace=replace, keep_others=True) if out is not None else None
    trainer = new_trainer(model, spec, cfg, data, coords, dev, progress)
    if state is not None:
        try:
            trainer.load_state_dict(checkpoint_to_device(state["trainer"], dev))
            best_model(state["trainer"])  # the best weights are what the run exports: check them now, not after training
        except (KeyError, TypeError, ValueError, RuntimeError, KanimgError) as exc:
            raise KanimgError(f"{checkpoint}: its training state does not fit its model ({first_line(exc)})") from None
    config = run_config(trainer, data, str(source.resolve()) if source is not None else None, grey, coords)
    if folder is None:
        started = time.perf_counter()
        interrupted = _train(trainer)
        return Fit(data, trainer, config, time.perf_counter() - started, interrupted)
    place = trainer.place
    with contextlib.ExitStack() as stack:
        def claim_folder() -> Path:
            staging = stack.enter_context(folder)
            _settle_leftover(folder, checkpoint, force)
            return staging

        staging = distributed.main_first(place, claim_folder)  # under torchrun rank 0 alone writes the run folder
        started = time.perf_counter()
        try:
            interrupted = _train(trainer, PeriodicCheckpoint(staging / "checkpoint.pt", config, checkpoint_seconds)
                                 if place.is_main else None)
        except KanimgError:
            if place.is_main and (checkpoint is None or checkpoint.parent != folder.staging):
                folder.clear()  # a diverged run: its checkpoints are not worth resuming (one it resumed from stays)
            raise
        result = Fit(data, trainer, config, time.perf_counter() - started, interrupted, folder.final if place.is_main else None)
        if place.is_main:
            result.write(staging, None if state is None else int(state["trainer"]["step"]))
    return result


def _train(trainer: Trainer, on_step=None) -> bool:
    """Train to the end; True when Ctrl-C stopped it (after evaluating what it reached; under
    torchrun every rank stops at the same step, see Trainer.train)."""
    try:
        trainer.train(on_step=on_step)
    except KeyboardInterrupt:
        trainer.evaluate_if_stale()
        return True
    return False


def default_run_folder(image: str | os.PathLike | None, model: str | None) -> Path:
    """runs/<image stem>-<model>: where ``kanimg fit`` writes when not told."""
    return Path("runs") / f"{Path(image).stem if image is not None else default_image().stem}-{model or 'kan'}"


def _resume_source(resume: str | os.PathLike | bool, out: str | os.PathLike | None, image: Any, model: str | None
                   ) -> tuple[Path, Path]:
    """The checkpoint a resumed run continues from, and the folder it writes."""
    if resume is True:
        if out is None:
            if image is not None and not isinstance(image, (str, os.PathLike)):
                raise KanimgError("resume=True continues the run folder given as out; give it")
            out = default_run_folder(image, model)
        checkpoint = latest_checkpoint(Path(out))
        if checkpoint is None:
            raise KanimgError(f"{out}: nothing to resume (no checkpoint in it or in {staging_folder(Path(out))})")
        return checkpoint, Path(out)
    checkpoint = Path(resume)
    if checkpoint.is_dir():
        checkpoint = latest_checkpoint(checkpoint) or checkpoint / "checkpoint.pt"
    return checkpoint, Path(out) if out is not None else run_folder_of(checkpoint)


def _resumed_settings(state: dict, checkpoint: Path, data: ImageData, model: str, model_options: dict[str, Any],
                      train_options: dict[str, Any]) -> tuple[dict[str, Any], TrainConfig]:
    """A resumed run's model spec and training config: its own, with only the changeable
    settings taken from the caller's options (None values already dropped; other given values
    must equal the run's)."""
    saved = state["config"]
    if [data.height, data.width, data.channels] != [saved["image"][k] for k in ("height", "width", "channels")]:
        raise KanimgError(f"{data.name} is not the image {checkpoint} was trained on "
                          f"({saved['image']['width']}x{saved['image']['height']}, {saved['image']['channels']} channels)")
    spec_of_run = {k: v for k, v in state["trainer"]["spec"].items() if k != "name"}
    resolved = model_spec_for(model, model_options, data.channels) if model_options else {}
    saved_train = TrainConfig.from_dict(saved["train"]).to_dict()  # a setting newer than the run: its default then
    wanted = TrainConfig.from_dict({**saved_train, **train_options}).to_dict()
    _refuse_changes({**{k: (resolved[k], spec_of_run.get(k)) for k in model_options},
                     **{k: (wanted[k], saved_train[k]) for k in train_options if k not in CHANGEABLE_ON_RESUME}}, checkpoint)
    changed = {k: v for k, v in train_options.items() if k in CHANGEABLE_ON_RESUME}
    done = int(state["trainer"]["step"])
    if "steps" in changed and not saved_train.get("budget_seconds") and changed["steps"] < done:
        raise KanimgError(f"--steps {changed['steps']} is fewer than the {done} steps the run in {checkpoint} has trained; "
                          f"ask for more to train on (a resumed run only extends)")
    return spec_of_run, TrainConfig.from_dict({**saved_train, **changed})


def split_options(model: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's options and TrainConfig's fields among ``options`` (unknown names refused)."""
    model_keys = set(get_entry(model).defaults)
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - model_keys - train_keys)
    if unknown:
        raise KanimgError(f"unknown option(s) for {model}: {', '.join(unknown)} (model options: {', '.join(sorted(model_keys))}; "
                          f"training options: {', '.join(sorted(train_keys))})")
    return ({k: v for k, v in options.items() if k in model_keys}, {k: v for k, v in options.items() if k in train_keys})


def new_trainer(model: str, spec: dict[str, Any], cfg: TrainConfig, data: ImageData | MappedImage, coords: str,
                device: torch.device, progress: bool) -> Trainer:
    """A Trainer of a freshly built ``model`` on ``data`` (streamed when it is a MappedImage), its
    initialisation seeded by ``cfg.seed`` (without touching the caller's random state)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        net = build_model(model, **spec).to(device)
    target = MappedTarget(data, coords, device) if isinstance(data, MappedImage) else ImageTarget(data.pixels, coords, device)
    return Trainer(net, target, cfg, progress=progress)


def run_config(trainer: Trainer, data: ImageData, image_path: str | None, grey: bool, coords: str) -> dict:
    """What a run folder and its checkpoints record about how the run was made."""
    return {
        "model": trainer.model.spec, "train": trainer.config.to_dict(), "device": str(trainer.device), "grey": grey, "coords": coords,
        "world_size": trainer.place.size,
        "image": {"path": image_path, "name": data.name, "height": data.height, "width": data.width,
                  "channels": data.channels, "mode": data.mode, "bit_depth": data.bit_depth,
                  "sha256": file_sha256(Path(image_path)) if image_path else None},
    }


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
    """ResumeMismatch for the first option whose given value differs from the resumed run's
    (named as its ``kanimg fit`` flag)."""
    for option, (given, saved) in pairs.items():
        if given is not None and given != saved:
            raise ResumeMismatch(f"{_flag(option)} {_show(given)} differs from the run in {checkpoint} ({_show(saved)}); a resumed run "
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
