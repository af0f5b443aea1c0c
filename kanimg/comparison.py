"""Compare models on the same images under one fair protocol, then build the gallery.

Protocols (each record says which one it ran under):
- equal steps (default): every model trains the same number of steps, each family with its
  own best-known settings (learning rate, batch size);
- equal wall-clock (``budget_seconds``): every model gets the same training time;
- equal parameter count (``match_params``): hidden widths solved per family so that every
  model has (as nearly as integer widths allow) the same number of parameters;
- a preset: the KAN paper's table, every model trained with the paper's one recipe.

Each image × model is an ordinary ``kanimg fit`` run folder under ``OUT/runs/``; a run that
finished with the same settings is skipped, an interrupted or shorter one is resumed from its
checkpoint, and one trained otherwise (other options, or the defaults of an older kanimg) is
fitted again (kanimg.reruns).
Under torchrun the runs are shared out among the ranks (kanimg.distributed); rank 0 checks
the folder first and writes every table and page at the end, the same as one process would,
each record saying which rank ran it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import distributed
from .errors import KanimgError
from .files import OutputLock, atomic_path, atomic_write_bytes, check_replaceable, check_writable, read_marker, write_marker
from .fitting import model_spec_for
from .gallery import file_data_uri, html_page, png_data_uri
from .io import list_images, load_image
from .models import get_entry, param_count
from .plots import error_map, gallery_png, psnr_time_svg
from .reruns import fit_run
from .train import check_seed
from .results import COMPARE_COLUMNS, describe_protocol, mean_records, record_table, results_payload, write_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A fixed table: models, one training recipe for all, and how the image is prepared."""

    models: tuple[str, ...]
    train: dict[str, Any]
    grey: bool = True
    coords: str = "linspace"
    size: int | None = None  # resize the image to size×size first (None: as it is)
    description: str = ""


DEFAULT_MODELS = ("kan", "hashgrid", "siren", "rff", "mlp")
PAPER_MODELS = ("kan2", "siren1", "siren2", "mlp1", "mlp2", "rff1-s3", "rff1-s30", "rff2-s3", "rff2-s30")
# arXiv 2410.01803's released script: 3 × 5,000 Adam steps of 4,096 random pixels, lr 1e-3,
# 1e-4, 1e-5 (fresh optimiser each stage), grid updates every 10 steps in the first 1,000 of
# each stage, grey image, coordinates linspace(-1, 1, N); those rates at any length (lr_steps 0).
PAPER_TRAIN = {"steps": 15000, "lr": 1e-3, "lr_steps": 0, "batch_size": 4096, "schedule": "staged",
               "grid_update_every": 10, "grid_update_until": 1000, "eval_every": 500}
PRESETS = {
    "paper": Preset(PAPER_MODELS, PAPER_TRAIN, description="the KAN paper's image-fitting table, its exact recipe"),
    # The paper's recipe at CI scale (about 25 s on 2 CPU cores; every step is the whole image).
    # At this scale the 404-wide SIREN and RFF networks have ~500 parameters per pixel and RFF
    # leads; the paper's order is not reproduced here (measured: docs/reproduction.md).
    "paper-quick": Preset(("kan2", "siren2", "rff2-s30", "mlp2"),
                          {**PAPER_TRAIN, "steps": 120, "grid_update_until": 20, "eval_every": 40}, size=32,
                          description="the paper's recipe shortened to 3×40 steps on a 32×32 grey image (CI check)"),
}


@dataclass
class CompareResult:
    out: Path
    records: list[dict] = field(default_factory=list)
    interrupted: bool = False


