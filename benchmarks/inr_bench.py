"""Equal-time benchmark of every model family on public photographs, and the tuning sweep
whose winners are the registry's defaults.

    python benchmarks/inr_bench.py -o runs/inr-bench                          # 30/120/600 s, seeds 0-2
    python benchmarks/inr_bench.py --budgets 30 --seeds 0 -o runs/inr-bench   # a quicker pass
    python benchmarks/inr_bench.py --tune --budgets 30 -o runs/inr-tune       # the tuning sweep
    python benchmarks/inr_bench.py --tune --lr-round --budgets 120 -o runs/lr  # the winners at 1, 1/2, 1/4 their rate at 120 s
    python benchmarks/inr_bench.py --tune --lr-round 0.25,0.125 --budgets 600 -o runs/lr600  # other fractions
    python benchmarks/inr_bench.py --budgets 120 --models kan-lr0.5,hashgrid-lr0.5 -o runs/b  # a family at half its rate

Photos come from scikit-image's bundled data (no download) and the photograph bundled with
kanimg: the evaluation set (EVAL, 256×256 centre crops of 8 photos, 2 of them grey, plus the
full-size FULL images) is never used for tuning, which runs on other photos (TUNE). The
benchmark is `kanimg.compare` under the equal-wall-clock protocol, one output folder per
budget and seed; the sweep fits each family's candidate settings (the same number per family)
under the same budget. Both print Markdown tables (mean ± standard deviation over seeds, per
family and per image), write JSON, and the benchmark plots mean PSNR against the budget.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from kanimg.comparison import compare
from kanimg.errors import KanimgError
from kanimg.files import atomic_write_bytes, read_json_object
from kanimg.io import default_image
from kanimg.models import get_entry, model_names, register_variant
from kanimg.reruns import fit_run
from kanimg.results import machine, versions

CROP = 256
# name: (scikit-image loader, or "bundled"), every one a photograph
EVAL = {"camera": "camera", "chelsea": "chelsea", "hubble": "hubble_deep_field", "retina": "retina", "coins": "coins",
        "ihc": "immunohistochemistry", "motorcycle": "stereo_motorcycle", "astronaut": "bundled"}
FULL = {"camera-full": "camera", "motorcycle-full": "stereo_motorcycle"}
TUNE = {"coffee": "coffee", "rocket": "rocket", "moon": "moon"}
MODELS = ("kan", "kan-ridge", "kan-xy", "hashgrid", "siren", "rff", "mlp")
# The sweep: per family a list of (spec options, training options), every option the sweep
# varies written out (the registry's defaults are its winners, so candidates must not lean on
# them). Every family started with 4 candidates and was swept again in rounds, each extending
# it in the direction that had helped (docs/benchmark.md): 21 candidates for every family.
# kan-ridge holds the KAN on coordinates (x and y, or 8 ridge directions), the default kan
# before the hash encoding. The hash grid read its encoding with two hidden layers until its
# 21st candidate, with one, won.
HASHGRID_TWO_HIDDEN = [2, 64, 64, 1]
CANDIDATES = {
    "kan": [({"grids": [16]}, {"lr": 6e-2, "batch_size": 16384}), ({"grids": [32]}, {"lr": 6e-2, "batch_size": 16384}),
            ({"grids": [16]}, {"lr": 3e-2, "batch_size": 16384}), ({"grids": [16]}, {"lr": 6e-2, "batch_size": 8192}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 4096}), ({"grids": [32]}, {"lr": 6e-2, "batch_size": 8192}),
            ({"grids": [16]}, {"lr": 3e-2, "batch_size": 8192}), ({"grids": [16]}, {"lr": 3e-2, "batch_size": 4096, "grid_update_every": 50}),
            ({"grids": [16], "grid_kind": "uniform"}, {"lr": 6e-2, "batch_size": 8192}),
            ({"grids": [16], "grid_kind": "uniform"}, {"lr": 3e-2, "batch_size": 4096, "grid_update_every": 50}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 8192, "grid_update_until": 500}),
            ({"grids": [16]}, {"lr": 3e-2, "batch_size": 4096, "grid_update_until": 1000}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 8192, "grid_update_every": 0}),
            ({"grids": [16]}, {"lr": 3e-2, "batch_size": 8192, "grid_update_every": 0}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 4096, "grid_update_every": 0}),
            ({"grids": [16]}, {"lr": 1e-1, "batch_size": 8192, "grid_update_every": 0}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 8192, "grid_update_until": 100}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 16384, "grid_update_every": 0}),
            ({"grids": [32]}, {"lr": 6e-2, "batch_size": 8192, "grid_update_every": 0}),
            ({"grids": [16]}, {"lr": 6e-2, "batch_size": 32768, "grid_update_every": 0}),
            ({"grids": [16], "log2_table_size": 18}, {"lr": 6e-2, "batch_size": 16384, "grid_update_every": 0})],
    "kan-ridge": [({"directions": 0}, {"lr": 2e-2, "batch_size": 4096}), ({"directions": 0}, {"lr": 1e-2, "batch_size": 4096}),
                  ({"directions": 8}, {"lr": 2e-2, "batch_size": 4096}), ({"directions": 0}, {"lr": 2e-2, "batch_size": 8192})],
    "hashgrid": [({"widths": HASHGRID_TWO_HIDDEN, **spec}, train) for spec, train in [
                     ({"log2_table_size": 14}, {"lr": 1e-2, "batch_size": 16384}),
                     ({"log2_table_size": 14}, {"lr": 3e-2, "batch_size": 16384}),
                     ({"log2_table_size": 16}, {"lr": 1e-2, "batch_size": 16384}),
                     ({"log2_table_size": 14}, {"lr": 1e-2, "batch_size": 65536}),
                     ({"log2_table_size": 16}, {"lr": 3e-2, "batch_size": 16384}),
                     ({"log2_table_size": 16}, {"lr": 1e-2, "batch_size": 8192}),
                     ({"log2_table_size": 16}, {"lr": 3e-2, "batch_size": 8192}),
                     ({"log2_table_size": 16}, {"lr": 1e-2, "batch_size": 4096}),
                     ({"log2_table_size": 16}, {"lr": 1e-2, "batch_size": 2048}),
                     ({"log2_table_size": 16}, {"lr": 1e-2, "batch_size": 1024}),
                     ({"log2_table_size": 16}, {"lr": 2e-2, "batch_size": 2048}),
                     ({"log2_table_size": 16}, {"lr": 5e-3, "batch_size": 2048}),
                     ({"log2_table_size": 16}, {"lr": 2e-2, "batch_size": 4096}),
                     ({"log2_table_size": 16}, {"lr": 5e-3, "batch_size": 1024}),
                     ({"log2_table_size": 16}, {"lr": 2e-2, "batch_size": 1024}),
                     ({"log2_table_size": 16}, {"lr": 3e-2, "batch_size": 4096}),
                     ({"log2_table_size": 16}, {"lr": 2e-2, "batch_size": 8192}),
                     ({"log2_table_size": 18}, {"lr": 2e-2, "batch_size": 4096}),
                     ({"log2_table_size": 18}, {"lr": 2e-2, "batch_size": 2048}),
                     ({"log2_table_size": 18}, {"lr": 1e-2, "batch_size": 4096})]] + [
                 ({"widths": [2, 64, 1], "log2_table_size": 18}, {"lr": 2e-2, "batch_size": 4096})],
    "siren": [({"widths": [2, 256, 256, 256, 1]}, {"lr": 1e-4, "batch_size": 65536}),
              ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-4, "batch_size": 16384}),
              ({"widths": [2, 256, 256, 256, 1]}, {"lr": 1e-4, "batch_size": 16384}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-4, "batch_size": 16384}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-4, "batch_size": 4096}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 1e-3, "batch_size": 4096}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 1e-4, "batch_size": 4096}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-4, "batch_size": 1024}),
              ({"widths": [2, 128, 128, 128, 1], "omega0": 60.0}, {"lr": 3e-4, "batch_size": 16384}),
              ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-4, "batch_size": 4096}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 1e-3, "batch_size": 16384}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 1e-3, "batch_size": 1024}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-4, "batch_size": 512}),
              ({"widths": [2, 128, 128, 128, 1], "omega0": 60.0}, {"lr": 3e-4, "batch_size": 1024}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 6e-4, "batch_size": 2048}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 6e-4, "batch_size": 1024}),
              ({"widths": [2, 128, 128, 128, 1], "omega0": 60.0}, {"lr": 1e-3, "batch_size": 4096}),
              ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-4, "batch_size": 256}),
              ({"widths": [2, 128, 128, 128, 1], "omega0": 90.0}, {"lr": 3e-4, "batch_size": 1024}),
              ({"widths": [2, 128, 128, 128, 1], "omega0": 60.0}, {"lr": 1e-3, "batch_size": 1024}),
              ({"widths": [2, 128, 128, 128, 1], "omega0": 90.0}, {"lr": 1e-3, "batch_size": 4096})],
    "rff": [({"scale": 10.0, "num_features": 256}, {"lr": 1e-3}), ({"scale": 20.0, "num_features": 256}, {"lr": 1e-3}),
            ({"scale": 5.0, "num_features": 256}, {"lr": 1e-3}), ({"scale": 10.0, "num_features": 512}, {"lr": 1e-3}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 3e-3, "batch_size": 4096}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 1024}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 3e-3, "batch_size": 1024}),
            ({"scale": 30.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 4096}),
            ({"widths": [2, 128, 128, 128, 1], "scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 4096}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 16384}),
            ({"widths": [2, 256, 256, 1], "scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 4096}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 512}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 256}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 5e-4, "batch_size": 1024}),
            ({"scale": 15.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 1024}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 5e-4, "batch_size": 512}),
            ({"scale": 10.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 1024}),
            ({"widths": [2, 256, 256, 1], "scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 1024}),
            ({"widths": [2, 256, 256, 1], "scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 256}),
            ({"scale": 20.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 128}),
            ({"widths": [2, 256, 256, 1], "scale": 15.0, "num_features": 256}, {"lr": 1e-3, "batch_size": 512})],
    "mlp": [({}, {"lr": 1e-3, "batch_size": 4096}), ({}, {"lr": 3e-3, "batch_size": 4096}), ({}, {"lr": 3e-4, "batch_size": 4096}),
            ({}, {"lr": 1e-3, "batch_size": 16384}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 1e-2, "batch_size": 4096}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 1024}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 1e-3, "batch_size": 1024}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 2048}),
            ({"widths": [2, 256, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 4096}),
            ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-3, "batch_size": 4096}),
            ({"widths": [2, 512, 512, 512, 1]}, {"lr": 3e-3, "batch_size": 4096}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 512}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 256}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 1e-3, "batch_size": 512}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 5e-3, "batch_size": 1024}),
            ({"widths": [2, 256, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 1024}),
            ({"widths": [2, 128, 128, 128, 1]}, {"lr": 3e-3, "batch_size": 1024}),
            ({"widths": [2, 512, 512, 512, 1]}, {"lr": 3e-3, "batch_size": 1024}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 128}),
            ({"widths": [2, 256, 256, 256, 256, 1]}, {"lr": 3e-3, "batch_size": 256}),
            ({"widths": [2, 256, 256, 256, 1]}, {"lr": 2e-3, "batch_size": 256})],
}

# The learning-rate round: each family's 30 s winner (the registry's defaults), its rate scaled,
# at a longer budget. The best rate falls as the budget grows (docs/benchmark.md), so a longer
# budget's fair comparison tunes the rate again, the same scales for every family. A candidate
# is labelled by its scale (kan-lr0.5), the name under which the benchmark runs it.
WINNERS = {"kan": 17, "hashgrid": 20, "siren": 18, "rff": 20, "mlp": 19}
LR_SCALES = (1.0, 0.5, 0.25)


def lr_round(scales: tuple[float, ...] = LR_SCALES) -> dict[str, dict[str, tuple[dict, dict]]]:
    """Per family, its winner at each scale of its rate, by label."""
    return {family: {f"{family}-lr{scale:g}": (spec, {**train, "lr": train["lr"] * scale}) for scale in scales}
            for family, (spec, train) in ((f, CANDIDATES[f][i]) for f, i in WINNERS.items())}


def sweep_table() -> dict[str, dict[str, tuple[dict, dict]]]:
    """Per family, the sweep's candidates by label (kan#17)."""
    return {family: {f"{family}#{index}": candidate for index, candidate in enumerate(candidates)}
            for family, candidates in CANDIDATES.items()}


