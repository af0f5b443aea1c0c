"""Checkpoint I/O: what a run saves to be rendered or resumed, read back safely, and which
checkpoint of a run folder is the newest."""
from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import KanimgError, first_line
from .files import atomic_path, staging_folder
from .models import MAX_PARAMETERS, build_model, param_count, saved_spec
from .results import versions

if TYPE_CHECKING:
    from .train import Trainer

CHECKPOINT_FORMAT = "kanimg-checkpoint"
CHECKPOINT_VERSION = 1
# A running fit writes a checkpoint into its staging folder this often (seconds of wall time),
# so a kill -9 or a power cut loses at most this much training: ``--resume`` continues from it.
CHECKPOINT_SECONDS = 30.0


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
    if path.is_dir():  # a run folder: its newest checkpoint
        found = latest_checkpoint(path)
        if found is None:
            raise KanimgError(f"{path}: a folder with no checkpoint.pt (give a run folder kanimg fit wrote, or its checkpoint)")
        path = found
    if not path.is_file():
        raise KanimgError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as file:
            archive = zipfile.is_zipfile(file)
    except OSError as exc:
        raise KanimgError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    if not archive:  # torch.save writes zip archives; torch.load's own message on anything else is about pickles
        raise KanimgError(f"{path}: not a kanimg checkpoint (not a file torch.save wrote)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KanimgError(f"{path}: not a readable kanimg checkpoint ({first_line(exc)})") from None
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


def best_model(trainer_state: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The best evaluated model of a Trainer.state_dict() (the latest weights if none was
    evaluated), rebuilt from its own spec since grids may have been extended after it."""
    spec = dict(trainer_state["best_spec"] or trainer_state["spec"])
    name = spec.pop("name")
    if param_count(name, spec) > MAX_PARAMETERS:  # a crafted spec: refuse before allocating
        raise KanimgError(f"the checkpoint's model has over {MAX_PARAMETERS:,} parameters, more than kanimg builds")
    model = build_model(name, **spec)
    try:
        model.load_state_dict(trainer_state["best_model"] or trainer_state["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise KanimgError(f"the checkpoint's weights do not fit its model ({first_line(exc)})") from None
    return model.to(device)


def checkpoint_to_device(value: Any, dev: torch.device) -> Any:
    """Move a checkpoint's tensors (not RNG states, which live on the CPU) to ``dev``."""
    if isinstance(value, dict):
        return {k: (v if k == "generator" else checkpoint_to_device(v, dev)) for k, v in value.items()}
    if isinstance(value, list):
        return [checkpoint_to_device(v, dev) for v in value]
    return value.to(dev) if isinstance(value, torch.Tensor) else value
