"""Bring a run folder up to a request: reuse the run, resume it, or fit it anew.

``kanimg compare`` and the tuning sweep of ``benchmarks/inr_bench.py`` ask the same question of
every run folder they meet again (after Ctrl-C, a kill, a longer request, or a newer kanimg):
did it train what ``fit`` would train today? The folder's own record (its checkpoint's or
metrics.json's config) is compared with what fit resolves now for the same image (the family's
defaults, sized to the image, on this device), so a default changed since is a different run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .checkpoints import latest_checkpoint, load_checkpoint
from .device import resolve_device
from .errors import KanimgError
from .files import as_stored, file_sha256, read_json_object, staging_folder
from .fitting import CHANGEABLE_ON_RESUME, Fit, ResumeMismatch, split_options, fit, model_spec_for, train_config_for
from .models import saved_spec
from .train import TrainConfig

Standing = Literal["same", "shorter", "other"]


def saved_config(folder: Path) -> dict | None:
    """What a run folder records of how its run was made: its latest checkpoint's config (a
    staged one first), else (none, or unreadable: resuming says what is wrong) its
    metrics.json's; None when neither can be read."""
    config = None
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        try:
            config = load_checkpoint(checkpoint)["config"]
        except (KanimgError, OSError, KeyError, TypeError):
            pass
    if not isinstance(config, dict):
        config = (read_json_object(Path(folder) / "metrics.json") or {}).get("config")
    return config if isinstance(config, dict) else None


def standing(config: dict, model: str, options: dict[str, Any], device: torch.device | None = None,
             image_file: Path | None = None) -> Standing:
    """How the run that ``config`` (saved_config) describes stands to ``fit(image, model,
    **options)`` today on the same image: "same" settings; "shorter" (the same but fewer steps,
    which a resume extends); or "other": any model option, training field (but eval_every and
    compile), ``grey`` or ``coords`` differs, a default of the family changed since (the run had
    the old one), it trained more steps than asked for, or ``image_file`` is not the file it was
    fitted on (edited since; runs older than the record of the file's digest are taken as
    fitted on it). Under a time budget the steps do not count (the clock ends the run)."""
    options = {k: v for k, v in options.items() if v is not None}
    if (config.get("grey"), config.get("coords")) != (options.pop("grey", False), options.pop("coords", "centers")):
        return "other"
    try:
        image, train = config["image"], TrainConfig.from_dict(config["train"])  # a field newer than the run: its default then
        if image_file is not None and image.get("sha256") not in (None, file_sha256(image_file)):
            return "other"
        size = (int(image["height"]), int(image["width"]))
        model_options, train_options = split_options(model, options)
        spec = as_stored(model_spec_for(model, model_options, int(image["channels"]), size))
        wanted = as_stored(train_config_for(model, train_options, size, device).to_dict())
        saved = as_stored(saved_spec(config["model"]))
    except (KanimgError, AttributeError, KeyError, TypeError, ValueError):
        return "other"
    if saved.get("name") != model:
        return "other"
    extended = bool(train.grid_schedule)  # grid extension rewrites the grids as it goes
    if any(value is not None and saved.get(key) != value for key, value in spec.items() if not (extended and key == "grids")):
        return "other"
    trained = as_stored(train.to_dict())
    if any(trained.get(key) != value for key, value in wanted.items() if key not in CHANGEABLE_ON_RESUME):
        return "other"
    if train.budget_seconds > 0:  # the same budget (compared above): steps do not count under a clock
        return "same"
    return "other" if trained["steps"] > wanted["steps"] else "shorter" if trained["steps"] < wanted["steps"] else "same"


def fit_run(folder: Path, image: Path, model: str, *, device: str = "auto", progress: bool = True,
            note: Callable[[str], None] = lambda message: None, **options: Any) -> Fit | None:
    """Make ``folder`` hold the run ``fit(image, model, out=folder, **options)`` trains, doing
    no more than that needs: None when the folder's run finished with these settings; else the
    Fit of resuming it (stopped, killed, or shorter) or of fitting it anew (it trained other
    settings). ``note`` hears why a run is resumed or fitted anew."""
    folder = Path(folder)
    config = saved_config(folder)
    state = None if config is None else standing(config, model, options, resolve_device(device), Path(image))
    finished = (read_json_object(folder / "metrics.json") or {}).get("interrupted") is False
    if state == "same" and finished and not staging_folder(folder).exists():
        return None
    if state == "other":
        note(f"{folder}: trained with other settings (other options, defaults of an older kanimg, or the image before an edit), fitting anew")
    elif latest_checkpoint(folder) is not None:  # stopped, killed, or shorter; an unreadable one says what is wrong
        try:
            note(f"{folder}: resuming")
            return fit(image, model, out=folder, resume=True, device=device, progress=progress, **options)
        except ResumeMismatch as exc:
            note(f"{folder}: fitting anew ({exc})")
    return fit(image, model, out=folder, force=True, device=device, progress=progress, **options)