LR_VARIANT = re.compile(r"^([a-z]+)-lr([0-9]*\.?[0-9]+)$")


def register_lr_variants(models: list[str]) -> None:
    """Benchmark names such as kan-lr0.5: the family's defaults at that fraction of its learning
    rate, at any length (a longer budget's lr-round winner, run on the evaluation photos)."""
    for name in models:
        match = LR_VARIANT.match(name)
        if match and name not in model_names():
            family, scale = match[1], float(match[2])
            if scale <= 0:
                raise KanimgError(f"{name}: a family's rate scaled by {scale:g} cannot train; give a fraction above 0")
            entry = get_entry(family)
            register_variant(name, family, f"{family} at {scale:g}× its learning rate",
                             {**entry.train_defaults, "lr": entry.train_defaults["lr"] * scale, "lr_steps": 0})


def photo(loader: str) -> np.ndarray:
    """(H, W[, 3]) uint8 pixels of a scikit-image photo (or the bundled one)."""
    from PIL import Image

    if loader == "bundled":
        return np.asarray(Image.open(default_image()))
    import skimage.data

    image = getattr(skimage.data, loader)()
    return image[0] if isinstance(image, tuple) else image


def write_photos(folder: Path, names: dict[str, str], crop: bool) -> Path:
    """The photos as PNG files (centre crops of CROP × CROP, or whole) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, loader in names.items():
        pixels = photo(loader)
        if crop:
            top, left = (pixels.shape[0] - CROP) // 2, (pixels.shape[1] - CROP) // 2
            pixels = pixels[top : top + CROP, left : left + CROP]
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return folder


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def bench(out: Path, budgets: list[float], seeds: list[int], models: list[str], full: bool, quiet: bool,
          photos: list[str] | None = None) -> dict:
    """compare() on the evaluation photos (or only ``photos``, one at a time, so that a long
    benchmark can be run in parts and merged with --from-json) at every budget and seed."""
    sets = [("crops", write_photos(out / "photos" / "crops", EVAL, crop=True))]
    if full:
        sets.append(("full", write_photos(out / "photos" / "full", FULL, crop=False)))
    records = []
    for budget in budgets:
        for seed in seeds:
            for kind, folder in sets:
                inputs = [folder] if photos is None else [folder / f"{p}.png" for p in photos if (folder / f"{p}.png").exists()]
                for path in inputs:  # force: a part's tables give way to the whole's; finished runs are reused
                    result = compare(path, models, out / kind / f"{budget:g}s-seed{seed}", budget_seconds=budget, seed=seed,
                                     force=True, progress=not quiet)
                    if result.interrupted:
                        raise KeyboardInterrupt
                    records += [{**r, "budget": budget, "set": kind} for r in result.records]
    return {"records": records}


def summarise(records: list[dict], key: str) -> dict:
    """Mean PSNR per (set, budget, model), with its spread over seeds of the per-seed image means,
    and per image the mean over seeds."""
    table: dict = {}
    for r in records:
        table.setdefault((r["set"], r["budget"], r[key]), {}).setdefault(r["seed"], {})[r["image"]] = r["psnr"]
    out = {}
    for (kind, budget, name), by_seed in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        means = [statistics.mean(images.values()) for images in by_seed.values()]
        images = sorted({image for per in by_seed.values() for image in per})
        out.setdefault(kind, {}).setdefault(f"{budget:g}", {})[name] = {
            "mean": statistics.mean(means), "seed_means": means,
            "per_image": {i: statistics.mean([per[i] for per in by_seed.values() if i in per]) for i in images},
            "steps": statistics.mean([r["steps"] for r in records if r["set"] == kind and r["budget"] == budget and r[key] == name]),
        }
    return out


def markdown(summary: dict, title: str) -> str:
    lines = []
    for kind, budgets in summary.items():
        for budget, rows in budgets.items():
            images = sorted({i for row in rows.values() for i in row["per_image"]})
            lines += ["", f"### {title}: {kind}, {budget} s of training", "",
                      "| model | mean PSNR (dB) | steps | " + " | ".join(images) + " |", "|---|---:|---:|" + "---:|" * len(images)]
            for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["mean"]):
                cells = " | ".join(f"{row['per_image'].get(i, float('nan')):.2f}" for i in images)
                lines.append(f"| {name} | {spread(row['seed_means'])} | {row['steps']:.0f} | {cells} |")
    return "\n".join(lines).strip() + "\n"


def plot(summary: dict, path: Path) -> None:
    """Mean PSNR against the time budget, one line per model (and set)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for kind, budgets in summary.items():
        names = sorted({n for rows in budgets.values() for n in rows})
        for name in names:
            points = [(float(b), rows[name]) for b, rows in budgets.items() if name in rows]
            xs = [b for b, _ in points]
            ys = [row["mean"] for _, row in points]
            errs = [statistics.stdev(row["seed_means"]) if len(row["seed_means"]) > 1 else 0 for _, row in points]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=f"{name} ({kind})", ls="-" if kind == "crops" else "--")
    ax.set(xscale="log", xlabel="training budget (s, 2-core CPU)", ylabel="mean PSNR (dB)", title="PSNR at equal training time")
    budgets = sorted({float(b) for kind in summary.values() for b in kind})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets], minor=False)
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def sweep_run(image: Path, family: str, run: Path, spec: dict, train: dict, budget: float, quiet: bool) -> dict:
    """One candidate's run on one photo (its metrics): reused when it finished with these
    settings, resumed when it was stopped or killed with them, fitted anew when it trained others
    (an earlier round's candidate under its label, or a family default that has changed since)."""
    # a candidate's rate is the rate at every length (lr_steps 0): the sweep chooses it per budget
    options = {**spec, "lr_steps": 0, **train, "budget_seconds": float(budget), "eval_every": 100}
    result = fit_run(run, image, family, progress=not quiet, note=lambda message: print(message, file=sys.stderr, flush=True),
                     **options)
    if result is not None and result.interrupted:  # fit stops at Ctrl-C and returns: the sweep stops with it
        raise KeyboardInterrupt
    return json.loads((run / "metrics.json").read_text())