def widths_for_params(name: str, channels: int, target: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The model's default spec (for an image of ``size``) with its hidden width solved so the
    parameter count is closest to ``target`` (depth, grids and other options unchanged)."""
    spec = model_spec_for(name, {}, channels, size)
    depth = len(spec["widths"]) - 2
    if depth == 0:
        raise KanimgError(f"{name} has no hidden layer whose width could match {target:,} parameters; give it hidden widths")

    def count(width: int) -> int:
        return param_count(name, {**spec, "widths": [2] + [width] * depth + [channels]})

    lo, hi = 1, 8192
    if count(lo) > target:
        raise KanimgError(f"{name} has more than {target:,} parameters even 1 unit wide ({count(lo):,})")
    while hi - lo > 1:  # count() increases with width: bisect for the last width ≤ target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    width = lo if abs(count(lo) - target) <= abs(count(hi) - target) else hi
    return {**spec, "widths": [2] + [width] * depth + [channels]}


def compare(
    path: str | Path,
    models: list[str] | None = None,
    out: str | Path = "runs/compare",
    *,
    steps: int | None = None,
    budget_seconds: float | None = None,
    match_params: int | None = None,
    preset: str | None = None,
    device: str = "auto",
    crop: tuple[int, int, int, int] | None = None,
    seed: int = 0,
    precision: str | None = None,
    compile: bool = False,
    force: bool = False,
    progress: bool = True,
) -> CompareResult:
    """Fit every model on every image under one protocol and write the comparison outputs.

    Args:
        path: an image or a folder of images.
        models: registered names (defaults: the preset's, else DEFAULT_MODELS).
        out: output folder (runs are kept under out/runs and reused).
        steps: equal-steps protocol length (default 2000, or the preset's).
        budget_seconds: equal wall-clock protocol: training seconds per model.
        match_params: equal-parameter protocol: the parameter count to match.
        preset: "paper" or "paper-quick": the paper's models and recipe.
        crop: (x, y, w, h) region to show zoomed in the gallery.
        seed: seeds every model's initialisation and pixel sampling.
        precision, compile: how every model's training steps run (TrainConfig); None / False
            keep the defaults (fp32, eager).
        force: write into a folder that holds a different comparison (its tables are replaced;
            its runs are reused where they match, and fitted anew in their place where not).
            Without it such a folder is refused; the same comparison again continues where it stopped.
    """
    images = list_images(Path(path))
    chosen = PRESETS.get(preset) if preset else None
    if preset and chosen is None:
        raise KanimgError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if sum(v is not None for v in (budget_seconds, match_params)) > 1:
        raise KanimgError("choose one protocol: --budget-seconds or --match-params")
    models = list(models or (chosen.models if chosen else DEFAULT_MODELS))
    for name in models:
        get_entry(name)  # unknown names fail before any work
    _check_inputs(images, models, chosen, steps, budget_seconds, match_params, seed, crop)
    protocol = _protocol(preset, steps, budget_seconds, match_params)
    execution = {**({"precision": precision} if precision else {}), **({"compile": True} if compile else {})}
    out = Path(out)
    request = {"images": [str(i.resolve()) for i in images], "models": models, "protocol": protocol, "seed": seed}
    place = distributed.world()
    with contextlib.ExitStack() as stack:
        def claim_folder() -> list[Path]:
            stack.enter_context(_output_folder(out, request, force))
            (out / "runs").mkdir(exist_ok=True)
            return [_prepare_image(image, chosen, out) for image in images]

        prepared = distributed.main_first(place, claim_folder)  # rank 0 holds the folder's lock until the end
        return _compare(images, prepared, models, out, chosen, protocol, steps, budget_seconds, match_params, seed, execution,
                        device, crop, progress, place)


def _check_inputs(images: list[Path], models: list[str], chosen: Preset | None, steps: int | None, budget_seconds: float | None,
                  match_params: int | None, seed: int, crop: tuple[int, int, int, int] | None) -> None:
    """Everything a comparison can be refused for, checked before its folder is claimed and the
    first model trains: a refusal leaves nothing behind, and no image fails after hours of fitting.
    One image is read at a time."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise KanimgError(f"--steps must be at least 1, got {steps}")
    if match_params is not None and match_params < 1:
        raise KanimgError(f"--match-params must be positive, got {match_params}")
    if budget_seconds is not None and not 0 < budget_seconds < math.inf:
        raise KanimgError(f"--budget-seconds must be positive and finite, got {budget_seconds}")
    check_seed(seed)
    if crop is not None and (len(crop) != 4 or min(crop) < 0 or min(crop[2:]) < 1):
        raise KanimgError("--crop takes X,Y,WIDTH,HEIGHT with a positive size, e.g. 96,64,48,48")
    for image in images:
        data = load_image(image, grey=chosen.grey if chosen else False)
        if match_params is not None and chosen is None:  # a preset keeps its own widths (as _request does)
            for name in models:
                widths_for_params(name, data.channels, match_params, (data.height, data.width))
        width, height = (chosen.size, chosen.size) if chosen is not None and chosen.size else (data.width, data.height)
        if crop is not None and (crop[0] + crop[2] > width or crop[1] + crop[3] > height):
            raise KanimgError(f"--crop {','.join(map(str, crop))} is outside {image.name} ({width}x{height}"
                              f"{', as the preset resizes it' if chosen is not None and chosen.size else ''})")
        del data


@contextlib.contextmanager
def _output_folder(out: Path, request: dict, force: bool) -> Iterator[None]:
    """Lock ``out`` and make sure it is this comparison's: new, empty, or holding the same
    request (then finished runs are reused); another comparison's only with ``force``."""
    if out.exists() and not out.is_dir():
        raise KanimgError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None:
            check_replaceable(out)  # a folder kanimg did not write is refused, --force or not
        if (marker is None or marker.get("kind") != "compare" or marker.get("request") != request) and not force:
            raise KanimgError(f"{out} holds another comparison; pass --force to replace its tables (its runs are reused "
                              f"where they match, fitted anew where not), or choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KanimgError(f"{out}: cannot create the folder ({exc.strerror or exc})") from None
    check_writable(out)
    with OutputLock(out):
        write_marker(out, "compare", request=request)
        yield


def _compare(images, prepared, models, out, chosen, protocol, steps, budget_seconds, match_params, seed, execution, device, crop,
             progress, place: distributed.World) -> CompareResult:
    """Run this rank's share of the image × model runs; on rank 0, once every rank is done,
    read every run's record and write the tables, galleries and page."""
    jobs = [(k, name) for k in range(len(images)) for name in models]
    loaded: dict[int, Any] = {}

    def photo(k: int) -> Any:
        """Image ``k``, read once while its jobs run; one image at a time, so that a folder of
        photos need not fit in memory at once."""
        if k not in loaded:
            loaded.clear()
            loaded[k] = load_image(prepared[k], grey=chosen.grey if chosen else False)
        return loaded[k]

    ran: dict[tuple[int, str], int] = {}
    interrupted = False
    try:
        for _, (k, name) in place.share(jobs):
            request = _request(name, photo(k), protocol, chosen, steps, budget_seconds, match_params, seed, execution)
            with distributed.alone():  # each run is this rank's own
                stopped = _run(prepared[k], images[k].stem, name, request, out, device, progress)
            if stopped:
                interrupted = True
                break
            ran[(k, name)] = place.rank
    except KeyboardInterrupt:  # between runs: what finished stays finished, and the ranks still meet
        interrupted = True
    reports = distributed.gather(place, (ran, interrupted))  # every rank waits here for the others
    result = CompareResult(out, interrupted=interrupted)
    if not place.is_main:
        return result
    ranks = {job: rank for done, _ in reports for job, rank in done.items()}
    result.interrupted = any(stopped for _, stopped in reports)
    result.records = [{**run_record(out / "runs" / images[k].stem / name, out), "rank": ranks[(k, name)]}
                      for k, name in jobs if (k, name) in ranks]
    if result.interrupted:
        return result
    sections = []
    for k, image in enumerate(images):
        records = [r for r in result.records if r["image"] == image.stem]
        recons = [load_image(out / r["run"] / "reconstruction.png").pixels for r in records]
        sections.append(_image_outputs(out, image.stem, photo(k).pixels, records, recons, crop, protocol))
    means = mean_records(result.records)
    write_results(out, results_payload("compare", protocol, result.records, means), markdown=_markdown(result.records, means, protocol),
                  csv_keys=["image", *[k for k, _, _ in COMPARE_COLUMNS], "family", "rank", "protocol"])
    title = f"kanimg comparison: {', '.join(models)}"
    with atomic_path(out / "index.html") as tmp:
        Path(tmp).write_text(html_page(title, sections, means if len(images) > 1 else None, protocol), encoding="utf-8")
    return result


def _markdown(records: list[dict], means: list[dict], protocol: dict) -> str:
    """results.md: a table per image, and the means when there are several images."""
    md = [f"Protocol: {describe_protocol(protocol)}.", ""]
    images = list(dict.fromkeys(r["image"] for r in records))
    for image in images:
        md += [f"### {image}", "", record_table([r for r in records if r["image"] == image]), ""]
    if len(images) > 1:
        md += ["### Mean over images", "", record_table(means), ""]
    return "\n".join(md)


def _protocol(preset, steps, budget_seconds, match_params) -> dict:
    if preset:
        return {"kind": "preset", "preset": preset}
    if budget_seconds is not None:
        return {"kind": "time", "budget_seconds": float(budget_seconds)}
    if match_params is not None:
        return {"kind": "params", "params": int(match_params), "steps": steps or 2000}
    return {"kind": "steps", "steps": steps or 2000}


def _request(name, data, protocol, preset, steps, budget_seconds, match_params, seed, execution) -> dict:
    """Everything that decides one run: model options, training options and data options (the
    family's defaults fill the rest when the run is fitted)."""
    if preset is not None:
        train = {**preset.train, **({"steps": steps} if steps else {}), "seed": seed, **execution}
        return {"spec": {}, "train": train, "grey": preset.grey, "coords": preset.coords, "protocol": protocol}
    spec = widths_for_params(name, data.channels, match_params, (data.height, data.width)) if match_params is not None else {}
    if budget_seconds is not None:
        train = {"budget_seconds": float(budget_seconds), "eval_every": 100}
    else:
        train = {"steps": protocol["steps"]}
    return {"spec": spec, "train": {**train, "seed": seed, **execution}, "grey": False, "coords": "centers", "protocol": protocol}


def _run(image: Path, stem: str, name: str, request: dict, out: Path, device: str, progress: bool) -> bool:
    """Fit one model (or reuse / resume its earlier run); True when Ctrl-C stopped it."""
    folder = out / "runs" / stem / name
    result = fit_run(folder, image, name, device=device, progress=progress, grey=request["grey"], coords=request["coords"],
                     note=log.info, **request["spec"], **request["train"])
    if result is None:
        log.info("%s on %s: finished earlier, skipped", name, stem)
    atomic_write_bytes(folder / "compare-request.json", json.dumps(request, indent=2).encode())
    return result is not None and result.interrupted


def run_record(folder: Path, out: Path) -> dict:
    """The results.json record of one model's run folder ``out/runs/<image>/<model>`` (finished
    or interrupted; ``finished`` says which)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    request = json.loads((folder / "compare-request.json").read_text())
    m = metrics["metrics"]
    return {
        "image": folder.parent.name, "model": folder.name, "family": get_entry(folder.name).family, "psnr": m["psnr"],
        "psnr_png": m["psnr_png"], "ssim": m["ssim"], "lpips": m["lpips"], "params": metrics["params"],
        "seconds": metrics["train_seconds"], "steps": metrics["steps_done"],
        "finished": not metrics["interrupted"] and metrics["steps_done"] >= request["train"].get("steps", 0),
        "steps_per_second": metrics["steps_per_second"], "device": metrics["device"], "seed": metrics.get("seed"),
        "warmup_seconds": metrics.get("warmup_seconds"),
        "protocol": request["protocol"], "run": str(folder.relative_to(out)),
        "history": {k: metrics["history"][k] for k in ("eval_step", "eval_psnr", "eval_seconds")},
    }


def _prepare_image(image: Path, preset: Preset | None, out: Path) -> Path:
    """The preset's resized copy of the image (kept under out/), or the image itself."""
    if preset is None or preset.size is None:
        return image
    data = load_image(image, grey=preset.grey)
    from PIL import Image

    small = Image.fromarray(np.round(data.pixels[..., 0] * 255).astype(np.uint8)).resize((preset.size, preset.size), Image.LANCZOS)
    path = out / "runs" / f"{image.stem}-{preset.size}.png"
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG")
    return path


def _image_outputs(out: Path, stem: str, original: np.ndarray, records: list[dict], recons: list[np.ndarray],
                   crop, protocol: dict) -> dict:
    """The gallery PNG of one image and its HTML section."""
    gallery = out / f"gallery-{stem}.png"
    gallery_png(gallery, original, records, recons, title=f"{stem} · {describe_protocol(protocol)}", crop=crop)
    return {
        "image": stem,
        "original": png_data_uri(original),
        "records": records,
        "reconstructions": [png_data_uri(r) for r in recons],
        "errors": [png_data_uri(error_map(original, r).astype(np.float32) / 255) for r in recons],
        "gallery": file_data_uri(gallery),
        "curves": psnr_time_svg({r["model"]: r["history"] for r in records}),
    }
