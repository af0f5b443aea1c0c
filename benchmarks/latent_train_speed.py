"""How fast the latent codecs train: milliseconds per training step, per image size and
synthesis (issue 15's "encode time on CPU per image size": training is nearly all of it).

Each image is trained for ``--steps`` steps of :func:`kanimg.compress.latent_codec.train_latent`
(the codec's own schedule squeezed into them: noise, then the rounding phase through the
quantised synthesis; no file is coded on the way, so only the steps are timed), with a fresh
model each time, ``--repeats`` times; the median is reported, with the encode time it implies
at the codec's default number of steps.

    python benchmarks/latent_train_speed.py runs/tune/coffee.png runs/full/camera.png --threads 1
    PYTHONPATH=/path/to/another/checkout python benchmarks/latent_train_speed.py IMAGE --json other.json   # that kanimg's speed

Prints a Markdown table and writes JSON (default benchmarks/results/latent_train_speed.json).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import kanimg
from kanimg.compress import latent_codec
from kanimg.errors import KanimgError
from kanimg.files import write_json
from kanimg.io import load_image
from kanimg.results import machine, versions

MODELS = ("latent", "latent-kan")
BPP = 0.3  # the budget the steps train at (and that picks the synthesis's width)


def time_steps(image_path: Path, name: str, steps: int, repeats: int) -> dict:
    image = load_image(image_path)
    seconds = []
    for repeat in range(repeats + 1):  # the first run warms up (allocations, the upsampling factors)
        torch.manual_seed(repeat)
        model = latent_codec.new_model(name, image.height, image.width, image.channels, BPP * image.height * image.width / 8)
        started = time.perf_counter()
        latent_codec.train_latent(model, image, BPP, steps, seed=repeat, measure_files=False)
        if repeat:
            seconds.append(time.perf_counter() - started)
    per_step = statistics.median(seconds) / steps
    return {"image": str(image_path), "size": f"{image.width}x{image.height}", "channels": image.channels, "model": name,
            "steps": steps, "seconds": [round(s, 3) for s in seconds], "ms_per_step": round(1000 * per_step, 2),
            "encode_seconds_at_default_steps": round(per_step * latent_codec.STEPS, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "latent_train_speed.json")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or args.steps < 1 or args.repeats < 1:
        print(f"latent_train_speed: models among {', '.join(MODELS)} (not {', '.join(unknown)}), steps and repeats ≥ 1")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    try:
        for path in args.images:
            for name in models:
                rows.append(time_steps(path, name, args.steps, args.repeats))
                row = rows[-1]
                print(f"{path.name} {row['size']} {name}: {row['ms_per_step']} ms/step", flush=True)
    except KanimgError as exc:
        print(f"latent_train_speed: {exc}")
        return 1
    print("\n| image | size | model | ms / step | encode at the default steps (s) |\n|---|---|---|---:|---:|")
    for row in rows:
        print(f"| {Path(row['image']).name} | {row['size']} | {row['model']} | {row['ms_per_step']} | {row['encode_seconds_at_default_steps']} |")
    write_json(args.json, {"kanimg": str(Path(kanimg.__file__).parent), "threads": torch.get_num_threads(), "machine": machine(),
                           "versions": versions(), "rows": rows})
    print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