def tune(out: Path, budgets: list[float], families: list[str], quiet: bool, table: dict[str, dict[str, tuple[dict, dict]]],
         only: set[str] | None = None) -> dict:
    """Every candidate of ``table`` (sweep_table() or lr_round()) of every family, or those
    labelled in ``only`` (e.g. kan#12), on the tuning photos at each budget (seed 0)."""
    folder = write_photos(out / "photos", TUNE, crop=True)
    records = []
    for budget in budgets:
        for family in families:
            for label, (spec, train) in table[family].items():
                if only and label not in only:
                    continue
                for image in sorted(folder.glob("*.png")):
                    run = out / "runs" / f"{budget:g}s" / image.stem / label.replace("#", "-")
                    metrics = sweep_run(image, family, run, spec, train, budget, quiet)
                    records.append({"set": "tune", "budget": budget, "candidate": label, "family": family, "spec": spec,
                                    "train": train, "image": image.stem, "seed": 0, "psnr": metrics["metrics"]["psnr"],
                                    "steps": metrics["steps_done"]})
                    print(f"{budget:g}s {label:12s} {image.stem:10s} {metrics['metrics']['psnr']:.2f} dB "
                          f"({metrics['steps_done']} steps) {spec} {train}", file=sys.stderr, flush=True)
    return {"records": records}


RECORD_KEYS = {"set", "budget", "model", "image", "seed", "psnr", "steps"}  # what summarise() reads of a benchmark record


def _numbers(text: str, kind: type) -> list | None:
    """Comma-separated numbers, or None when one is not a number of that kind."""
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        return None


def _refuse(message: str) -> int:
    print(f"inr_bench: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="30,120,600", help="training seconds per model, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (benchmark only)")
    parser.add_argument("--models", default=",".join(MODELS), help="models (benchmark) or families (--tune)")
    parser.add_argument("--candidates", help="--tune: run only these candidates, comma-separated (e.g. kan#10,hashgrid#8: a new round)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-size photos")
    parser.add_argument("--photos", help="benchmark only these photos, comma-separated (e.g. camera,chelsea,camera-full): "
                                         "a part of a long run, merged with the others by --from-json")
    parser.add_argument("--tune", action="store_true", help="run the tuning sweep instead of the benchmark")
    parser.add_argument("--lr-round", nargs="?", const=",".join(f"{s:g}" for s in LR_SCALES), metavar="SCALES",
                        help="--tune: each family's winner at these fractions of its learning rate, comma-separated "
                             "(default 1,0.5,0.25; for budgets past the sweep's)")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/inr-bench"))
    parser.add_argument("--json", type=Path, help="results JSON (default: benchmarks/results/inr_bench[-tune].json)")
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="JSON",
                        help="train nothing: summarise and plot these benchmark results of --models together (e.g. budgets run at different times)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    budgets = _numbers(args.budgets, float)
    seeds = _numbers(args.seeds, int)
    if budgets is None or not all(0 < b < math.inf for b in budgets):
        return _refuse(f"--budgets takes training seconds above 0, comma-separated (e.g. 30,120), not {args.budgets!r}")
    if seeds is None or not all(s >= 0 for s in seeds):
        return _refuse(f"--seeds takes seeds from 0, comma-separated (e.g. 0,1,2), not {args.seeds!r}")
    if not args.tune and (args.lr_round is not None or args.candidates is not None):
        return _refuse("--lr-round and --candidates choose what a tuning sweep runs: give them with --tune")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    table = sweep_table()
    if args.lr_round is not None:
        scales = _numbers(args.lr_round, float)
        if not scales or not all(0 < s <= 10 for s in scales):
            return _refuse(f"--lr-round takes fractions of the rate, comma-separated (e.g. 0.25,0.125), not {args.lr_round!r}")
        table = lr_round(tuple(scales))
    path = args.json or Path(__file__).resolve().parent / "results" / f"inr_bench{'-tune' if args.tune else ''}.json"
    if args.from_json:
        if path.resolve() in {p.resolve() for p in args.from_json}:
            return _refuse(f"{path} is one of the results read by --from-json: name another file with --json")
        records = []
        for source in args.from_json:
            if not source.is_file():
                return _refuse(f"{source}: no such file")
            part = (read_json_object(source) or {}).get("records")
            if not isinstance(part, list) or not all(isinstance(r, dict) and RECORD_KEYS <= set(r) for r in part):
                return _refuse(f"{source}: not a results file of this benchmark (a JSON object whose records have "
                               f"{', '.join(sorted(RECORD_KEYS))})")
            records += [r for r in part if r["model"] in models]
        if not records:
            return _refuse(f"no record of {', '.join(models)} in {', '.join(map(str, args.from_json))}")
        result, key, title = {"records": records}, "model", "Benchmark"
    elif args.tune:
        unknown = sorted(set(models) - set(table))
        if unknown:
            return _refuse(f"no candidates for {', '.join(unknown)}; choose from {', '.join(table)}")
        result, key, title = tune(args.out, budgets, models, args.quiet, table,
                                  set(args.candidates.split(',')) if args.candidates else None), "candidate", "Tuning sweep"
    else:
        photos = [p.strip() for p in args.photos.split(",") if p.strip()] if args.photos else None
        unknown = sorted(set(photos or []) - set(EVAL) - set(FULL))
        if unknown:
            return _refuse(f"unknown photo {', '.join(unknown)}; choose from {', '.join([*EVAL, *FULL])}")
        try:
            register_lr_variants(models)
        except KanimgError as error:
            return _refuse(str(error))
        unknown = sorted(set(models) - set(model_names()))
        if unknown:
            return _refuse(f"unknown model {', '.join(unknown)}; choose from {', '.join(model_names(False))}, "
                           f"or a family at a fraction of its rate (e.g. kan-lr0.5)")
        result, key, title = bench(args.out, budgets, seeds, models, not args.no_full, args.quiet, photos), "model", "Benchmark"
    summary = summarise(result["records"], key)
    text = markdown(summary, title)
    print(text)
    if not args.tune:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(summary, args.out / "psnr-vs-budget.png")
    payload = {"summary": summary, **result, "candidates": {f: {label: list(c) for label, c in table[f].items()} for f in table} if args.tune else None,
               "command": "python benchmarks/inr_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine(), "versions": versions()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
    print(f"{path}" + ("" if args.tune else f", {args.out / 'psnr-vs-budget.png'}"))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KanimgError as error:  # e.g. a model option no family takes: one line, as kanimg's own commands
        print(f"inr_bench: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # finished runs stay finished: the same command goes on from there
        print("inr_bench: interrupted; run the same command again to go on from the finished runs", file=sys.stderr)
        raise SystemExit(130) from None
